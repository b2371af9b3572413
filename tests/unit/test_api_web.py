"""The dashboard's files: served at /ui/ with a strict policy and revalidation, reached
from / and /ui, outside the OpenAPI document, and every script they load is there."""

from __future__ import annotations

import re
from pathlib import Path

from nubes.web import STATIC_DIR
from tests.support.api_lab import ApiLab


async def test_the_dashboard_page_is_served_with_a_strict_content_security_policy(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        anonymous = lab.client()
        page = await anonymous.get("/ui/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "default-src 'none'" in policy
        assert "unsafe" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-cache"
        assert '<script type="module" src="js/app.js">' in page.text

        script = await anonymous.get("/ui/js/app.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]
        assert script.headers["content-security-policy"] == policy
        again = await anonymous.get(
            "/ui/js/app.js", headers={"If-None-Match": script.headers["etag"]}
        )
        assert again.status_code == 304


async def test_the_root_and_bare_ui_lead_to_the_dashboard(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        anonymous = lab.client()
        for path in ("/", "/ui"):
            answer = await anonymous.get(path)
            assert answer.status_code == 307
            assert answer.headers["location"] == "/ui/"


async def test_a_missing_dashboard_file_is_a_json_404_and_no_route_is_in_openapi(
    tmp_path: Path,
) -> None:
    async with ApiLab.open(tmp_path) as lab:
        anonymous = lab.client()
        missing = await anonymous.get("/ui/no-such-file.js")
        assert missing.status_code == 404
        assert missing.json()["code"] == "not_found"
        escape = await anonymous.get("/ui/..%2F__init__.py")
        assert escape.status_code == 404
        paths = (await anonymous.get("/openapi.json")).json()["paths"]
        assert not [path for path in paths if path == "/" or path.startswith("/ui")]


def test_every_module_the_front_end_imports_exists_and_none_comes_from_elsewhere() -> None:
    scripts = sorted(STATIC_DIR.rglob("*.js"))
    assert scripts
    for script in scripts:
        text = script.read_text()
        for target in re.findall(r'^\s*(?:import|} from|from)\s.*?"([^"]+)";', text, re.M):
            assert target.startswith("."), f"{script.name} imports {target} from outside"
            assert (script.parent / target).resolve().is_file(), f"{script.name}: {target}"
        # API data goes into the page as text only.
        for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"):
            assert sink not in text, f"{script.name} uses {sink}"
        assert "http://" not in text, script.name
        assert "https://" not in text, script.name
