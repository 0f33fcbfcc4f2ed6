"""`rayfleet run FILE.yaml` driven as a user would: the real console script in a subprocess.

Each run gets its own short ``RAY_TMPDIR``, so "did Ray start?" and "is anything of it left?" are
answered for this run only, even while other Ray clusters run on the machine: every Ray process
(gcs_server, raylet, agents, workers) carries that directory in its command line, and a session
directory appears under it as soon as Ray starts.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rayfleet.ports import free_port
from rayfleet.procs import cmdline, descendants
from rayfleet.waiting import eventually
from tests.processes import processes_mentioning, start_time

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
RAYFLEET = Path(sys.executable).with_name("rayfleet")

BAD_REPLICAS = """\
apiVersion: rayfleet.io/v1alpha1
kind: ServeDeployment
metadata:
  name: bad
spec:
  handler: examples.echo:Echo
  replicas: -1
"""

MISSPELLED_FIELD = """\
apiVersion: rayfleet.io/v1alpha1
kind: ServeDeployment
metadata:
  name: typo
spec:
  handler: examples.echo:Echo
  replica: 3
  maxConcurency: 8
"""

BROKEN_YAML = """\
apiVersion: rayfleet.io/v1alpha1
kind: ServeDeployment
metadata: {name: broken
spec:
  handler: examples.echo:Echo
"""


def run_env(ray_tmpdir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["RAY_TMPDIR"] = ray_tmpdir
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.parametrize(
    "content, expected",
    [(BAD_REPLICAS, ["spec.replicas", "minimum"]), (BROKEN_YAML, ["invalid YAML", "line"]),
     (MISSPELLED_FIELD, ['unknown field "spec.maxConcurency", unknown field "spec.replica"'])],
    ids=["replicas-negative", "broken-yaml", "misspelled-field"],
)
def test_invalid_manifest_fails_fast_naming_the_problem(tmp_path, ray_tmpdir, content, expected):
    manifest = tmp_path / "app.yaml"
    manifest.write_text(content)
    proc = subprocess.run([str(RAYFLEET), "run", str(manifest), "--port", str(free_port())], cwd=REPO,
                          env=run_env(ray_tmpdir), capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0, proc
    assert all(word in proc.stderr for word in expected), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "starting local Ray" not in proc.stdout, proc.stdout
    # Nothing of Ray was started: no session directory, no process pointing at this run's temp dir.
    assert os.listdir(ray_tmpdir) == [], os.listdir(ray_tmpdir)
    assert processes_mentioning(ray_tmpdir) == {}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_run_echo_serves_then_stops_everything(tmp_path, ray_tmpdir, stop):
    port = free_port()
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    seen: dict[int, int] = {}  # pid -> start time, of every process the run had under it

    def record() -> None:
        for pid in descendants(proc.pid):
            st = start_time(pid)
            if st is not None:
                seen.setdefault(pid, st)

    def output() -> str:
        return f"--- stdout\n{out_path.read_text()}\n--- stderr (tail)\n{err_path.read_text()[-3000:]}"

    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        # Its own session: the finally below can kill the whole group whatever happens.
        proc = subprocess.Popen([str(RAYFLEET), "run", "examples/echo.yaml", "--port", str(port)], cwd=REPO,
                                env=run_env(ray_tmpdir), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        def printed_ready():
            assert proc.poll() is None, f"rayfleet run exited with {proc.returncode}\n{output()}"  # fail fast
            record()
            return "echo: 2/2 ready" in out_path.read_text()
        eventually(printed_ready, 75, 0.3, what="'echo: 2/2 ready'", diagnostics=output)
        assert f"echo -> http://127.0.0.1:{port}/echo" in out_path.read_text(), output()

        pids: set[int] = set()

        def answered_from_both():
            r = httpx.get(f"http://127.0.0.1:{port}/echo/hi", timeout=10)  # a new connection each time
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["path"] == "/echo/hi" and body["greeting"] == "hi", body
            pids.add(body["pid"])
            return len(pids) >= 2
        eventually(answered_from_both, 20, 0, what="answers from both replicas",
                   diagnostics=lambda: f"answers came from {pids} only\n{output()}")
        record()
        assert pids <= seen.keys(), f"replica pids {pids} are not processes of the run {sorted(seen)}"
        assert any("haproxy" in cmdline(pid) for pid in seen), {p: cmdline(p)[:80] for p in seen}

        if stop == "ctrl-c":  # the terminal sends SIGINT to the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        else:  # `kill PID`: an orderly stop too, not Ray's driver handler's sys.exit(15)
            proc.terminate()
        t = time.monotonic()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 30 s after {stop}\n{output()}")
        assert code == 0, f"exit code {code} after {stop}\n{output()}"
        assert "shutting down" in out_path.read_text(), output()
        stop_s = time.monotonic() - t

        # Nothing left: neither what ran under it (HAProxy included) nor anything else of this Ray.
        def alive():
            left = {pid: cmdline(pid)[:120] for pid, st in seen.items() if start_time(pid) == st}
            left.update(processes_mentioning(ray_tmpdir))
            return left
        # SIGKILLed processes take a moment to be gone.
        eventually(lambda: not alive(), 5, 0.2, what="every process of the run to be gone",
                   diagnostics=lambda: f"left behind after exit (stopped in {stop_s:.1f}s): {alive()}\n{output()}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid, st in seen.items():  # never leave a stray cluster for the next test
            if start_time(pid) == st:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
