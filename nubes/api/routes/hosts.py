"""Routes of the hosts resource (being written)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["hosts"])
