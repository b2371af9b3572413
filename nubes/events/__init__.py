"""The event log: what happened to each resource, who asked for it and why it failed."""
