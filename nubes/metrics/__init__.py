"""Prometheus metrics of the API and of each host agent, each on its own registry.

Several components (an API and agents, in `nubes node` and in tests) share one process,
so nothing here touches prometheus_client's global REGISTRY.
"""
