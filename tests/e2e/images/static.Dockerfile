# syntax=docker/dockerfile:1
# One statically linked Go binary (KubeRay's manager) and nothing else.
FROM scratch
ARG BINARY
COPY ${BINARY} /${BINARY}
USER 65532:65532
