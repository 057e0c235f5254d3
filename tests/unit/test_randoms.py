"""Pooled random tokens: the shape `secrets` gives, never repeated across refills."""

from __future__ import annotations

import re

from softswitch.sip import randoms
from softswitch.sip.dialog import new_call_id, new_tag
from softswitch.sip.transaction import new_branch


def test_tokens_have_the_shape_of_secrets_tokens() -> None:
    assert re.fullmatch(r"[0-9a-f]{12}", randoms.token_hex(6))
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", randoms.token_urlsafe(12))
    assert re.fullmatch(r"z9hG4bK[A-Za-z0-9_-]{16}", new_branch())
    assert re.fullmatch(r"[0-9a-f]{12}", new_tag())
    assert re.fullmatch(r"[0-9a-f]{20}@example\.test", new_call_id("example.test"))


def test_no_token_repeats_across_many_pool_refills() -> None:
    tokens = [randoms.token_urlsafe(12) for _ in range(5000)]  # ~15 refills of the pool
    assert len(set(tokens)) == len(tokens)


def test_a_request_larger_than_the_pool_is_served() -> None:
    assert len(randoms.RandomPool().take(10000)) == 10000


def test_urlsafe_tokens_are_unpadded_base64url_of_any_length() -> None:
    import base64

    for n in range(1, 20):
        token = randoms.token_urlsafe(n)
        assert len(token) == -(-4 * n // 3)
        assert len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) == n
