"""Settling a guarded write whose answer was lost: which transactions qualify, and how
etcd's history tells whether the first attempt landed (a fake history, no etcd)."""

from __future__ import annotations

from nubes.store.base import Compare, Delete, Get, KeyValue, Put
from nubes.store.etcd_outcome import Anchor, anchor_of, applied_at, first_change_after


class FakeHistory:
    """Versions of keys, each (revision, value or None for a delete), oldest first."""

    def __init__(self, versions: dict[str, list[tuple[int, object]]]) -> None:
        self.versions = versions

    def _at(self, key: str, revision: int) -> KeyValue | None:
        current: KeyValue | None = None
        created = 0
        for number, (mod, value) in enumerate(self.versions.get(key, [])):
            if mod > revision:
                break
            if value is None:
                current, created = None, 0
                continue
            created = created or mod
            current = KeyValue(key, value, created, mod, number + 1)
        return current

    async def get_now(self, key: str) -> KeyValue | None:
        return self._at(key, 10**9)

    async def get_at(self, key: str, revision: int) -> KeyValue | None:
        return self._at(key, revision)

    async def count_at(self, key: str, prefix: bool, revision: int) -> int:
        return 0 if self._at(key, revision) is None else 1


def test_a_create_guarded_by_absence_is_anchored_on_its_key() -> None:
    anchor = anchor_of([Compare.absent("/a")], [Put("/a", 1)], [])
    assert anchor == Anchor("/a", 0)


def test_a_swap_guarded_by_mod_revision_is_anchored_at_that_revision() -> None:
    kv = KeyValue("/a", 1, 3, 7, 2)
    assert anchor_of([Compare.unchanged(kv)], [Put("/a", 2)], [Get("/a")]) == Anchor("/a", 7)


def test_writes_that_could_apply_twice_have_no_anchor() -> None:
    assert anchor_of([], [Put("/a", 1)], []) is None
    assert anchor_of([Compare.absent("/b")], [Put("/a", 1)], []) is None  # guards another key
    assert anchor_of([Compare.absent("/a")], [Put("/a", 1)], [Put("/x", 1)]) is None
    assert anchor_of([Compare.absent("/a")], [Put("/a", 1), Get("/a")], []) is None
    assert anchor_of([Compare.value("/a", "==", 1)], [Put("/a", 2)], []) is None


async def test_a_create_that_landed_is_found_even_after_later_changes() -> None:
    history = FakeHistory({"/a": [(5, "ours"), (9, "bound")], "/n": [(5, "a")]})
    assert await first_change_after(history, Anchor("/a", 0)) == 5
    responses = await applied_at(history, 5, [Put("/a", "ours"), Put("/n", "a")])
    assert responses == [None, None]


async def test_a_create_someone_else_made_is_not_ours() -> None:
    history = FakeHistory({"/a": [(5, "theirs")]})
    assert await applied_at(history, 5, [Put("/a", "ours")]) is None


async def test_a_swap_is_judged_by_the_first_change_after_its_guard() -> None:
    history = FakeHistory({"/a": [(3, 1), (7, 2), (8, 3), (12, 4)]})
    assert await first_change_after(history, Anchor("/a", 7)) == 8
    assert await first_change_after(history, Anchor("/a", 12)) is None
    assert await applied_at(history, 8, [Put("/a", 3)]) == [None]
    assert await applied_at(history, 8, [Put("/a", 5)]) is None


async def test_a_key_deleted_and_made_again_since_the_guard_is_not_a_swap_of_ours() -> None:
    history = FakeHistory({"/a": [(3, 1), (5, None), (6, 2)]})
    assert await first_change_after(history, Anchor("/a", 3)) == 0


async def test_a_deletion_in_the_success_branch_reports_what_it_removed() -> None:
    history = FakeHistory({"/a": [(5, "ours")], "/old": [(2, "x"), (5, None)]})
    assert await applied_at(history, 5, [Put("/a", "ours"), Delete("/old")]) == [None, 1]
