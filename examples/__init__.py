"""Example rayfleet handlers (see rayfleet_runtime.replica.handler for the contract)."""
