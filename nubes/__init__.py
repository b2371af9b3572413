"""nubes: a small, complete IaaS cloud on one machine or many."""

__version__ = "0.1.0"
