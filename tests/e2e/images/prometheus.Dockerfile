# syntax=docker/dockerfile:1
# Prometheus inside the e2e cluster (Debian's package, like the one the other suites run on loopback):
# it scrapes pods by pod IP, which only pods reach.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/*
USER nobody
ENTRYPOINT ["/usr/bin/prometheus"]
