from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from nubes.errors import CompactedError, ConfigError, LeaseNotFound, NubesError
from nubes.store.base import Compare, KeyValue, check_key, compare_holds, encode_value, prefix_end
from nubes.store.bell import ChangeBell, bell_directory
from nubes.store.etcd import grpc_target
from nubes.store.keys import Kind, host_alive_key, kind_prefix, resource_key, status_key


def kv(value: object = "v", version: int = 3) -> KeyValue:
    return KeyValue("/k", value, create_revision=5, mod_revision=9, version=version)


def test_compare_on_an_existing_key() -> None:
    current = kv()
    assert compare_holds(Compare.value("/k", "==", "v"), current)
    assert compare_holds(Compare.value("/k", "!=", "w"), current)
    assert compare_holds(Compare.version("/k", ">", 2), current)
    assert compare_holds(Compare.create_revision("/k", "==", 5), current)
    assert compare_holds(Compare.mod_revision("/k", "<", 10), current)
    assert compare_holds(Compare.unchanged(current), current)
    assert not compare_holds(Compare.absent("/k"), current)


def test_compare_on_a_missing_key_follows_etcd() -> None:
    assert not compare_holds(Compare.value("/k", "==", None), None)
    assert not compare_holds(Compare.value("/k", "!=", "anything"), None)
    assert compare_holds(Compare.absent("/k"), None)
    assert compare_holds(Compare.mod_revision("/k", "==", 0), None)


def test_values_compare_as_canonical_json() -> None:
    assert encode_value({"b": 1, "a": 2}) == encode_value({"a": 2, "b": 1}) == b'{"a":2,"b":1}'
    assert compare_holds(Compare.value("/k", "==", {"a": 2, "b": 1}), kv({"b": 1, "a": 2}))


def test_revision_compares_refuse_non_integers() -> None:
    with pytest.raises(TypeError):
        Compare.mod_revision("/k", "==", "9")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Compare.version("/k", "==", True)
    with pytest.raises(ValueError, match="operator"):
        Compare("/k", Compare.absent("/k").target, "<=", 1)  # type: ignore[arg-type]


def test_prefix_end_is_the_first_key_after_the_prefix() -> None:
    assert prefix_end("/nubes/vms/") == "/nubes/vms0"
    assert prefix_end("/nubes/vms/") > "/nubes/vms/i-zzzzzzzzzz/status"


@pytest.mark.parametrize("key", ["", "/k\n", "/kë", "/k\x00"])
def test_keys_are_printable_ascii(key: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        check_key(key)


def test_the_key_layout() -> None:
    assert resource_key(Kind.VM, "i-0123456789") == "/nubes/vms/i-0123456789"
    assert status_key(Kind.VM, "i-0123456789") == "/nubes/vms/i-0123456789/status"
    assert host_alive_key("host1") == "/nubes/hosts/host1/alive"
    assert kind_prefix(Kind.SECURITY_GROUP) == "/nubes/security-groups/"
    with pytest.raises(ValueError, match="without '/'"):
        resource_key(Kind.VM, "../x")


def test_grpc_targets_for_etcd_endpoints() -> None:
    assert grpc_target(["127.0.0.1:2379"]) == "127.0.0.1:2379"
    assert grpc_target(["http://etcd.example:2379/"]) == "etcd.example:2379"
    assert grpc_target(["[::1]:2379"]) == "[::1]:2379"
    assert (
        grpc_target(["198.18.0.1:2379", "http://198.18.0.2:2379"])
        == "ipv4:198.18.0.1:2379,198.18.0.2:2379"
    )
    assert grpc_target(["[fd00::1]:2379", "[fd00::2]:2379"]) == "ipv6:[fd00::1]:2379,[fd00::2]:2379"


@pytest.mark.parametrize(
    ("endpoints", "complaint"),
    [
        (["https://127.0.0.1:2379"], "TLS"),
        (["127.0.0.1"], "host:port"),
        (["a.example:2379", "b.example:2379"], "is a name"),
        (["198.18.0.1:2379", "[fd00::1]:2379"], "mix"),
    ],
)
def test_bad_etcd_endpoints_are_configuration_errors(endpoints: list[str], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        grpc_target(endpoints)


def test_errors_carry_a_stable_code_and_a_hint() -> None:
    error = CompactedError(requested_revision=3, compact_revision=10)
    assert error.to_dict() == {
        "code": "store_compacted",
        "message": "revision 3 has been compacted (the oldest revision kept is 10)",
        "hint": "list the current state again and watch from its revision",
    }
    assert isinstance(LeaseNotFound(7), NubesError)
    assert str(NubesError("plain")) == "plain"


async def test_a_bell_rung_in_one_place_is_heard_in_another(tmp_path: Path) -> None:
    directory = bell_directory(tmp_path / "nubes.db")
    ringer, listener = ChangeBell(directory), ChangeBell(directory)
    heard = asyncio.Event()
    listener.listen(heard.set)
    try:
        ringer.ring()
        await asyncio.wait_for(heard.wait(), 5)
    finally:
        listener.close()
        ringer.close()
    assert list(directory.iterdir()) == [], "a closed listener removes its socket"


def test_ringing_before_anyone_listened_creates_nothing(tmp_path: Path) -> None:
    directory = bell_directory(tmp_path / "nubes.db")
    ringer = ChangeBell(directory)
    ringer.ring()
    ringer.close()
    assert not directory.exists()


async def test_a_bell_left_by_a_dead_process_is_cleaned_up(tmp_path: Path) -> None:
    directory = bell_directory(tmp_path / "nubes.db")
    ringer = ChangeBell(directory)
    directory.mkdir()
    stale = directory / "99999999-deadbeef.sock"
    orphan = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    orphan.bind(str(stale))
    orphan.close()  # bound then closed: the file stays, nobody listens
    try:
        ringer.ring()
    finally:
        ringer.close()
    assert not stale.exists()


def test_a_long_database_path_gets_a_short_bell_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120) / "nubes.db"
    directory = bell_directory(deep)
    assert len(str(directory)) <= 80
    assert directory == bell_directory(deep), "every process must find the same directory"
