from __future__ import annotations

import pytest

from nubes.errors import InvalidId
from nubes.ids import IdKind, is_id, kind_of, new_id, validate_id


@pytest.mark.parametrize("kind", list(IdKind))
def test_new_ids_have_the_seed_format_and_validate(kind: IdKind) -> None:
    value = new_id(kind)
    prefix, suffix = value.rsplit("-", 1)
    assert prefix == kind.value
    assert len(suffix) == 10
    assert suffix.isalnum()
    assert suffix == suffix.lower()
    assert validate_id(value, kind) == value
    assert kind_of(value) is kind


def test_the_seed_examples_are_accepted() -> None:
    assert kind_of("i-0123456789") is IdKind.VM
    assert kind_of("vpc-abcdefghij") is IdKind.NETWORK
    assert kind_of("subnet-a1b2c3d4e5") is IdKind.SUBNET
    for prefix, kind in [("port", IdKind.PORT), ("vol", IdKind.VOLUME), ("img", IdKind.IMAGE)]:
        assert kind_of(f"{prefix}-zzzzzzzzzz") is kind
    assert kind_of("sg-0000000000") is IdKind.SECURITY_GROUP
    assert kind_of("fip-9999999999") is IdKind.FLOATING_IP


def test_ids_are_random() -> None:
    assert len({new_id(IdKind.VM) for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    "value",
    [
        "",
        "i-",
        "i-012345678",  # too short
        "i-0123456789a",  # too long
        "i-ABCDEFGHIJ",  # upper case
        "I-abcdefghij",
        "x-abcdefghij",  # unknown kind
        "i_abcdefghij",
        "i-abcdefghi\n",
        "i-abcdefghij\n",  # a trailing newline must not slip through
        " i-abcdefghij",
        "i-abcdéfghij",  # not ASCII
        "i-١٢٣٤٥٦٧٨٩٠",  # Arabic-Indic digits are digits to \d, not to nubes
        "i-abc/efghij",
        "../etc/passw",
        "vpc-abcdefghij-x",
    ],
)
def test_malformed_ids_are_rejected_with_a_clear_message(value: str) -> None:
    with pytest.raises(InvalidId) as raised:
        kind_of(value)
    assert "is not a nubes id" in str(raised.value)
    assert raised.value.code == "invalid_id"
    assert raised.value.http_status == 400


def test_an_id_of_another_kind_is_rejected() -> None:
    with pytest.raises(InvalidId) as raised:
        validate_id("vol-abcdefghij", IdKind.VM)
    assert "is a volume id, not a vm id" in str(raised.value)


def test_non_strings_are_rejected() -> None:
    with pytest.raises(InvalidId):
        kind_of(42)  # type: ignore[arg-type]


def test_error_messages_do_not_echo_huge_input() -> None:
    with pytest.raises(InvalidId) as raised:
        kind_of("i-" + "a" * 10_000)
    assert len(raised.value.message) < 100


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        ("i-0123456789", IdKind.VM, True),
        ("vol-0123456789", IdKind.VM, False),
        ("i-0123456789\n", IdKind.VM, False),
        ("../etc", IdKind.VM, False),
        ("vol-abcdefghij", IdKind.VOLUME, True),
    ],
)
def test_is_id_says_whether_a_name_is_an_id_of_a_kind_without_raising(
    value: str, kind: IdKind, expected: bool
) -> None:
    assert is_id(value, kind) is expected
