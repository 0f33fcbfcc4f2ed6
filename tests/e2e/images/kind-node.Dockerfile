# syntax=docker/dockerfile:1
# A kind node image built with no registry: kind's own base recipe (its Go module's images/base/files:
# entrypoint, systemd units, containerd config), on the Debian the suite bootstraps, with Debian's
# containerd, runc and CNI plugins, and the Kubernetes binaries built from the pinned Go modules. The
# control plane's images are imported into containerd afterwards (tests/e2e/kind.py), as
# `kind build node-image` does.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
ARG KUBERNETES_VERSION
ARG PAUSE_IMAGE
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      systemd conntrack iptables nftables iproute2 ethtool util-linux mount kmod libseccomp2 pigz \
      bash ca-certificates jq procps containerd runc containernetworking-plugins \
 && rm -rf /var/lib/apt/lists/*
COPY files/usr/local/bin/entrypoint /usr/local/bin/entrypoint
COPY files/kind/ /kind/
COPY files/etc/ /etc/
COPY node-init /usr/local/bin/rayfleet-node-init
COPY bin/kubeadm bin/kubelet bin/kubectl /usr/bin/
COPY bin/crictl /usr/local/bin/crictl
RUN chmod 0755 /usr/local/bin/* /usr/bin/kubeadm /usr/bin/kubelet /usr/bin/kubectl /kind/bin/* \
 # kind's units and `kind load` expect containerd in /usr/local/bin and the CNI plugins in /opt/cni/bin.
 && ln -s /usr/bin/containerd /usr/local/bin/containerd \
 && mkdir -p /opt/cni && ln -s /usr/lib/cni /opt/cni/bin \
 && ctr oci spec \
      | jq '.hooks.createContainer[.hooks.createContainer | length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
      | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json \
 && sed -i "s|sandbox_image = .*|sandbox_image = \"${PAUSE_IMAGE}\"|" /etc/containerd/config.toml \
 && find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete \
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \
      /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \
      /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \
 && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \
 && ln -s /usr/lib/systemd/systemd /sbin/init \
 && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \
 && systemctl mask systemd-binfmt.service \
 && mkdir -p /etc/kubernetes/manifests \
 && echo "${KUBERNETES_VERSION}" > /kind/version
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/rayfleet-node-init", "/usr/local/bin/entrypoint", "/sbin/init"]
