"""The web dashboard's front end: static HTML, CSS and JavaScript modules that the API
serves at /ui/ (nubes/api/web.py). No build step and no external URL: machines may be offline.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
