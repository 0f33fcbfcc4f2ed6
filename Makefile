# Small on purpose: the Python test suite is the build system; these are shortcuts.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
OPERATOR_IMAGE ?= ghcr.io/rayfleet/operator:0.1.0
REPLICA_IMAGE ?= ghcr.io/rayfleet/replica:0.1.0

.PHONY: setup test e2e images chart-check bench bench-faults bench-autoscale

# A fresh machine needs Python 3.10+ and Go >= 1.26; everything else is installed here.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[operator,runtime,test,bench]"
	touch $@

setup: $(VENV)/.installed
	@command -v go >/dev/null || { echo "Go >= 1.26 is needed to build the local control plane"; exit 1; }
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq wrk >/dev/null; } \
		|| echo "note: wrk is missing (apt-get install wrk); the benchmark smoke test will be skipped"
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
		|| echo "note: prometheus is missing (apt-get install prometheus); the tests that scrape with a real Prometheus need it (they skip unless root)"

# The whole suite: unit, runtime (real Ray + HAProxy), integration (real kube-apiserver), bench smoke,
# and e2e (a real kubelet, our images, KubeRay's operator). As root with apt-get the e2e host is
# prepared and e2e must pass; elsewhere it skips with the reason.
test: setup
	@bash tests/e2e/prepare-host.sh && strict=1 || { rc=$$?; [ $$rc = 10 ] || exit $$rc; strict=0; }; \
	RAYFLEET_E2E_STRICT=$$strict $(PYTHON) -m pytest -q -rs

# Only the e2e suite (tests/e2e): builds every image without a registry, starts a real single-node cluster on this
# host, installs KubeRay and the chart, runs the examples, tears it all down. Root; FAILS where it can't run.
e2e: setup
	bash tests/e2e/prepare-host.sh
	RAYFLEET_E2E_STRICT=1 $(PYTHON) -m pytest tests/e2e -v -rs

# With registry access. Offline, `python -m tests.e2e.images` builds both from a bootstrapped Debian.
images:
	docker build -f operator/Dockerfile -t $(OPERATOR_IMAGE) .
	docker build -f replica_image/Dockerfile -t $(REPLICA_IMAGE) .

chart-check:
	$(PYTHON) -m pytest tests/unit/test_chart.py -q

# rayfleet vs Ray Serve (defaults, tuned, HAProxy mode) with wrk; ~15 min. BENCH_ARGS="--quick" for a smoke run.
bench: $(VENV)/.installed
	$(PYTHON) -m bench.run $(BENCH_ARGS)

bench-faults: $(VENV)/.installed
	$(PYTHON) -m bench.faults $(BENCH_ARGS)

# Autoscaling: a load step 1 -> 64 -> 1 connections, rayfleet vs Ray Serve's autoscaler; ~6 min.
bench-autoscale: $(VENV)/.installed
	$(PYTHON) -m bench.autoscale $(BENCH_ARGS)
