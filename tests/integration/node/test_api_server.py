"""`serve_api`: the API on a real socket, over TLS when given a certificate, stopping when
told; clear errors for a taken port and a broken certificate."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from nubes.api.context import ApiContext
from nubes.api.server import ListenFailed, serve_api
from nubes.config import NubesConfig
from nubes.errors import ConfigError
from nubes.store.sqlite import SqliteStore


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "api.crt", directory / "api.key"
    completed = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    return cert, key


async def test_the_api_serves_https_with_the_given_certificate_and_stops_when_told(
    tmp_path: Path,
) -> None:
    cert, key = self_signed(tmp_path)
    store = await SqliteStore.open(tmp_path / "nubes.db")
    ctx = ApiContext(store=store, config=NubesConfig(state_dir=tmp_path), image_dir=tmp_path)
    stop, started = asyncio.Event(), asyncio.Event()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        server = asyncio.create_task(
            serve_api(
                ctx, listen="127.0.0.1", port=port, tls_cert=cert, tls_key=key,
                stop=stop, started=started,
            )
        )  # fmt: skip
        await asyncio.wait_for(started.wait(), 10)
        trusting = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(verify=trusting) as client:
            answer = await client.get(f"https://127.0.0.1:{port}/v1/health")
            assert answer.status_code == 200
            assert answer.json()["status"] == "ok"
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{port}/v1/health")
        stop.set()
        await asyncio.wait_for(server, 15)
        with socket.socket() as again:
            assert again.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
    finally:
        stop.set()
        await store.close()


async def test_a_taken_port_and_a_broken_certificate_are_clear_errors(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "nubes.db")
    ctx = ApiContext(store=store, config=NubesConfig(state_dir=tmp_path), image_dir=tmp_path)
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            with pytest.raises(ListenFailed, match=f"port {port}"):
                await serve_api(
                    ctx, listen="127.0.0.1", port=port, tls_cert=None, tls_key=None,
                    stop=asyncio.Event(),
                )  # fmt: skip
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("not a certificate\n")
        with pytest.raises(ConfigError, match="TLS certificate"):
            await serve_api(
                ctx, listen="127.0.0.1", port=0, tls_cert=garbage, tls_key=garbage,
                stop=asyncio.Event(),
            )  # fmt: skip
    finally:
        await store.close()
