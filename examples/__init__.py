"""Example rayfleet handlers (see rayfleet_runtime.handler for the contract)."""
