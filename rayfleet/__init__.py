"""rayfleet: async Python handlers served by a fleet of Ray replica actors, driven by Kubernetes."""
