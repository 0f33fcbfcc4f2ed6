# syntax=docker/dockerfile:1
# Redis for the head's GCS fault tolerance in the e2e suite: Debian's redis-server on the Debian root
# filesystem the suite bootstraps (no container registry), as Debian's unprivileged `redis` user.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o redis -g redis /data
USER redis
WORKDIR /data
EXPOSE 6379
# The password comes from the environment (a Secret); no disk: the GCS state lives as long as the pod.
CMD ["sh", "-c", "exec redis-server --bind 0.0.0.0 --port 6379 --protected-mode no --save '' --appendonly no --requirepass \"$REDIS_PASSWORD\""]
