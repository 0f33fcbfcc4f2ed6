"""Kubernetes quantities ("512Mi", "250m", 2) as plain numbers."""
from __future__ import annotations

import re

from rayfleet_api.errors import SpecError

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_SUFFIX = {None: 1, "m": 0.001, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_quantity(value: int | float | str, field: str) -> float:
    """A Kubernetes quantity ("512Mi", "1.5", "250m", 1024) as a plain number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _QUANTITY.match(str(value))
    if not match:
        raise SpecError(field, f"{value!r} is not a quantity such as 512Mi, 2Gi or 1.5")
    return float(match.group(1)) * _SUFFIX[match.group(2)]
