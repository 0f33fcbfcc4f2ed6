"""`rayfleet run FILE.yaml` as a user rolls out with it: edit the file and save. A version that can't
import is rolled back while every request to the old one is answered; a canary at 10 % gets 10 % of
10,000 requests, and all of them once its weight is set to 100."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import pytest

from rayfleet.ports import free_port
from rayfleet.waiting import eventually
from tests.runtime.test_rollouts import greetings
from tests.runtime.test_run_cli import RAYFLEET, REPO, run_env
from tests.traffic import Traffic

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

MANIFEST = """\
apiVersion: rayfleet.io/v1alpha1
kind: ServeDeployment
metadata:
  name: echo
spec:
  handler: {handler}
  handlerArgs: {{greeting: {greeting}}}
  replicas: 2
  routePrefix: /echo
  rayActorOptions: {{numCpus: 0.5}}
  gracefulShutdownSeconds: 5
  rollout: {rollout}
"""


def test_saving_the_file_rolls_back_a_bad_version_and_splits_a_canary(tmp_path, ray_tmpdir):
    port, manifest, out_path = free_port(), tmp_path / "app.yaml", tmp_path / "stdout"

    def save(handler="examples.echo:Echo", greeting="old", rollout="{}") -> None:
        manifest.write_text(MANIFEST.format(handler=handler, greeting=greeting, rollout=rollout))

    def printed(text: str):
        def check() -> bool:
            assert proc.poll() is None, f"rayfleet run exited with {proc.returncode}\n{out_path.read_text()}"
            return text in out_path.read_text()
        eventually(check, 120, 0.3, what=repr(text), diagnostics=lambda: out_path.read_text())

    save()
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([str(RAYFLEET), "run", str(manifest), "--port", str(port), "--metrics-port", "0"],
                                cwd=REPO, env=run_env(ray_tmpdir), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        printed("echo: 2/2 ready (Running)")
        url = f"http://127.0.0.1:{port}/echo"
        with Traffic(url + "/x") as traffic:
            save(handler="examples.ecko:Echo")  # a typo: the new revision can't import its handler
            printed("echo: rollout failed:")
            printed("rolled back to revision 1")
        assert traffic.failures == [] and traffic.answers > 0, traffic.failures[:3]
        assert traffic.last["greeting"] == "old"
        assert "HandlerImportError" in out_path.read_text()

        save(greeting="new", rollout="{canary: {weight: 10}}")
        printed("echo: canary of revision 3")
        eventually(lambda: "echo: 3/2 ready" in out_path.read_text() or len(set(asyncio.run(greetings(url, 50)))) == 2,
                   120, 0.5, what="the canary answering", diagnostics=lambda: out_path.read_text())
        seen = asyncio.run(greetings(url, 10_000))
        share = seen.count("new") / len(seen)
        assert 0.08 <= share <= 0.12, share
        save(greeting="new", rollout="{canary: {weight: 100}}")
        printed("echo: revision 3 (")
        printed("rolled out")
        assert set(asyncio.run(greetings(url, 200))) == {"new"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
