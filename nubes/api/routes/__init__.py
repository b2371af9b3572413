"""Every router of the API, in the order the OpenAPI document lists them."""

from __future__ import annotations

from fastapi import APIRouter

from nubes.api.routes import (
    auth,
    events,
    flavors,
    floating_ips,
    hosts,
    images,
    keypairs,
    networks,
    ports,
    projects,
    security_groups,
    usage,
    vms,
    volumes,
    watch,
)

ROUTERS: list[APIRouter] = [
    auth.router,
    projects.router,
    flavors.router,
    keypairs.router,
    images.router,
    networks.router,
    ports.router,
    security_groups.router,
    floating_ips.router,
    volumes.router,
    vms.router,
    hosts.router,
    usage.router,
    watch.router,
    events.router,
]
