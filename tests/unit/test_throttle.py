"""Throttling of repeated authentication failures."""

from softswitch.throttle import FailureThrottle


def test_blocks_after_max_failures_within_window() -> None:
    t = FailureThrottle(max_failures=3, window=60, block_time=30)
    assert not t.record_failure("10.0.0.1", 0)
    assert not t.record_failure("10.0.0.1", 1)
    assert t.record_failure("10.0.0.1", 2)
    assert t.blocked("10.0.0.1", 3)
    assert not t.blocked("10.0.0.2", 3)
    assert not t.blocked("10.0.0.1", 33)


def test_failures_outside_the_window_do_not_count() -> None:
    t = FailureThrottle(max_failures=3, window=10, block_time=30)
    t.record_failure("a", 0)
    t.record_failure("a", 5)
    assert not t.record_failure("a", 16)
    assert not t.blocked("a", 16)


def test_prune_forgets_old_sources() -> None:
    t = FailureThrottle(max_failures=3, window=10, block_time=5)
    for i in range(100):
        t.record_failure(f"s{i}", 0)
    t.prune(100)
    assert not t._failures and not t._blocked_until
