"""The import graph has layers, and every arrow points down (README, "Architecture"):

    rayfleet (CLI, `run`, `dev`)  ─▶  rayfleet_runtime  ─▶  rayfleet_api  ◀─  rayfleet_operator

`rayfleet dev` runs the operator as a process, never imports it.

bench/ and tests/ sit above all of them; no product module imports them, and bench imports nothing from
tests (tests may use bench's harnesses). Read from the source (ast), so a function-level import counts as
much as one at the top.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {  # package -> (where it lives, what of ours it may import)
    "rayfleet_api": (REPO / "api/rayfleet_api", set()),
    "rayfleet_operator": (REPO / "operator/rayfleet_operator", {"rayfleet_api"}),
    "rayfleet_runtime": (REPO / "replica_image/rayfleet_runtime", {"rayfleet_api"}),
    "rayfleet": (REPO / "rayfleet", {"rayfleet_api", "rayfleet_runtime"}),
    # the benchmarks use the product and their own harnesses; the tests may use those, never the other way
    "bench": (REPO / "bench", {"rayfleet_api", "rayfleet_operator", "rayfleet_runtime", "rayfleet"}),
}
OURS = set(PACKAGES) | {"bench", "tests", "examples"}
THIRD_PARTY_BANNED = {"rayfleet_api": {"ray", "kopf", "kubernetes", "aiohttp"}, "rayfleet_operator": {"ray"}}


def imports(package: str) -> dict[str, set[str]]:
    """Top-level names each module of `package` imports (relative imports resolve to the package)."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGES[package][0].rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(package if node.level else (node.module or "").split(".")[0])
        out[str(path.relative_to(REPO))] = names
    return out


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_dependencies_point_down(package):
    allowed = PACKAGES[package][1] | {package}
    upward = {module: sorted((names & OURS) - allowed) for module, names in imports(package).items()}
    assert not {m: n for m, n in upward.items() if n}, f"{package} may import only {sorted(allowed)}"


@pytest.mark.parametrize("package", sorted(THIRD_PARTY_BANNED))
def test_lower_layers_stay_light(package):
    banned = THIRD_PARTY_BANNED[package]
    found = {module: sorted(names & banned) for module, names in imports(package).items()}
    assert not {m: n for m, n in found.items() if n}


def test_the_check_sees_imports():
    """The walk finds both import forms; a broken walk would pass the tests above vacuously."""
    assert "rayfleet_api" in imports("rayfleet_operator")["operator/rayfleet_operator/reconcile.py"]
    assert {"ray", "rayfleet_runtime"} <= imports("rayfleet")["rayfleet/local_run.py"]
    assert {"bench", "rayfleet"} <= imports("bench")["bench/golden_signals.py"]


RUNTIME = PACKAGES["rayfleet_runtime"][0]
PROCESSES = {  # subpackage -> the other subpackages it may import (besides the shared top-level modules)
    "replica": set(),
    "ingress": set(),
    "controller": {"ingress", "replica"},  # it creates their actors (ray_calls)
}


def runtime_imports() -> dict[str, set[str]]:
    """For each runtime module, the runtime subpackages (or ``shared``) it imports."""
    out: dict[str, set[str]] = {}
    for path in sorted(RUNTIME.rglob("*.py")):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for module in modules:
                parts = module.split(".")
                if parts[0] == "rayfleet_runtime":
                    found.add(parts[1] if len(parts) > 1 and parts[1] in PROCESSES else "shared")
        out[str(path.relative_to(RUNTIME))] = found
    return out


def test_each_runtime_process_imports_only_what_it_runs_and_what_they_share():
    graph = runtime_imports()
    wrong = {}
    for module, found in graph.items():
        home = module.split("/")[0] if "/" in module else "shared"
        allowed = {"shared", home} | PROCESSES.get(home, set())
        if module == "__init__.py":  # the handler contract's names, for `from rayfleet_runtime import Response`
            allowed.add("replica")
        if found - allowed:
            wrong[module] = sorted(found - allowed)
    assert not wrong, "a shared module imports a process, or a process another one's code"
    assert "ingress" in graph["controller/ray_calls.py"] and "shared" in graph["ingress/actor.py"]
