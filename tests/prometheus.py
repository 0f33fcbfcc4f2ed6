"""The metrics tests' Prometheus (``bench.prometheus``, which the golden-signals bench drives too), or a skip
where it can't be installed."""
from __future__ import annotations

import os

import pytest

from bench.prometheus import prometheus_path


def require_prometheus() -> str:
    """The binary; else skip, with the reason, where it can't be installed here (not root), and fail as root,
    where ``make setup`` installs it."""
    path = prometheus_path()
    if path is None:
        if os.geteuid() != 0:
            pytest.skip("prometheus is not installed (apt-get install -y prometheus, or `make setup` as root); "
                        "the metrics tests scrape with a real Prometheus")
        pytest.fail("prometheus is not installed: `make setup` (as root) installs it with apt-get")
    return path
