#!/usr/bin/env bash
# Prepares this host for the e2e suite (tests/e2e): Docker (image builds, and kind's nodes) and
# debootstrap (the images' Debian), from Debian, and a running Docker engine. Exit 0: ready. Exit 10: not root or no apt-get, nothing done (the suite
# then skips with the reason). Anything else: a real failure.
set -euo pipefail

PACKAGES=(docker.io debootstrap)

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "e2e: not root or no apt-get; the e2e suite will skip unless its host is prepared by hand" >&2
  exit 10
fi

missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "e2e: apt-get install ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  # No systemd here to start the service: run the daemon detached, as the service would.
  echo "e2e: starting dockerd (log: /var/log/rayfleet-dockerd.log)" >&2
  setsid dockerd >/var/log/rayfleet-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done
  echo "e2e: dockerd did not come up; see /var/log/rayfleet-dockerd.log" >&2
  exit 1
fi
