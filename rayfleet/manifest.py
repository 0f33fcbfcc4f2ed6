"""Read ServeDeployment manifests from YAML and validate them the way `kubectl apply` and the API server would.

`rayfleet run` has no API server, so it does to each object what `kubectl apply` and the API server do
to a new one, with the CRD's own schema (the same file that `kubectl apply` installs): YAML read as
kubectl reads it, null fields dropped, unknown fields refused (kubectl's default `--validate=strict`)
or pruned, status ignored, metadata checked, then structural defaults, the OpenAPI schema and the CEL
rules. A spec that runs locally is one the cluster accepts, with the same defaults, and an error names
the field before anything starts. tests/integration/test_manifest_parity.py holds this to a real API
server on the corpus in tests/manifests/.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import yaml

from rayfleet_api.constants import API_VERSION, KIND
from rayfleet_api.desired import DesiredState
from rayfleet_api.errors import SpecError
from rayfleet_api.spec import desired_state

CRD_FILE = Path(__file__).with_name("servedeployment-crd.yaml")
FIELD_VALIDATION = ("strict", "warn", "ignore")  # kubectl apply --validate

# ObjectMeta's fields: the API server decodes metadata into it, so any other key is an unknown field.
OBJECT_META_FIELDS = ("name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
                      "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
                      "annotations", "ownerReferences", "finalizers", "managedFields")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


@dataclass(frozen=True)
class Manifest:
    name: str
    namespace: str
    spec: dict[str, Any]  # defaulted and validated

    def desired_state(self) -> DesiredState:
        return desired_state(self.spec)


class UnknownFieldsError(SpecError):
    """Fields the CRD does not declare; the text is the API server's under strict field validation."""

    def __init__(self, paths: list[str]):
        super().__init__(paths[0], "unknown field")
        self.paths = paths
        self.args = (", ".join(f'unknown field "{p}"' for p in paths),)


# -- YAML as kubectl reads it ------------------------------------------------------------------------
# kubectl converts YAML to JSON with sigs.k8s.io/yaml (go-yaml v2), whose plain scalars differ from
# PyYAML's: `y`/`n` are booleans, `0o17` and `1e3` numbers, and timestamps stay strings.

_GO_YAML_WORDS = {
    **dict.fromkeys("y Y yes Yes YES on On ON true True TRUE".split(), True),
    **dict.fromkeys("n N no No NO off Off OFF false False FALSE".split(), False),
    **dict.fromkeys(["", "~", "null", "Null", "NULL"], None),
    **dict.fromkeys([".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"], math.inf),
    **dict.fromkeys(["-.inf", "-.Inf", "-.INF"], -math.inf),
    **dict.fromkeys([".nan", ".NaN", ".NAN"], math.nan),
}
_GO_INT = re.compile(r"([-+]?)(0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO][0-7]+|0[0-7]*|[1-9][0-9]*)")  # ParseInt(s, 0, 64)
_GO_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _go_yaml_scalar(text: str) -> Any:
    """go-yaml v2's resolve() of a plain scalar."""
    if text in _GO_YAML_WORDS:
        return _GO_YAML_WORDS[text]
    if text[0] in "+-0123456789":  # ParseInt, ParseUint, then a YAML-style float; underscores dropped first
        plain = text.replace("_", "")
        if match := _GO_INT.fullmatch(plain):
            digits = match[2]
            value = int(digits, 8) if digits[:1] == "0" and digits[1:2].isdigit() else int(digits, 0)  # 017 is octal
            value = -value if match[1] == "-" else value
            if -2**63 <= value < 2**63 or (value < 2**64 and not match[1]):  # else ParseUint, which takes no sign
                return value
        if not _GO_FLOAT.fullmatch(plain):
            return text
    elif text[0] == ".":  # ParseFloat: `_` only between digits, as in Python
        plain = text
    else:
        return text
    try:
        value = float(plain)
    except ValueError:
        return text
    return value if math.isfinite(value) else text  # out of range: ParseFloat fails, a string


class _KubectlYAMLLoader(yaml.SafeLoader):
    """SafeLoader with go-yaml v2's plain scalars; merge keys (`<<`) stay."""
    yaml_implicit_resolvers = {"<": [("tag:yaml.org,2002:merge", re.compile(r"^<<$"))]}


_KubectlYAMLLoader.add_implicit_resolver("!go-yaml-plain", re.compile(""), None)
_KubectlYAMLLoader.add_constructor("!go-yaml-plain", lambda loader, node: _go_yaml_scalar(node.value))


def _as_sent(value: Any, path: list[Any]) -> Any:
    """The JSON `kubectl apply` sends: string keys, integral numbers as integers (Go's JSON encoding),
    no null map entries (client-side apply drops them, so defaults apply)."""
    if isinstance(value, dict):
        return {("true" if k else "false") if isinstance(k, bool) else str(k): _as_sent(v, path + [k])
                for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_as_sent(item, path + [index]) for index, item in enumerate(value)]
    if isinstance(value, float):
        if not math.isfinite(value):
            text = "NaN" if math.isnan(value) else "+Inf" if value > 0 else "-Inf"
            raise SpecError(_path(path), f"unsupported value: {text} (JSON has no NaN or infinity)")
        if value.is_integer() and abs(value) < 1e21:
            return int(value)
    return value


# -- the API server's checks ------------------------------------------------------------------------

@functools.cache
def crd_schema() -> dict[str, Any]:
    crd = yaml.load(CRD_FILE.read_text(), Loader=_KubectlYAMLLoader)  # kubectl installs it
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@functools.cache
def _decoding_schema() -> dict[str, Any]:
    """The CRD schema with metadata as the server decodes it: ObjectMeta's fields, their contents unchecked."""
    schema = copy.deepcopy(crd_schema())
    schema["properties"]["metadata"] = {"properties": dict.fromkeys(OBJECT_META_FIELDS, {"x-kubernetes-preserve-unknown-fields": True})}
    return schema


def _prune(value: Any, schema: dict[str, Any], path: list[Any]) -> Iterator[str]:
    """Structural pruning: remove the fields the schema does not declare, yielding their paths.
    Under x-kubernetes-preserve-unknown-fields everything is kept; additionalProperties declares any key."""
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        for key in list(value):
            declared = schema.get("properties", {}).get(key, extra if isinstance(extra, dict) else None)
            if declared is not None:
                yield from _prune(value[key], declared, path + [key])
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                del value[key]
                yield _path(path + [key])
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from _prune(item, schema["items"], path + [index])


def _check_metadata(meta: Any) -> None:
    """ObjectMeta as kubectl decodes it and the API server validates it for a custom resource."""
    if not isinstance(meta, dict):
        raise SpecError("metadata", "must be an object")
    for key in ("name", "generateName", "namespace"):
        if not isinstance(meta.get(key, ""), str):
            raise SpecError(f"metadata.{key}", "must be a string")
    for key in ("labels", "annotations"):
        value = meta.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise SpecError(f"metadata.{key}", "must be a map of strings")
    name, namespace = meta.get("name"), meta.get("namespace")
    if not name:
        raise SpecError("metadata.name", "resource name may not be empty")
    if not _is_subdomain(name):
        raise SpecError("metadata.name", f"{name!r} is not a lowercase RFC 1123 subdomain: lower case alphanumeric "
                        "characters, '-' or '.', starting and ending with an alphanumeric character, at most 253")
    if namespace is not None and not (len(namespace) <= 63 and _DNS1123_LABEL.fullmatch(namespace)):
        raise SpecError("metadata.namespace", f"{namespace!r} is not a lowercase RFC 1123 label")
    for key, value in meta.get("labels", {}).items():
        if not _is_qualified_name(key):
            raise SpecError("metadata.labels", f"{key!r} is not a valid label key ([prefix/]name, e.g. example.com/app)")
        if value and not (len(value) <= 63 and _QUALIFIED_NAME.fullmatch(value)):
            raise SpecError(f"metadata.labels.{key}", f"{value!r} is not a valid label value")
    annotations = meta.get("annotations", {})
    for key in annotations:
        if not _is_qualified_name(key.lower()):
            raise SpecError("metadata.annotations", f"{key!r} is not a valid annotation key")
    if sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items()) > 256 * 1024:
        raise SpecError("metadata.annotations", "may not be larger than 256 KiB in total")


def _is_subdomain(text: str) -> bool:
    return len(text) <= 253 and bool(_DNS1123_SUBDOMAIN.fullmatch(text))


def _is_qualified_name(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    return len(name) <= 63 and bool(_QUALIFIED_NAME.fullmatch(name)) and (not slash or _is_subdomain(prefix))


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


@functools.cache
def _go_regexp(pattern: str) -> re.Pattern[str]:
    """A schema pattern with Go RE2's meaning: `$` (outside a class) only at the very end, where Python's `$`
    also matches before a final newline; ASCII classes."""
    return re.compile(re.sub(r"(\\.|\[(?:\\.|[^\]])*\])|\$", lambda m: m[1] or r"\Z", pattern), re.ASCII)


# Keywords the API server checks differently from (or beyond) JSON Schema draft 7.
Errors = Iterator[jsonschema.ValidationError]


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Errors:
    if validator.is_type(instance, "string") and not _go_regexp(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _format(validator: Any, fmt: str, instance: Any, schema: dict[str, Any]) -> Errors:
    bits = {"int32": 32, "int64": 64}.get(fmt)
    if bits and validator.is_type(instance, "integer") and not -2 ** (bits - 1) <= instance < 2 ** (bits - 1):
        yield jsonschema.ValidationError(f"{instance} is out of range for format {fmt}")


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Errors:
    """x-kubernetes-list-type map/set: no two items with the same map keys (map) or value (set)."""
    if list_type not in ("map", "set") or not validator.is_type(instance, "array"):
        return
    seen: list[Any] = []
    for index, item in enumerate(instance):
        key = ({k: item.get(k) for k in schema.get("x-kubernetes-list-map-keys", [])}
               if list_type == "map" and isinstance(item, dict) else item)
        if key in seen:
            yield jsonschema.ValidationError(f"Duplicate value: {json.dumps(key)}", path=[index])
        seen.append(key)


_SchemaValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"pattern": _pattern, "format": _format, "x-kubernetes-list-type": _list_type})


def _path(parts: Iterator[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _cel_errors(value: Any, schema: dict[str, Any], path: list[Any]) -> Iterator[str]:
    """Evaluate x-kubernetes-validations rules where their object is present."""
    env = celpy.Environment()
    rules = schema.get("x-kubernetes-validations", [])
    seen = value
    if rules and not path:
        # At the root the API server shows a rule only metadata.name and generateName of the metadata;
        # this CRD's root rules read nothing else (the spec has rules of its own, and free-form fields
        # such as handlerArgs may hold numbers CEL can't).
        meta = value.get("metadata") or {}
        seen = {**{k: value[k] for k in ("apiVersion", "kind") if k in value},
                "metadata": {k: meta[k] for k in ("name", "generateName") if k in meta}}
    for rule in rules:
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(seen)}):
            yield f"{_path(path) or '<root>'}: {rule.get('message', rule['rule'])}"
    if isinstance(value, dict):
        for key, prop in schema.get("properties", {}).items():
            if key in value:
                yield from _cel_errors(value[key], prop, path + [key])
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from _cel_errors(item, schema["items"], path + [index])


def validate(obj: dict[str, Any], field_validation: str = "strict", warnings: list[str] | None = None) -> dict[str, Any]:
    """What `kubectl apply --validate=<field_validation>` would create from one object, defaulted; or
    SpecError naming the first bad field. Unknown fields: "strict" refuses them (UnknownFieldsError, every
    path), "warn" appends `unknown field "PATH"` to `warnings` and drops them, "ignore" drops them."""
    if field_validation not in FIELD_VALIDATION:
        raise ValueError(f"field_validation must be one of {FIELD_VALIDATION}, not {field_validation!r}")
    obj = _as_sent(obj, [])
    for key in ("apiVersion", "kind"):
        if not obj.get(key):
            raise SpecError(key, f"{key} not set")
    if (obj["apiVersion"], obj["kind"]) != (API_VERSION, KIND):
        raise SpecError("kind", f'no matches for kind "{obj["kind"]}" in version "{obj["apiVersion"]}" '
                        f"(rayfleet serves kind {KIND} in {API_VERSION})")
    _check_metadata(obj.setdefault("metadata", {}))
    # Metadata's unknown fields come first, the others sorted: the API server's order.
    unknown = sorted(_prune(obj, _decoding_schema(), []), key=lambda p: (not p.startswith("metadata."), p))
    if unknown and field_validation == "strict":
        raise UnknownFieldsError(unknown)
    if field_validation == "warn" and warnings is not None:
        warnings.extend(f'unknown field "{p}"' for p in unknown)
    obj.pop("status", None)  # the status subresource: a create ignores status (its unknown fields still count)
    schema = crd_schema()
    apply_defaults(obj, schema)
    errors = sorted(_SchemaValidator(schema).iter_errors(obj), key=lambda e: _path(e.absolute_path))
    if errors:
        first = errors[0]
        if first.validator == "required":
            missing = next(p for p in first.validator_value if p not in first.instance)
            raise SpecError(_path([*first.absolute_path, missing]), "Required value")
        raise SpecError(_path(first.absolute_path) or "<root>", first.message)
    for message in _cel_errors(obj, schema, []):  # as on the server, only for a schema-valid object
        field, _, text = message.partition(": ")
        raise SpecError(field, text)
    desired_state(obj["spec"])  # surfaces what the schema can't express, e.g. an unparsable quantity
    return obj


def read_documents(path: str | Path) -> list[Any]:
    """The non-empty YAML documents of a file, read as kubectl reads them."""
    try:
        return [d for d in yaml.load_all(Path(path).read_text(), Loader=_KubectlYAMLLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(str(path), f"invalid YAML: {exc}") from exc


def load_manifests(path: str | Path, field_validation: str = "strict", warnings: list[str] | None = None) -> list[Manifest]:
    """All ServeDeployments in a (multi-document) YAML file, defaulted and validated (see validate())."""
    documents = read_documents(path)
    if not documents:
        raise SpecError(str(path), "contains no ServeDeployment")
    manifests = []
    for document in documents:
        if not isinstance(document, dict):
            raise SpecError(str(path), "each YAML document must be a ServeDeployment object")
        obj = validate(document, field_validation, warnings)
        manifests.append(Manifest(obj["metadata"]["name"], obj["metadata"].get("namespace", "default"), obj["spec"]))
    names = [m.name for m in manifests]
    if len(set(names)) != len(names):
        raise SpecError("metadata.name", f"duplicate ServeDeployment names in {path}: {names}")
    return manifests
