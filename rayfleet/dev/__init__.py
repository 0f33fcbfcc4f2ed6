"""Local development helpers: a real control plane for tests and `rayfleet dev`."""
