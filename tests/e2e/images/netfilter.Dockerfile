# syntax=docker/dockerfile:1
# A node agent that programs the node's netfilter (kube-proxy, kube-router): its static Go binary on
# Debian's iptables, ipset, iproute2 and conntrack. iptables-wrapper (kubernetes-sigs/iptables-wrappers,
# as kube-router's module carries it) picks the backend, legacy or nft, that the node already uses.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
ARG BINARY
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iptables ipset iproute2 conntrack \
 && rm -rf /var/lib/apt/lists/*
COPY iptables-wrapper-installer.sh /iptables-wrapper-installer.sh
RUN sh /iptables-wrapper-installer.sh --no-sanity-check  # it removes itself
COPY ${BINARY} /usr/local/bin/${BINARY}
