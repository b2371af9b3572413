"""The scheduler: picks a host for each VM (filters, then weighers) and binds it."""
