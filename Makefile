# Small on purpose: the Python test suite is the build system; these are shortcuts.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
OPERATOR_IMAGE ?= ghcr.io/rayfleet/operator:0.1.0
REPLICA_IMAGE ?= ghcr.io/rayfleet/replica:0.1.0

.PHONY: setup test e2e images chart-check crds bench bench-faults bench-autoscale

# A fresh machine needs Python 3.10+ (for `rayfleet run`); the targets that build Kubernetes components
# (test, e2e, `rayfleet dev`) need Go >= 1.26 too and say so when it is missing.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[operator,runtime,test,bench]"
	touch $@

setup: $(VENV)/.installed
	@command -v go >/dev/null || echo "note: Go >= 1.26 is missing; make test, make e2e and rayfleet dev build Kubernetes with it"
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq wrk >/dev/null; } \
		|| echo "note: wrk is missing (apt-get install wrk); the benchmark smoke test will be skipped"
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
		|| echo "note: prometheus is missing (apt-get install prometheus); the tests that scrape with a real Prometheus need it (they skip unless root)"

# The whole suite: unit, runtime (real Ray + HAProxy), integration (real kube-apiserver), bench smoke,
# and e2e (kind, our images, KubeRay's operator). As root with apt-get Docker is installed and started
# and e2e must pass; elsewhere it skips with the reason.
test: setup
	@command -v go >/dev/null || { echo "make test needs Go >= 1.26 (it builds Kubernetes, kind and KubeRay)"; exit 1; }
	@bash tests/e2e/prepare-host.sh && strict=1 || { rc=$$?; [ $$rc = 10 ] || exit $$rc; strict=0; }; \
	RAYFLEET_E2E_STRICT=$$strict $(PYTHON) -m pytest -q -rs

# Only the e2e suite (tests/e2e): builds every image without a registry, starts a 3-node kind cluster (nodes
# are Docker containers; nothing changes on the host), installs KubeRay and the chart, runs the examples,
# deletes the cluster. Needs Docker and Go; FAILS where it can't run.
e2e: setup
	@command -v go >/dev/null || { echo "make e2e needs Go >= 1.26 (it builds kind and Kubernetes)"; exit 1; }
	@docker info >/dev/null 2>&1 || bash tests/e2e/prepare-host.sh
	RAYFLEET_E2E_STRICT=1 $(PYTHON) -m pytest tests/e2e -v -rs

# With registry access. Offline, `python -m tests.e2e.images` builds both from a bootstrapped Debian.
images:
	docker build -f operator/Dockerfile -t $(OPERATOR_IMAGE) .
	docker build -f replica_image/Dockerfile -t $(REPLICA_IMAGE) .

chart-check:
	$(PYTHON) -m pytest tests/unit/test_chart.py -q

# The CRD is written by hand in crds/; this writes every copy of it: the chart's (Helm installs
# charts/rayfleet/crds/ as it is) and the package's (`rayfleet run` checks manifests against it), a link.
# tests/unit/test_chart.py fails while a copy differs.
CRD := crds/rayfleet.io_servedeployments.yaml
crds:
	cp $(CRD) charts/rayfleet/crds/rayfleet.io_servedeployments.yaml
	ln -sfn ../$(CRD) rayfleet/servedeployment-crd.yaml

# rayfleet vs Ray Serve (defaults, tuned, HAProxy mode) with wrk; ~15 min. BENCH_ARGS="--quick" for a smoke run.
bench: $(VENV)/.installed
	$(PYTHON) -m bench.run $(BENCH_ARGS)

bench-faults: $(VENV)/.installed
	$(PYTHON) -m bench.faults $(BENCH_ARGS)

# Autoscaling: a load step 1 -> 64 -> 1 connections, rayfleet vs Ray Serve's autoscaler; ~6 min.
bench-autoscale: $(VENV)/.installed
	$(PYTHON) -m bench.autoscale $(BENCH_ARGS)
