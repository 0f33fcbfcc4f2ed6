"""Read ServeDeployment manifests from YAML and validate them the way the API server would.

`rayfleet run` has no API server, so it applies the CRD's own structural defaults, OpenAPI schema
and CEL rules (the same file that `kubectl apply` installs): a spec that runs locally is one the
cluster accepts, and an error names the field before anything starts.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import yaml

from rayfleet.spec import SpecError, desired_state

CRD_FILE = Path(__file__).with_name("servedeployment-crd.yaml")
API_VERSION = "rayfleet.io/v1alpha1"
KIND = "ServeDeployment"


@dataclass(frozen=True)
class Manifest:
    name: str
    namespace: str
    spec: dict[str, Any]  # defaulted and validated

    def desired_state(self) -> dict[str, Any]:
        return desired_state(self.spec)


@functools.cache
def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting: fill absent properties that declare a default, depth first."""
    if isinstance(value, dict):
        for key, prop in schema.get("properties", {}).items():
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                apply_defaults(value[key], prop)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value.keys() - schema.get("properties", {}).keys():
                apply_defaults(value[key], extra)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_defaults(item, schema["items"])
    return value


def _path(parts: Iterator[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _cel_errors(value: Any, schema: dict[str, Any], path: list[Any]) -> Iterator[str]:
    """Evaluate x-kubernetes-validations rules where their object is present."""
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            yield f"{_path(path) or '<root>'}: {rule.get('message', rule['rule'])}"
    if isinstance(value, dict):
        for key, prop in schema.get("properties", {}).items():
            if key in value:
                yield from _cel_errors(value[key], prop, path + [key])
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from _cel_errors(item, schema["items"], path + [index])


def validate(obj: dict[str, Any]) -> dict[str, Any]:
    """Default and validate one ServeDeployment object; raise SpecError naming the first bad field."""
    if obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
        raise SpecError("kind", f"expected apiVersion {API_VERSION} kind {KIND}, got {obj.get('apiVersion')} {obj.get('kind')}")
    name = (obj.get("metadata") or {}).get("name")
    if not name:
        raise SpecError("metadata.name", "is required")
    schema = crd_schema()
    obj = apply_defaults(copy.deepcopy(obj), schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise SpecError(_path(first.absolute_path) or "<root>", first.message)
    for message in _cel_errors(obj, schema, []):
        field, _, text = message.partition(": ")
        raise SpecError(field, text)
    desired_state(obj["spec"])  # surfaces what the schema can't express, e.g. an unparsable quantity
    return obj


def load_manifests(path: str | Path) -> list[Manifest]:
    """All ServeDeployments in a (multi-document) YAML file, defaulted and validated."""
    try:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(str(path), f"invalid YAML: {exc}") from exc
    if not documents:
        raise SpecError(str(path), "contains no ServeDeployment")
    manifests = []
    for document in documents:
        if not isinstance(document, dict):
            raise SpecError(str(path), "each YAML document must be a ServeDeployment object")
        obj = validate(document)
        manifests.append(Manifest(obj["metadata"]["name"], obj["metadata"].get("namespace", "default"), obj["spec"]))
    names = [m.name for m in manifests]
    if len(set(names)) != len(names):
        raise SpecError("metadata.name", f"duplicate ServeDeployment names in {path}: {names}")
    return manifests
