"""Every image the e2e cluster runs, built on this machine with no container registry.

Base: a Debian root filesystem from `debootstrap`, imported into Docker, with Python 3.11 in a venv
(a stand-in for python:3.11-slim) and a `ray` user (a stand-in for rayproject/ray). Product: the
repository's own operator/Dockerfile and replica_image/Dockerfile, given those bases through their
BASE_IMAGE build argument. KubeRay's operator: its static Go binary, built from its module
(rayfleet.dev.toolchain.go_build caches it), in a scratch image. The kind node image and the
control plane's images are tests/e2e/kind.py's.

Docker's own layer cache keeps a rebuild cheap; the Debian import is keyed by suite, packages and the
host's CA bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rayfleet.dev.toolchain import KUBERAY_MODULE, KUBERAY_VERSION, go_build, kuberay_module_dir

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# python3.11 + venv (the product images' Python), bash + wget (KubeRay's probes), procps (ps for debugging).
DEBIAN_PACKAGES = ("python3", "python3-venv", "ca-certificates", "wget", "procps")
# pip in the images trusts this bundle (PIP_CERT): the host's, which may carry a local CA.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TAG = "e2e"


@dataclass(frozen=True)
class Images:
    operator: str
    replica: str
    kuberay: str
    redis: str  # the head's GCS fault tolerance keeps its state there
    prometheus: str  # scrapes the pods from inside the cluster

    def all(self) -> list[str]:
        return [self.operator, self.replica, self.kuberay, self.redis, self.prometheus]


def docker(*args: str, input: bytes | None = None, timeout: float = 1800) -> str:
    proc = subprocess.run(["docker", *args], input=input, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout.decode(errors='replace')[-3000:]}\n{proc.stderr.decode(errors='replace')[-3000:]}")
    return proc.stdout.decode().strip()


def image_id(ref: str) -> str | None:
    proc = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def build(dockerfile: Path, tag: str, context: Path = ROOT, **build_args: str) -> str:
    print(f"[e2e] docker build {dockerfile.relative_to(ROOT) if dockerfile.is_relative_to(ROOT) else dockerfile} -> {tag}",
          flush=True)
    args = [a for k, v in build_args.items() for a in ("--build-arg", f"{k}={v}")]
    # DOCKER_BUILDKIT=0: Debian's docker.io has no buildx; the classic builder reads these Dockerfiles.
    proc = subprocess.run(["docker", "build", "--network=host", "-f", str(dockerfile), "-t", tag, *args, str(context)],
                          capture_output=True, text=True, timeout=3600, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"docker build -f {dockerfile} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    return tag


def debian_image() -> str:
    """A minimal Debian, bootstrapped from the Debian archive and imported (once per key)."""
    key = hashlib.sha256(json.dumps([DEBIAN_SUITE, DEBIAN_PACKAGES]).encode() + HOST_CA_BUNDLE.read_bytes())
    tag = f"rayfleet-e2e/debian:{DEBIAN_SUITE}-{key.hexdigest()[:10]}"
    if image_id(tag):
        return tag
    if not shutil.which("debootstrap"):
        raise RuntimeError("debootstrap is missing (apt-get install debootstrap)")
    print(f"[e2e] debootstrap {DEBIAN_SUITE} -> {tag}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rayfleet-debootstrap-") as tmp:
        root = Path(tmp) / "root"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
                        DEBIAN_SUITE, str(root), DEBIAN_MIRROR], check=True, capture_output=True, timeout=1200)
        shutil.copyfile(HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (root / cache).glob("*"):
                if f.is_file():
                    f.unlink()
        tar = subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-c", "."], check=True,
                             capture_output=True, timeout=600).stdout
    docker("import", "--change", "CMD [\"bash\"]", "--change", "ENV LANG=C.UTF-8", "-", tag, input=tar)
    return tag


def static_image(name: str, binary: Path) -> str:
    """A scratch image holding one static binary at /<binary name>."""
    tag = f"rayfleet-e2e/{name}:{TAG}"
    with tempfile.TemporaryDirectory(prefix=f"rayfleet-{name}-") as tmp:
        shutil.copy2(binary, Path(tmp) / binary.name)
        shutil.copyfile(HERE / "images" / "static.Dockerfile", Path(tmp) / "Dockerfile")
        build(Path(tmp) / "Dockerfile", tag, Path(tmp), BINARY=binary.name)
    return tag


def kuberay_binary() -> Path:
    src = kuberay_module_dir()
    return go_build(f"kuberay-{KUBERAY_VERSION}", {"manager": "."}, cwd=src,
                    key=[f"{KUBERAY_MODULE}@{KUBERAY_VERSION}".encode()])["manager"]


def e2e_go_binary(name: str) -> Path:
    src = HERE / "go" / name
    return go_build(f"e2e-{name}", {name: "."}, cwd=src,
                    key=[p for p in sorted(src.iterdir()) if p.is_file()])[name]


def build_all() -> Images:
    """Build (or reuse) every image the e2e suite needs; returns their references."""
    if not shutil.which("docker"):
        raise RuntimeError("the docker CLI is missing")
    debian = debian_image()
    python = build(HERE / "images" / "python.Dockerfile", f"rayfleet-e2e/python:{TAG}", HERE / "images",
                   DEBIAN_IMAGE=debian)
    ray = build(HERE / "images" / "ray.Dockerfile", f"rayfleet-e2e/ray-base:{TAG}", HERE / "images",
                PYTHON_IMAGE=python)
    return Images(
        operator=build(ROOT / "operator" / "Dockerfile", f"rayfleet/operator:{TAG}", BASE_IMAGE=python),
        replica=build(ROOT / "replica_image" / "Dockerfile", f"rayfleet/replica:{TAG}", BASE_IMAGE=ray),
        kuberay=static_image("kuberay-operator", kuberay_binary()),
        redis=build(HERE / "images" / "redis.Dockerfile", f"rayfleet-e2e/redis:{TAG}", HERE / "images",
                    DEBIAN_IMAGE=debian),
        prometheus=build(HERE / "images" / "prometheus.Dockerfile", f"rayfleet-e2e/prometheus:{TAG}", HERE / "images",
                         DEBIAN_IMAGE=debian),
    )


if __name__ == "__main__":  # python -m tests.e2e.images: build everything, print the references
    print(json.dumps(build_all().__dict__, indent=1))
