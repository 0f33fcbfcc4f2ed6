"""The `rayfleet` command: `rayfleet run FILE.yaml` (local Ray, no Kubernetes) and `rayfleet dev up|url|down`."""
from __future__ import annotations

import sys
from typing import Sequence

USAGE = """usage: rayfleet run FILE.yaml [--host HOST] [--port PORT] [--validate strict|warn|ignore]
       rayfleet dev up | url NAME [-n NAMESPACE] | down

  run   serve ServeDeployment manifests on this machine with a local Ray (no Kubernetes)
  dev   a local Kubernetes environment: API server, CRDs, operator, local RayCluster provider
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        from rayfleet.local_run import main as run_main
        return run_main(args[1:]) or 0
    if args[:1] == ["dev"]:
        from rayfleet.dev.cli import main as dev_main
        return dev_main(args[1:])
    print(USAGE, file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
    return 0 if args[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
