"""`rayfleet-operator` / `python -m rayfleet_operator`: run the operator (a thin wrapper over kopf.run)."""
from __future__ import annotations

import argparse
import logging

import kopf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rayfleet-operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch only this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster (default)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL ('' to disable)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import handlers  # noqa: F401  registers the handlers
    if args.namespace:
        # Exact namespaces: kopf need not scan CRDs or namespaces cluster-wide, so a namespaced
        # install works with Roles alone (no cluster-scoped permission at all).
        @kopf.on.startup()
        def no_cluster_scanning(settings: kopf.OperatorSettings, **_: object) -> None:
            settings.scanning.disabled = True
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        standalone=True,  # one replica; no peering CRD needed (see charts/rayfleet/values.yaml)
    )


if __name__ == "__main__":
    main()
