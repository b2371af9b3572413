"""Key pairs through the API: OpenSSH keys checked, names unique per project, isolation."""

from __future__ import annotations

import base64
from pathlib import Path

from nubes.model.network import keypair_key_name
from nubes.store.keys import Kind, resource_key
from tests.support.api_lab import ApiLab


def ed25519(seed: int = 1) -> str:
    kind = b"ssh-ed25519"
    blob = len(kind).to_bytes(4, "big") + kind + (32).to_bytes(4, "big") + bytes([seed]) * 32
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} me@laptop"


async def test_a_key_pair_is_kept_where_the_metadata_service_reads_it(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        made = await alice.post("/v1/keypairs", json={"name": "mine", "public_key": ed25519()})
        assert made.status_code == 201, made.text
        assert made.json()["fingerprint"].startswith("SHA256:")
        stored = await lab.store.get(resource_key(Kind.KEYPAIR, keypair_key_name("alpha", "mine")))
        assert stored is not None
        assert isinstance(stored.value, dict)
        assert stored.value["public_key"] == ed25519()
        got = (await alice.get("/v1/keypairs/mine")).json()
        assert got["fingerprint"] == made.json()["fingerprint"]
        twice = await alice.post("/v1/keypairs", json={"name": "mine", "public_key": ed25519(2)})
        assert twice.status_code == 409
        assert (await alice.delete("/v1/keypairs/mine")).status_code == 204
        assert (await alice.get("/v1/keypairs/mine")).status_code == 404


async def test_only_openssh_public_keys_are_taken(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        for key in [
            "-----BEGIN OPENSSH PRIVATE KEY-----",
            "ssh-ed25519",
            "ssh-ed25519 !!!notbase64",
            ed25519().replace("ssh-ed25519", "ssh-rsa"),
            ed25519() + "\nssh-ed25519 AAAA second",
        ]:
            refused = await alice.post("/v1/keypairs", json={"name": "k", "public_key": key})
            assert refused.status_code == 400, (key, refused.text)
            assert refused.json()["code"] == "invalid_input"
        assert [kv.key for kv in (await lab.store.range("/nubes/keypairs/")).kvs] == []


async def test_listing_pages_through_the_projects_keys_only(tmp_path: Path) -> None:
    async with ApiLab.open(tmp_path) as lab:
        alice = await lab.member("alpha")
        bob = await lab.member("beta")
        for index in range(5):
            body = {"name": f"k{index}", "public_key": ed25519(index)}
            assert (await alice.post("/v1/keypairs", json=body)).status_code == 201
        await bob.post("/v1/keypairs", json={"name": "k0", "public_key": ed25519(9)})
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, str | int] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = (await alice.get("/v1/keypairs", params=params)).json()
            seen += [item["name"] for item in page["items"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert seen == [f"k{index}" for index in range(5)]
        assert (await bob.get("/v1/keypairs/k1")).status_code == 404
        assert (await bob.delete("/v1/keypairs/k1")).status_code == 404
        theirs = (await bob.get("/v1/keypairs/k0")).json()
        assert theirs["public_key"] == ed25519(9)
