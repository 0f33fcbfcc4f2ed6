"""`rayfleet run` and `kubectl apply` agree on every manifest of one corpus (tests/manifests/README.md).

Each manifest goes through `kubectl apply --dry-run=server --validate=strict` against the real test API
server and through rayfleet.manifest, `rayfleet run`'s validator. A valid one must be accepted by both
with the same defaulted spec; an invalid one refused by both, each message containing the file's
`# refused:` text (the field's path, or the API server's own words).
"""
import json
import re
import uuid
from pathlib import Path

import pytest

from rayfleet.manifest import load_manifests
from rayfleet_api.errors import SpecError

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "manifests"
VALID = sorted(CORPUS.glob("valid/*.yaml")) + sorted(ROOT.glob("examples/*.yaml"))
INVALID = sorted(CORPUS.glob("invalid/*.yaml"))


def corpus_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def as_json(spec: dict) -> str:
    # Compared as JSON text, not with ==: in Python 1 == 1.0 == True, on the wire they differ.
    return json.dumps(spec, sort_keys=True)


@pytest.fixture(scope="module")
def dry_run_namespace(control_plane):
    """A fresh namespace, so no existing object turns a create into a patch; dry runs leave it empty."""
    name = f"parity-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false")


def kubectl_apply(control_plane, namespace: str, path: Path, validate: str = "strict"):
    return control_plane.kubectl("apply", "--dry-run=server", f"--validate={validate}", "-o", "json",
                                 "-n", namespace, "-f", str(path), check=False)


@pytest.mark.parametrize("path", VALID, ids=corpus_id)
def test_valid_manifest_is_accepted_with_the_same_defaults(control_plane, dry_run_namespace, path):
    server = kubectl_apply(control_plane, dry_run_namespace, path)
    assert server.returncode == 0, server.stderr
    [manifest] = load_manifests(path)
    assert as_json(manifest.spec) == as_json(json.loads(server.stdout)["spec"])


@pytest.mark.parametrize("path", INVALID, ids=corpus_id)
def test_invalid_manifest_is_refused_by_both(control_plane, dry_run_namespace, path):
    refused = re.search(r"^# refused: (.+)$", path.read_text(), re.M)[1]
    server = kubectl_apply(control_plane, dry_run_namespace, path)
    assert server.returncode != 0, f"the API server accepted it:\n{server.stdout[:2000]}"
    assert refused in server.stderr, server.stderr
    with pytest.raises(SpecError) as err:
        load_manifests(path)
    assert refused in str(err.value)


@pytest.mark.parametrize("validate", ["warn", "ignore"])
def test_warn_and_ignore_drop_unknown_fields_as_the_server_does(control_plane, dry_run_namespace, validate):
    path = CORPUS / "invalid" / "unknown-fields-at-every-depth.yaml"
    server = kubectl_apply(control_plane, dry_run_namespace, path, validate)
    assert server.returncode == 0, server.stderr
    warnings: list[str] = []
    [manifest] = load_manifests(path, validate, warnings)
    assert [f"Warning: {w}" for w in warnings] == [line for line in server.stderr.splitlines() if line.startswith("Warning:")]
    assert as_json(manifest.spec) == as_json(json.loads(server.stdout)["spec"])
