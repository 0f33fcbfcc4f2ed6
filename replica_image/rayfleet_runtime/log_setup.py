"""How the runtime's processes (controller, replicas, ingress) log: one format, one level, one extra place.

* ``$RAYFLEET_LOG_LEVEL`` (default ``INFO``): ``rayfleet run --verbose`` sets ``DEBUG`` (HAProxy's own
  notices included).
* ``$RAYFLEET_LOG_FILE``: a second destination for the same lines. The operator sets it to
  ``/proc/1/fd/1`` on Ray pods, the container's own stdout, so ``kubectl logs`` shows the lifecycle
  events, errors and access logs of the pod's actors; Ray itself sends actor output only to files
  under ``/tmp/ray/session_latest/logs``.
"""
from __future__ import annotations

import logging
import os
import sys

from rayfleet_api.constants import LOG_FILE_ENV, LOG_LEVEL_ENV

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    """Once per process (a no-op if logging is already set up, e.g. by a test)."""
    root = logging.getLogger()
    if root.handlers:
        return
    level = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    logging.basicConfig(level=level if isinstance(logging.getLevelName(level), int) else "INFO", stream=sys.stderr,
                        format=FORMAT)
    path = os.environ.get(LOG_FILE_ENV)
    if path:
        try:
            extra = logging.StreamHandler(open(path, "a", buffering=1))  # noqa: SIM115 - lives as long as we do
        except OSError as exc:
            logging.getLogger("rayfleet").warning("not logging to %s=%s: %s", LOG_FILE_ENV, path, exc)
            return
        extra.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(extra)
