"""rayfleet vs Ray Serve benchmarks (``python -m bench.run``); see bench/README.md."""
