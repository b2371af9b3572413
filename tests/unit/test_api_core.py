"""The API's common ground: auth on every route, JSON errors, project isolation, paging."""

from __future__ import annotations

from pathlib import Path

from tests.support.api_lab import ApiLab


async def test_health_needs_no_token_and_everything_else_does(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        anonymous = lab.client()
        health = await anonymous.get("/v1/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        refused = await anonymous.get("/v1/flavors")
        assert refused.status_code == 401
        assert refused.json()["code"] == "unauthorized"
        forged = lab.client("nbt_0123456789abcdef.not-the-secret")
        assert (await forged.get("/v1/flavors")).json()["code"] == "unauthorized"


async def test_errors_are_json_with_a_stable_code(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        missing = await admin.get("/v1/no-such-thing")
        assert missing.status_code == 404
        assert missing.json()["code"] == "not_found"
        invalid = await admin.post("/v1/flavors", json={"name": "x", "vcpus": 0, "memory_mb": 64})
        assert invalid.status_code == 422
        assert invalid.json()["code"] == "invalid_input"
        assert "vcpus" in invalid.json()["message"]
        not_json = await admin.post(
            "/v1/flavors", content=b"{", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 422


async def test_a_wrong_method_names_the_methods_the_path_takes(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        wrong = await admin.put("/v1/flavors")
        assert wrong.status_code == 405
        assert wrong.json()["code"] == "method_not_allowed"
        assert wrong.headers["allow"] == "GET, POST"
        # A literal path beats a template that would also match it.
        imported = await admin.put("/v1/images/import")
        assert imported.status_code == 405
        assert imported.headers["allow"] == "POST"


async def test_flavors_are_made_by_admins_and_names_are_unique(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        member = await lab.member("alpha")
        body = {"name": "huge", "vcpus": 8, "memory_mb": 16384, "disk_gb": 80}
        refused = await member.post("/v1/flavors", json=body)
        assert refused.status_code == 403
        assert refused.json()["code"] == "forbidden"
        made = await admin.post("/v1/flavors", json=body)
        assert made.status_code == 201, made.text
        again = await admin.post("/v1/flavors", json=body)
        assert again.status_code == 409
        assert (await member.get("/v1/flavors/huge")).json()["vcpus"] == 8


async def test_listing_pages_through_every_record_once(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        admin = await lab.admin()
        for index in range(25):
            body = {"name": f"f{index:02d}", "vcpus": 1, "memory_mb": 64}
            assert (await admin.post("/v1/flavors", json=body)).status_code == 201
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, str | int] = {"limit": 7}
            if cursor:
                params["cursor"] = cursor
            page = (await admin.get("/v1/flavors", params=params)).json()
            seen.extend(item["name"] for item in page["items"])
            cursor = page["next"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)) == 25 + 4
        assert seen == sorted(seen)
