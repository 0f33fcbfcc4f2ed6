"""The import graph has layers, and every arrow points down (README, "Architecture"):

    rayfleet (CLI, `run`, `dev`)  ─▶  rayfleet_operator, rayfleet_runtime  ─▶  rayfleet_api

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
    "rayfleet": (REPO / "rayfleet", {"rayfleet_api", "rayfleet_operator", "rayfleet_runtime"}),
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
