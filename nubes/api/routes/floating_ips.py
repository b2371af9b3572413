"""Routes of the floating-ips resource (being written)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["floating-ips"])
