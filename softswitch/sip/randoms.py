"""Unguessable tokens (branches, tags, Call-IDs) cut from a pooled CSPRNG buffer.

Branches, tags and Call-IDs must be unguessable: an off-path attacker who could predict them
could inject responses or requests into our transactions and dialogs. `secrets` gives that but
costs one `getrandom` system call per token, and a call to a shared line needs dozens of tokens
(a branch per fork, per CANCEL, per in-dialog request). The same OS randomness drawn 4 KiB at a
time costs one system call per ~300 tokens.
"""

from __future__ import annotations

import binascii
import os

_SIZE = 4096


class RandomPool:
    """Random bytes from `os.urandom`, handed out in slices."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        pos = self._pos
        if pos + n > len(self._buf):
            self._buf = os.urandom(max(_SIZE, n))
            pos = 0
        self._pos = pos + n
        return self._buf[pos : pos + n]


_POOL = RandomPool()
_URLSAFE = bytes.maketrans(b"+/", b"-_")  # base64 -> base64url (RFC 4648 §5)


def token_urlsafe(nbytes: int) -> str:
    """Like `secrets.token_urlsafe`: base64url text of `nbytes` random bytes, unpadded."""
    # binascii directly: `base64.urlsafe_b64encode` is two interpreted calls around the same
    # C function, and a 16-way fork draws 50 tokens.
    raw = binascii.b2a_base64(_POOL.take(nbytes), newline=False)
    return raw.translate(_URLSAFE).rstrip(b"=").decode()


def random_bytes(nbytes: int) -> bytes:
    """Like `os.urandom`, from the pool."""
    return _POOL.take(nbytes)


def token_hex(nbytes: int) -> str:
    """Like `secrets.token_hex`."""
    return _POOL.take(nbytes).hex()
