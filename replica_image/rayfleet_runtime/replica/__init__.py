"""A replica process: an actor that serves one deployment's handler over HTTP itself (``actor``), with the
plain contract (``handler``, ``http_server``) or an ASGI app (``asgi``)."""
