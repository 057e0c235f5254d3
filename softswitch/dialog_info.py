"""Dialog-info documents (RFC 4235, with RFC 7463's `exclusive`) for the calls on one line.

A BLF key or a shared-line appearance is drawn from these documents: a lamp that stays lit
after the call is the most reported bug of existing servers, so the format is kept boring and
complete. Every document is full state (`state="full"`) and lists each call of the line once,
under a dialog `id` that is the B2BUA call's id: it stays the same while the call rings on forked
branches, is answered and held, so no branch can leave a stale "early" dialog behind. A call
that just ended is listed once more as `terminated`, then never again; an idle line is a
document without dialogs.

The body is the same for every watcher of a line except the `version` attribute, which RFC 4235
scopes to each subscription. `document()` therefore renders once and leaves the version open;
`Document.body(version)` fills it in with one concatenation per watcher.

Text is built by hand rather than with ElementTree: the element order RFC 4235's schema
requires is explicit here, escaping is done in one place, and it is several times faster.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .lines import CallState, Direction, LineCall, LineEvent

#: A call as `document` reads it: a LineCall of the model, or the LineEvent that ended one.
Shown = LineCall | LineEvent

NAMESPACE = "urn:ietf:params:xml:ns:dialog-info"
SA_NAMESPACE = "urn:ietf:params:xml:ns:sa-dialog-info"  # RFC 7463
CONTENT_TYPE = "application/dialog-info+xml"

_STATES = {
    CallState.RINGING: "early",
    # We cannot tell a DIALING call that has seen no 18x yet from one that has: "early" is what
    # phones expect of an outgoing call that is not answered, whatever the far end said so far.
    CallState.DIALING: "early",
    CallState.ACTIVE: "confirmed",
    CallState.HELD: "confirmed",
    CallState.ENDED: "terminated",
}

_DIRECTIONS = {Direction.INBOUND: "recipient", Direction.OUTBOUND: "initiator"}

#: LineEvent reasons -> the RFC 4235 `event` attribute of a terminated state. A plain "bye" is
#: left out on purpose: local-bye and remote-bye say who hung up, which "bye" does not.
TERMINATION_EVENTS = {
    "cancel": "cancelled",
    "cancelled": "cancelled",
    "busy": "rejected",
    "decline": "rejected",
    "rejected": "rejected",
    "no answer": "rejected",
    "replaced": "replaced",
    "transferred": "replaced",  # the B2BUA joined the call elsewhere (RFC 3515, RFC 3891)
    "local-bye": "local-bye",
    "remote-bye": "remote-bye",
    "timeout": "timeout",
    "no ack": "timeout",
    "error": "error",
}

# Characters XML 1.0 cannot carry at all (controls, lone surrogates from a surrogateescape'd
# display name, U+FFFE/U+FFFF): replaced, since one of them would make the whole NOTIFY body
# unparseable and every lamp on the line would stop updating.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
_ATTR_ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        '"': "&quot;",
        "\t": "&#9;",
        "\n": "&#10;",
        "\r": "&#13;",
    }
)
# What a SIP URI's user part may hold unescaped (RFC 3261 §25.1: unreserved, user-unreserved).
_USER_SAFE = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()&=+$,;?/"
)


def _clean(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def text(value: str) -> str:
    """`value` as XML character data."""
    return _clean(value).translate(_TEXT_ESCAPES)


def attr(value: str) -> str:
    """`value` as the inside of a double-quoted XML attribute."""
    return _clean(value).translate(_ATTR_ESCAPES)


def sip_uri(user: str, domain: str) -> str:
    """`sip:user@domain`, with characters a user part may not hold %-escaped.

    A remote party's "number" comes from a From header and may be anything (`anonymous`, a
    name with spaces); a malformed URI in the document would make phones drop the whole of it.
    """
    if all(c in _USER_SAFE for c in user):
        return f"sip:{user}@{domain}"
    escaped = "".join(
        c if c in _USER_SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8", "replace"))
        for c in user
    )
    return f"sip:{escaped}@{domain}"


def entity_uri(entity: str, domain: str) -> str:
    """The `entity` attribute: a line extension becomes `sip:ext@domain`, a URI stays as is."""
    if entity.startswith(("sip:", "sips:")):
        return entity
    return sip_uri(entity, domain)


@dataclass(frozen=True, slots=True)
class Document:
    """A rendered dialog-info body whose `version` attribute is still open."""

    head: bytes
    tail: bytes

    def body(self, version: int) -> bytes:
        """The document with `version` filled in (RFC 4235: per subscription, from 0 up)."""
        return b"".join((self.head, str(version).encode("ascii"), self.tail))


def document(
    entity: str,
    calls: Iterable[LineCall],
    domain: str,
    now: float,
    terminated: Iterable[LineEvent] = (),
    names: Mapping[str, str] | None = None,
) -> Document:
    """Render the line's full state once, for any number of watchers.

    `calls` are the line's current calls; `terminated` the ENDED events of calls that just
    ended, shown once with state `terminated` and their reason as the RFC 4235 `event`; `now`
    the wall clock `<duration>` counts to; `names` our users' display names (Directory.names),
    for the local identity.
    """
    names = names or {}
    head = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<dialog-info xmlns="{NAMESPACE}" xmlns:sa="{SA_NAMESPACE}" version="'
    )
    parts = [f'" state="full" entity="{attr(entity_uri(entity, domain))}">\n']
    for call in calls:
        parts.append(_dialog(call, call.state, None, domain, now, names))
    for ended in terminated:
        parts.append(_dialog(ended, CallState.ENDED, ended.reason, domain, now, names))
    parts.append("</dialog-info>\n")
    return Document(head.encode("utf-8"), "".join(parts).encode("utf-8"))


def render(
    entity: str,
    version: int,
    calls: Iterable[LineCall],
    domain: str,
    now: float,
    terminated: Iterable[LineEvent] = (),
    names: Mapping[str, str] | None = None,
) -> bytes:
    """One dialog-info document: `document(...).body(version)`."""
    return document(entity, calls, domain, now, terminated, names).body(version)


def _dialog(
    call: Shown,
    state: CallState,
    reason: str | None,
    domain: str,
    now: float,
    names: Mapping[str, str],
) -> str:
    """One `<dialog>`, its children in the order of RFC 4235's schema (§4.1).

    The phone is the local side of the dialog as the watched user's phone sees it, so
    local-tag is the phone's tag and remote-tag ours: that is what a phone quotes in
    `Replaces` to pick the call up. Empty tags (a ringing call nobody answered) are omitted.
    """
    out = [f'  <dialog id="{attr(call.call_id)}"']
    if call.dialog is not None:
        call_id, phone_tag, our_tag = call.dialog
        out.append(f' call-id="{attr(call_id)}"')
        if phone_tag:
            out.append(f' local-tag="{attr(phone_tag)}"')
        if our_tag:
            out.append(f' remote-tag="{attr(our_tag)}"')
    out.append(f' direction="{_DIRECTIONS[call.direction]}">\n')
    out.append(_state(state, reason))
    out.append(f"    <duration>{max(0, int(now - call.started_at))}</duration>\n")
    if call.party is not None:
        out.append(_local(call, state, domain, names))
    out.append(_remote(call, domain))
    if state is not CallState.ENDED:
        # RFC 7463: a privately held call may not be retrieved or joined from another phone.
        out.append(f"    <sa:exclusive>{'true' if call.private else 'false'}</sa:exclusive>\n")
    out.append("  </dialog>\n")
    return "".join(out)


def _state(state: CallState, reason: str | None) -> str:
    event = TERMINATION_EVENTS.get(reason or "") if state is CallState.ENDED else None
    attrs = f' event="{event}"' if event else ""
    return f"    <state{attrs}>{_STATES[state]}</state>\n"


def _local(call: Shown, state: CallState, domain: str, names: Mapping[str, str]) -> str:
    """Which member uses the line; `+sip.rendering` says whether it hears the call.

    RFC 4235's schema names the value attribute `pval`; Asterisk and FreeSWITCH send
    `pvalue`, and phones were tuned against them: both are written. The parameter is only
    meaningful once there is media, so early and terminated dialogs go without it.
    """
    assert call.party is not None
    uri = attr(sip_uri(call.party, domain))
    out = [f"    <local>\n      <identity{_display(names.get(call.party))}>{uri}</identity>\n"]
    if state in (CallState.ACTIVE, CallState.HELD):
        rendering = "no" if state is CallState.HELD else "yes"
        out.append(
            f'      <target uri="{uri}">\n'
            f'        <param pname="+sip.rendering" pval="{rendering}" pvalue="{rendering}"/>\n'
            "      </target>\n"
        )
    else:
        out.append(f'      <target uri="{uri}"/>\n')
    out.append("    </local>\n")
    return "".join(out)


def _remote(call: Shown, domain: str) -> str:
    uri = attr(sip_uri(call.remote, domain))
    return (
        f"    <remote>\n      <identity{_display(call.remote_name)}>{uri}</identity>\n"
        f'      <target uri="{uri}"/>\n    </remote>\n'
    )


def _display(name: str | None) -> str:
    return f' display="{attr(name)}"' if name else ""
