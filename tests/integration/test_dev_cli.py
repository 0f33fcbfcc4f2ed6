"""The README's newcomer path, command by command: `rayfleet dev up` → `kubectl apply -f examples/echo.yaml`
→ `rayfleet dev url echo` → HTTP → `rayfleet dev down`, and nothing left running afterwards."""
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from rayfleet.dev.toolchain import ensure_tools
from rayfleet.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[2]


def rayfleet(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "rayfleet.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def descendants_of_session(pid):
    """PIDs whose session is the daemon's: everything `dev up` started runs under it or in a child session."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if f"RAYFLEET_DEV_MARK={pid}".encode() in environ:
                out.add(int(entry))
    return out


def test_dev_up_apply_url_curl_down(tmp_path):
    mark = str(os.getpid())
    env = {**os.environ, "RAYFLEET_DEV_DIR": str(tmp_path / "dev"), "RAYFLEET_DEV_MARK": mark}
    up = rayfleet(env, "dev", "up")
    try:
        assert up.returncode == 0, up.stderr
        export = [line for line in up.stdout.splitlines() if line.startswith("export KUBECONFIG=")]
        assert export, up.stdout
        kubeconfig = export[0].split("=", 1)[1]
        again = rayfleet(env, "dev", "up")
        assert again.returncode == 0 and "already up" in again.stderr and again.stdout == up.stdout

        kubectl = [str(ensure_tools().kubectl), f"--kubeconfig={kubeconfig}"]
        subprocess.run([*kubectl, "apply", "-f", "examples/echo.yaml"], cwd=REPO, check=True, capture_output=True)
        subprocess.run([*kubectl, "wait", "sd/echo", "--for=condition=Ready", "--timeout=240s"], check=True,
                       capture_output=True, timeout=260)
        url = rayfleet(env, "dev", "url", "echo")
        assert url.returncode == 0, url.stderr
        with urllib.request.urlopen(url.stdout.strip() + "/hello", timeout=10) as response:
            body = json.loads(response.read())
        assert response.status == 200 and body["path"] == "/echo/hello" and body["greeting"] == "hi"
        assert "not found" in rayfleet(env, "dev", "url", "nope").stderr.lower()
        assert descendants_of_session(mark)  # the marker really tracks what dev up started
    finally:
        down = rayfleet(env, "dev", "down", timeout=240)
    assert down.returncode == 0, down.stderr

    def left_behind():
        left = {}
        for pid in descendants_of_session(mark):
            try:
                left[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
            except OSError:  # exited meanwhile
                pass
        return left
    eventually(lambda: not left_behind(), timeout=30, interval=0.5, what="every process rayfleet dev started to exit",
               diagnostics=lambda: f"processes left behind by rayfleet dev: {left_behind()}")
    assert "not running" in rayfleet(env, "dev", "down").stderr
