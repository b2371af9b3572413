"""Routes of the security-groups resource (being written)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["security-groups"])
