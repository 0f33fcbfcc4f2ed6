# syntax=docker/dockerfile:1
# A stand-in for python:3.11-slim, made from the Debian root filesystem the e2e suite bootstraps
# (no container registry is needed): Debian's Python 3.11 in a venv that is first on PATH, as root.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
# pip vendors its own CA list; the host's bundle (copied into the Debian image) may hold a local CA.
ENV PATH=/opt/python/bin:$PATH \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8
RUN python3 -m venv /opt/python \
 && printf 'export PATH=/opt/python/bin:$PATH\n' > /etc/profile.d/python.sh
CMD ["python3"]
