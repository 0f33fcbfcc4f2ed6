# syntax=docker/dockerfile:1
# A stand-in for rayproject/ray (the replica image's documented base): user `ray` (uid 1000, group
# users) owning the Python on PATH, in login shells too (KubeRay runs `bash -lc 'ulimit -n 65536; ray
# start ...'`), with bash and wget for KubeRay's probes. Ray itself comes from the replica Dockerfile's
# requirements.
ARG PYTHON_IMAGE
FROM ${PYTHON_IMAGE}
RUN useradd --uid 1000 --gid users --create-home --shell /bin/bash ray \
 && chown -R ray:users /opt/python \
 && command -v wget bash
USER ray
WORKDIR /home/ray
