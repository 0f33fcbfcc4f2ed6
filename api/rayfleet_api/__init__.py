"""The bottom layer: what the operator, the runtime and the CLI share, and nothing they don't.

Pure Python (no kopf, no Ray, no web server): the meaning of a ServeDeployment spec, the controller's
desired state and its wire form, names and ports, replica and deployment states, and the client of the
controller's HTTP API. Everything else imports from here; this package imports from nothing of ours.
"""
