"""Waiting for something a real peer or the service does a moment later, bounded in time.

A timeout here bounds the test (the brief: every wait is bounded); it is not a claim about
speed, which the benchmarks in scripts/ measure. So it raises `WaitTimeout` naming what never
happened, rather than asserting on the clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What a test waited for did not happen within its bound (fails the test like an assert)."""


def eventually(
    check: Callable[[], T | None],
    what: str | Callable[[], str],
    timeout: float = 5.0,
    interval: float = 0.1,
) -> T:
    """Poll ``check`` until it returns something truthy, and return that.

    ``what`` may be a callable, asked only on timeout: the failure then shows the state that
    was last seen (the bindings listed, the response received).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out waiting for {what if isinstance(what, str) else what()}")
        time.sleep(interval)
