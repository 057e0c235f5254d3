"""StatelessReplies: answers kept by request key, in age order, bounded in number and age."""

from __future__ import annotations

from softswitch.stateless import StatelessReplies


def test_an_answer_is_kept_until_its_time_then_forgotten() -> None:
    replies = StatelessReplies(ttl=16.0)
    assert replies.get_timer() is None
    replies.put("a", b"401 a", now=100.0)
    replies.put("b", b"401 b", now=105.0)
    assert replies.get("a") == b"401 a" and replies.get("x") is None
    assert replies.get_timer() == 116.0  # the oldest one's expiry
    replies.handle_timer(115.9)
    assert len(replies) == 2
    replies.handle_timer(116.0)
    assert replies.get("a") is None and replies.get("b") == b"401 b"
    assert replies.get_timer() == 121.0
    replies.handle_timer(130.0)
    assert len(replies) == 0 and replies.get_timer() is None


def test_the_oldest_goes_first_when_full_and_a_repeat_counts_as_new() -> None:
    replies = StatelessReplies(limit=2)
    replies.put("a", b"1", now=1.0)
    replies.put("b", b"2", now=2.0)
    replies.put("a", b"3", now=3.0)  # "a" again: now the youngest
    replies.put("c", b"4", now=4.0)  # over the limit: "b", the oldest, goes
    assert (replies.get("a"), replies.get("b"), replies.get("c")) == (b"3", None, b"4")
    assert replies.get_timer() == 3.0 + replies.ttl
