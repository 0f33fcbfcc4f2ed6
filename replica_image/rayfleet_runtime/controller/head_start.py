"""`rayfleet-head-start`: the head pod's postStart hook. It starts the rayfleet controller once Ray is up.

KubeRay owns the head container's command (`ray start --head`), so the controller is started beside
it: this returns at once (a postStart hook must not hold the container) and leaves a background
`python -m rayfleet_runtime.controller`, which waits for Ray, ensures the named detached controller
actor (idempotent, so a head restart is safe) and exits. Ray restarts the actor if it dies.
"""
from __future__ import annotations

import os
import subprocess
import sys

from rayfleet_api.constants import CONTROL_PORT, INGRESS_PORT, METRICS_PORT


def main() -> int:
    args = [sys.executable, "-m", "rayfleet_runtime.controller", "--address", "auto",
            "--control-port", os.environ.get("RAYFLEET_CONTROL_PORT", str(CONTROL_PORT)),
            "--ingress-port", os.environ.get("RAYFLEET_INGRESS_PORT", str(INGRESS_PORT)),
            "--metrics-port", os.environ.get("RAYFLEET_METRICS_PORT", str(METRICS_PORT)),
            "--ingress-nodes", "all", "--bind-host", "0.0.0.0", "--timeout", "600"]
    with open(os.environ.get("RAYFLEET_HEAD_START_LOG", "/tmp/rayfleet-controller-start.log"), "ab") as log:
        subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
