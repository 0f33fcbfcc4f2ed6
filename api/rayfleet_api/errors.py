"""The one error for a value rayfleet can't honour, wherever it is found (manifest, operator, controller)."""
from __future__ import annotations


class SpecError(ValueError):
    """A spec or desired-state value that can't be honoured; ``field`` names it (e.g. ``spec.replicas``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
