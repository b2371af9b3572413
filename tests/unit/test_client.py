"""The SDK against the real API over real HTTP (uvicorn on 127.0.0.1): login, paging,
errors with their codes, streamed upload, server-sent events, waiting for a VM."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nubes.client import ApiError, ApiUnreachable, Client, NotLoggedIn, ResourceFailed
from nubes.client.base import FLAVOR, KEYPAIR
from nubes.client.client import UPLOAD_CHUNK
from nubes.client.http import parse_events
from nubes.model.common import now
from nubes.model.vm import VmState, VmStatus
from nubes.store.keys import Kind, status_key
from tests.support.api_server import ADMIN_PASSWORD, ApiServer, serve_api

PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnpWFWQVKYNGcBvXqEf5E3lgMxpD0nIEfXDo0Iaomhs test@nubes"
)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with serve_api(tmp_path_factory.mktemp("api")) as server:
        yield server


class CountingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return super().handle_request(request)


def test_login_keeps_the_token_and_whoami_names_the_caller(api: ApiServer) -> None:
    with Client(api.url) as client:
        token = client.login("admin", ADMIN_PASSWORD)
        assert token.startswith("nbt_")
        assert client.token == token
        me = client.whoami()
    assert me["user"] == "admin"
    assert me["project"] == "default"
    assert client.last_login is not None
    assert client.last_login["token_id"] == me["token_id"]


def test_a_wrong_password_is_an_api_error_with_the_servers_code(api: ApiServer) -> None:
    with Client(api.url) as client, pytest.raises(ApiError) as caught:
        client.login("admin", "not-the-password")
    error = caught.value
    assert (error.code, error.status, error.exit_code) == ("unauthorized", 401, 1)
    assert "wrong user name or password" in error.message
    assert error.hint
    assert error.to_dict()["code"] == "unauthorized"


def test_invalid_input_exits_2_and_not_found_exits_1(api: ApiServer) -> None:
    with Client(api.url, api.token()) as client:
        with pytest.raises(ApiError) as invalid:
            client.create(FLAVOR, {"name": "bad", "vcpus": 0, "memory_mb": 64})
        assert (invalid.value.code, invalid.value.status, invalid.value.exit_code) == (
            "invalid_input",
            422,
            2,
        )
        assert "vcpus" in invalid.value.message
        with pytest.raises(ApiError) as missing:
            client.get(FLAVOR, "no-such-flavor")
        assert (missing.value.code, missing.value.exit_code) == ("not_found", 1)


def test_a_call_without_a_token_says_to_log_in(api: ApiServer) -> None:
    with Client(api.url) as client, pytest.raises(NotLoggedIn, match="nubes login"):
        client.whoami()


def test_an_api_that_is_not_running_says_to_run_nubes_up() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}/v1/", "nbt_x") as client:
        assert client.url == f"http://127.0.0.1:{port}"
        with pytest.raises(ApiUnreachable) as caught:
            client.whoami()
    assert f"http://127.0.0.1:{port} is not answering" in str(caught.value)
    assert "nubes up" in str(caught.value)
    assert caught.value.code == "api_unreachable"


def test_listing_follows_next_cursors_across_pages(api: ApiServer) -> None:
    transport = CountingTransport()
    with Client(api.url, api.token(), transport=transport) as client:
        for index in range(12):
            client.create(FLAVOR, {"name": f"page-{index:02d}", "vcpus": 1, "memory_mb": 64})
        client.page_size = 5
        transport.requests.clear()
        names = [flavor["name"] for flavor in client.records(FLAVOR)]
    assert [n for n in names if n.startswith("page-")] == [f"page-{i:02d}" for i in range(12)]
    assert len(names) == len(set(names))
    pages = [r for r in transport.requests if r.url.path == "/v1/flavors"]
    assert len(pages) == -(-len(names) // 5)
    assert pages[0].url.params["limit"] == "5"
    assert "cursor" not in pages[0].url.params
    assert all("cursor" in page.url.params for page in pages[1:])


def test_upload_streams_the_file_in_chunks_and_the_image_arrives_whole(
    api: ApiServer, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.raw"
    content = bytes(range(256)) * (3 * UPLOAD_CHUNK // 256 + 1000)
    disk.write_bytes(content)
    seen: list[tuple[int, int | None]] = []
    with Client(api.url, api.token()) as client:
        image = client.upload_image(
            "streamed", disk, disk_format="raw", progress=lambda d, t: seen.append((d, t))
        )
        again = client.get_image("streamed")
    assert image["disk"]["sha256"] == hashlib.sha256(content).hexdigest()
    assert image["disk"]["size"] == len(content)
    assert again["id"] == image["id"]
    # One progress report per chunk read: the file went out piece by piece.
    assert len(seen) == 4
    assert [done for done, _ in seen] == [
        UPLOAD_CHUNK,
        2 * UPLOAD_CHUNK,
        3 * UPLOAD_CHUNK,
        len(content),
    ]
    assert all(total == len(content) for _, total in seen)


def test_watch_yields_the_changes_as_server_sent_events(api: ApiServer) -> None:
    with Client(api.url, api.token()) as client:
        client.create_keypair("watched", PUBLIC_KEY)
        client.delete(KEYPAIR, "watched")
        events = list(client.watch(["keypairs"], since=0, timeout=1))
    mine = [(e.type, e.data["id"]) for e in events if e.data["id"] == "watched"]
    assert mine[:2] == [("put", "watched"), ("delete", "watched")]
    assert all(event.id is not None and event.id.isdigit() for event in events)


def test_parse_events_joins_data_lines_and_skips_comments() -> None:
    lines = [": keep-alive", "event: put", "id: 7", 'data: {"a":', "data: 1}", "", "data: x", ""]
    events = list(parse_events(lines))
    assert [(e.type, e.id, e.data) for e in events] == [
        ("put", "7", {"a": 1}),
        ("message", "7", "x"),
    ]


def test_wait_vm_fails_fast_with_the_reason_when_the_vm_goes_to_error(
    api: ApiServer, tmp_path: Path
) -> None:
    disk = tmp_path / "boot.raw"
    disk.write_bytes(b"\0" * 65536)
    with Client(api.url, api.token()) as client:
        client.upload_image("bootable", disk, disk_format="raw")
        vm = client.create_vm("doomed", flavor="tiny", image="bootable")
        assert vm["state"] == "pending"
        status = VmStatus(state=VmState.ERROR, reason="no host can take it", updated_at=now())
        api.run(api.lab.store.put(status_key(Kind.VM, vm["id"]), status.to_json()))
        with pytest.raises(ResourceFailed, match="no host can take it"):
            client.wait_vm("doomed", "running", timeout=30)
        assert client.delete_vm(vm["id"]) is not None
