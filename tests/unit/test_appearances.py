"""Appearance numbers of shared lines: allocation, seizing, lapsing, and release on every path."""

from __future__ import annotations

import pytest

from softswitch.appearances import DEFAULT_SIZE, Appearances

SUB_A = ("ls-call-a", "tag-a")
SUB_B = ("ls-call-b", "tag-b")


def indices(table: Appearances, line: str = "1001") -> list[tuple[int, str | None]]:
    return [(a.index, a.call_id) for a in table.of_line(line)]


def test_calls_take_the_lowest_free_index_and_keep_it() -> None:
    t = Appearances()
    assert t.bind("1001", "c1") is not None
    assert t.bind("1001", "c2") is not None
    assert t.bind("1001", "c3") is not None
    assert indices(t) == [(1, "c1"), (2, "c2"), (3, "c3")]
    assert t.release("1001", "c2") is not None
    assert t.index_of("1001", "c3") == 3  # the others do not move
    app = t.bind("1001", "c4")
    assert app is not None and app.index == 2  # the hole is reused
    assert t.bind("1001", "c1") is t.at("1001", 1)  # binding again returns the same


def test_lines_are_independent() -> None:
    t = Appearances()
    t.bind("1001", "c1")
    t.bind("1005", "c1")  # one call on two lines (the caller's and the callee's)
    assert t.index_of("1001", "c1") == 1 and t.index_of("1005", "c1") == 1
    t.release("1001", "c1")
    assert t.index_of("1005", "c1") == 1 and t.index_of("1001", "c1") is None


def test_a_wanted_index_is_used_when_free_otherwise_the_lowest() -> None:
    t = Appearances()
    app = t.bind("1001", "c1", 5)
    assert app is not None and app.index == 5
    app = t.bind("1001", "c2", 5)
    assert app is not None and app.index == 1
    app = t.bind("1001", "c3", 99)  # out of range
    assert app is not None and app.index == 2


def test_a_full_line_has_no_appearance_for_one_more_call() -> None:
    t = Appearances(size=2)
    assert t.bind("1001", "c1") and t.bind("1001", "c2")
    assert t.bind("1001", "c3") is None
    assert t.seize("1001", SUB_A, 100.0) is None
    t.release("1001", "c1")
    app = t.bind("1001", "c3")
    assert app is not None and app.index == 1


def test_default_size_and_bad_size() -> None:
    assert Appearances().size == DEFAULT_SIZE == 24
    with pytest.raises(ValueError):
        Appearances(size=0)


def test_seize_a_given_index_or_any() -> None:
    t = Appearances()
    a = t.seize("1001", SUB_A, 15.0, 3)
    assert a is not None and a.index == 3 and a.seized and a.owner == SUB_A
    assert t.seize("1001", SUB_B, 15.0, 3) is None  # taken: refused, no fallback
    b = t.seize("1001", SUB_B, 15.0)
    assert b is not None and b.index == 1
    assert t.bind("1001", "c1") is not None and t.index_of("1001", "c1") == 2
    assert t.seize("1001", SUB_B, 15.0, 0) is None and t.seize("1001", SUB_B, 15.0, 25) is None


def test_dialling_on_a_seized_index_turns_it_into_the_call() -> None:
    t = Appearances()
    a = t.seize("1001", SUB_A, 15.0, 4)
    assert a is not None
    t.take(a, "c1")
    assert t.index_of("1001", "c1") == 4 and not a.seized and a.deadline is None
    assert t.expire(100.0) == []  # no longer lapses
    assert not t.unseize(a, SUB_A)  # an unseize after dialling leaves the call alone
    assert t.index_of("1001", "c1") == 4
    with pytest.raises(ValueError):
        t.take(a, "c2")


def test_take_moves_a_provisional_index() -> None:
    t = Appearances()
    t.bind("1001", "c1", until=32.0)  # handed out for a fork before the call showed
    a = t.seize("1001", SUB_A, 15.0)
    assert a is not None and a.index == 2
    t.take(a, "c1")
    assert indices(t) == [(2, "c1")]


def test_unseize_only_by_the_owner() -> None:
    t = Appearances()
    a = t.seize("1001", SUB_A, 15.0)
    assert a is not None
    assert not t.unseize(a, SUB_B)
    assert t.unseize(a, SUB_A)
    assert indices(t) == [] and len(t) == 0
    assert not t.unseize(a, SUB_A)  # twice is harmless


def test_seizures_lapse_unless_extended() -> None:
    t = Appearances()
    a = t.seize("1001", SUB_A, 15.0)
    b = t.seize("1001", SUB_B, 15.0)
    assert a is not None and b is not None
    assert t.next_deadline() == 15.0
    assert t.extend(b, 30.0)
    assert t.expire(14.9) == []
    assert t.expire(15.0) == [a]
    assert t.next_deadline() == 30.0
    assert t.expire(30.0) == [b]
    assert len(t) == 0 and t.next_deadline() is None
    assert not t.extend(a, 60.0)  # gone: nothing to extend


def test_provisional_bindings_lapse_unless_confirmed() -> None:
    t = Appearances()
    t.bind("1001", "c1", until=32.0)
    t.bind("1001", "c2", until=32.0)
    t.confirm("1001", "c1")
    t.bind("1001", "c2")  # binding again without a deadline confirms too
    t.bind("1001", "c3", until=32.0)
    gone = t.expire(40.0)
    assert [a.call_id for a in gone] == ["c3"]
    assert indices(t) == [(1, "c1"), (2, "c2")]


def test_release_is_idempotent_and_clears_everything() -> None:
    t = Appearances()
    t.bind("1001", "c1")
    assert t.release("1001", "c1") is not None
    assert t.release("1001", "c1") is None
    assert t.release("1009", "nope") is None
    assert t.stats() == (0, 0, 0, 0)


def test_memory_is_bounded_under_churn() -> None:
    """Thousands of calls and refreshed seizures leave nothing behind."""
    t = Appearances()
    now = 0.0
    for n in range(5000):
        t.bind("1001", f"c{n}", until=now + 32)
        t.confirm("1001", f"c{n}")
        a = t.seize("1001", ("s", str(n)), now + 15)
        assert a is not None
        for _ in range(3):
            t.extend(a, now + 15)
        t.unseize(a, ("s", str(n)))
        t.release("1001", f"c{n}")
        now += 1
        t.expire(now)
    stats = t.stats()
    assert stats.lines == 0 and stats.appearances == 0
    assert stats.deadlines <= 64 + 8  # stale heap entries are compacted


def test_clear_empties_the_table() -> None:
    """What a restart amounts to: nothing survives."""
    t = Appearances()
    t.bind("1001", "c1")
    t.seize("1001", SUB_A, 15.0)
    t.clear()
    assert len(t) == 0 and t.of_line("1001") == [] and t.next_deadline() is None
