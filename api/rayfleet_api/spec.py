"""What a ServeDeployment spec means to the controller: the spec (as the API server defaulted it) -> DesiredState.

The mapping is the field table's (``desired.FIELDS``); ``version`` hashes the spec's versioned fields
(like a Deployment's pod-template hash).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from rayfleet_api.desired import FIELDS, VERSIONED_WIRE_FIELDS, DesiredState, version_hash
from rayfleet_api.fields import from_spec

# The spec's fields baked into a replica process: the desired state's, and the image, which the operator
# puts on the pods (the controller never sees it) and which needs new processes as much.
VERSIONED_FIELDS = (*VERSIONED_WIRE_FIELDS, "image")


def spec_version(spec: dict[str, Any]) -> str:
    """Stable short hash of the spec fields that require new replica processes."""
    return version_hash({key: spec.get(key) for key in VERSIONED_FIELDS})


def desired_state(spec: dict[str, Any]) -> DesiredState:
    """The controller's desired state for a spec; absent fields take DesiredState's defaults."""
    return replace(from_spec(DesiredState, FIELDS, spec), version=spec_version(spec))
