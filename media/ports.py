"""RTP/RTCP port pair allocation from the configured range. Sans-I/O, O(1) per operation.

RTP gets the even port, RTCP the next odd one (RFC 3550 §11). Free pairs wait in a FIFO: a
released pair goes to the back, so it is reused as late as possible and stray packets of the
call that just ended do not reach the next one. Binding is not done here (that is the endpoint's
job); a pair that fails to bind because another process holds it is handed back with `mark_bad`
and is retried only after every other free pair.
"""

from __future__ import annotations

from collections import deque

from media.errors import PortsExhausted


class PortAllocator:
    """Hands out even RTP ports (RTCP = RTP + 1) from `low..high` inclusive, each once."""

    __slots__ = ("_free", "_in_use", "bind_failures", "capacity", "high", "low")

    def __init__(self, low: int, high: int) -> None:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {low}-{high}")
        first = low + (low & 1)  # an odd low bound starts at the next even port
        self._free: deque[int] = deque(range(first, high, 2))  # stop at high: RTCP must fit
        if not self._free:
            raise ValueError(f"port range {low}-{high} holds no RTP/RTCP pair")
        self._in_use: set[int] = set()
        self.low = low
        self.high = high
        self.capacity = len(self._free)
        self.bind_failures = 0

    @property
    def free(self) -> int:
        """Pairs that can still be allocated."""
        return len(self._free)

    @property
    def in_use(self) -> int:
        """Pairs allocated and not yet released."""
        return len(self._in_use)

    def allocate(self) -> int:
        """The RTP port of a free pair; raise `PortsExhausted` if there is none."""
        try:
            port = self._free.popleft()
        except IndexError:
            raise PortsExhausted(f"all {self.capacity} RTP port pairs are in use") from None
        self._in_use.add(port)
        return port

    def release(self, port: int) -> bool:
        """Return a pair to the pool. Idempotent: False if `port` was not allocated.

        Idempotence matters more than strictness here: call teardown runs from several paths
        (BYE, CANCEL, timeouts) and a double release must neither crash nor free a pair twice.
        """
        if port not in self._in_use:
            return False
        self._in_use.remove(port)
        self._free.append(port)
        return True

    def mark_bad(self, port: int) -> None:
        """Give back a pair that could not be bound: it goes to the back of the queue."""
        if self.release(port):
            self.bind_failures += 1
