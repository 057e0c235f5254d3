"""RTP/RTCP port pair allocation."""

from __future__ import annotations

import random

import pytest

from media import PortAllocator, PortsExhausted


def test_pairs_are_even_with_rtcp_inside_the_range() -> None:
    ports = PortAllocator(20000, 20009)
    got = [ports.allocate() for _ in range(ports.capacity)]
    assert got == [20000, 20002, 20004, 20006, 20008]
    assert all(p % 2 == 0 and p + 1 <= 20009 for p in got)


def test_odd_bounds_are_handled() -> None:
    ports = PortAllocator(20001, 20008)  # 20001 has no RTP partner, 20008 no RTCP one
    assert ports.capacity == 3
    assert [ports.allocate() for _ in range(3)] == [20002, 20004, 20006]


def test_exhaustion_raises_and_release_returns() -> None:
    ports = PortAllocator(20000, 20003)
    a, b = ports.allocate(), ports.allocate()
    assert (ports.free, ports.in_use) == (0, 2)
    with pytest.raises(PortsExhausted):
        ports.allocate()
    assert ports.release(a)
    assert ports.allocate() == a
    assert ports.release(b) and not ports.release(b)  # idempotent
    assert not ports.release(30000)


def test_released_pairs_are_reused_last() -> None:
    ports = PortAllocator(20000, 20007)
    first = ports.allocate()
    ports.release(first)
    assert [ports.allocate() for _ in range(4)] == [20002, 20004, 20006, first]


def test_bad_pairs_go_to_the_back_and_are_counted() -> None:
    ports = PortAllocator(20000, 20005)
    bad = ports.allocate()
    ports.mark_bad(bad)
    assert ports.bind_failures == 1 and ports.in_use == 0
    assert [ports.allocate() for _ in range(3)] == [20002, 20004, bad]


@pytest.mark.parametrize(
    ("low", "high"), [(0, 100), (100, 99), (20000, 70000), (20000, 20000), (20001, 20002)]
)
def test_bad_ranges_are_refused(low: int, high: int) -> None:
    with pytest.raises(ValueError):
        PortAllocator(low, high)


def test_random_allocate_release_never_hands_out_a_port_twice() -> None:
    rng = random.Random(4242)
    ports = PortAllocator(10000, 10199)
    held: set[int] = set()
    for _ in range(20_000):
        action = rng.random()
        if action < 0.5:
            try:
                port = ports.allocate()
            except PortsExhausted:
                assert len(held) == ports.capacity
                continue
            assert port not in held
            held.add(port)
        elif held and action < 0.95:
            port = rng.choice(sorted(held))
            held.remove(port)
            assert ports.release(port)
        else:
            assert not ports.release(rng.randrange(9000, 11000) | 1)  # odd: never ours
        assert ports.in_use == len(held) and ports.free == ports.capacity - len(held)
