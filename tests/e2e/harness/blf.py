"""BLF watchers for the e2e tests: what a desk phone's busy-lamp keys do with ``Event: dialog``.

Why two watchers:
* ``BlfWatcher`` is a raw UDP watcher in Python (on ``sipclient``'s socket, framing and
  digest). A background thread answers every NOTIFY at once, as a phone does: the service
  keeps one NOTIFY in flight per subscription and coalesces the changes that happen
  meanwhile, so a watcher that answers late would see fewer states than really happened.
  The test reads the documents live (``wait_for``) to build ``Replaces`` headers from them
  and to step through a call in lock step with the NOTIFYs.
* SIPp (``scenarios/blf_watch.xml``) is an independent SIP stack with its own digest code;
  ``sipp_documents`` reads back what it received from its message trace.

Neither baresip 1.0.0 nor linphone 5.1.65 can subscribe to the dialog package (see
/work/shared/interop/README.md §6), hence no "real phone" watcher.

Documents are parsed with ElementTree, as a phone would; ``DialogInfo.label`` reduces one to
the state a lamp shows (idle, ringing, active, held, ended) so sequences can be compared with
the HTTP event stream's states.
"""

from __future__ import annotations

import contextlib
import queue
import re
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .sipclient import (
    LOOPBACK,
    SipClient,
    SipMessage,
    SipParseError,
    SipTimeout,
    build_authorization,
    challenges_of,
    choose_challenge,
    contacts_of,
    new_tag,
)
from .sipp import read_message_trace

NS = {"d": "urn:ietf:params:xml:ns:dialog-info", "sa": "urn:ietf:params:xml:ns:sa-dialog-info"}
CONTENT_TYPE = "application/dialog-info+xml"


# --------------------------------------------------------------------------------------------
# documents


@dataclass(frozen=True)
class DialogEntry:
    """One ``<dialog>`` of a dialog-info document (RFC 4235 §4.1)."""

    id: str
    call_id: str
    local_tag: str
    remote_tag: str
    direction: str
    state: str  # early, confirmed, terminated...
    event: str  # the state's event attribute (terminated: local-bye, replaced...)
    local_identity: str
    rendering: str | None  # +sip.rendering of the local target: "yes", "no" or None
    remote_identity: str
    exclusive: str | None  # sa:exclusive (RFC 7463): "true" for a privately held call

    @property
    def label(self) -> str:
        """What a lamp shows for this dialog: ringing, active, held or ended."""
        if self.state == "terminated":
            return "ended"
        if self.state == "confirmed":
            return "held" if self.rendering == "no" else "active"
        return "ringing"  # trying, proceeding, early

    def replaces(self, *, early_only: bool = False) -> str:
        """A ``Replaces`` value (RFC 3891) for the party's dialog, as a phone builds it from
        the NOTIFY: the watched phone's tag is its from-tag, the switch's tag its to-tag."""
        value = f"{self.call_id};to-tag={self.remote_tag};from-tag={self.local_tag}"
        return value + (";early-only" if early_only else "")


@dataclass(frozen=True)
class DialogInfo:
    """One received dialog-info document with what came with it."""

    version: int
    state: str  # "full" or "partial"
    entity: str
    dialogs: tuple[DialogEntry, ...]
    subscription_state: str
    cseq: int
    raw: bytes
    received_at: float = field(default_factory=time.monotonic)

    @property
    def idle(self) -> bool:
        return not self.dialogs

    @property
    def label(self) -> str:
        """The lamp's state: ``idle`` or the labels of the dialogs, joined with ``+``."""
        return "+".join(d.label for d in self.dialogs) if self.dialogs else "idle"

    def dialog(self) -> DialogEntry:
        """The only dialog of the document (fails clearly if there is not exactly one)."""
        if len(self.dialogs) != 1:
            raise AssertionError(f"expected one dialog, got {self.describe()}")
        return self.dialogs[0]

    def describe(self) -> str:
        parts = [
            f"{d.label}[{d.state}{'/' + d.event if d.event else ''} local={d.local_identity} "
            f"remote={d.remote_identity} render={d.rendering} excl={d.exclusive}]"
            for d in self.dialogs
        ]
        return f"v{self.version} ({self.subscription_state}): " + (", ".join(parts) or "idle")


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_dialog_info(body: bytes, subscription_state: str = "", cseq: int = 0) -> DialogInfo:
    """Parse a dialog-info+xml body (raises ``ValueError`` on a malformed one)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise ValueError(f"malformed dialog-info: {exc}\n{body!r}") from exc
    if root.tag != f"{{{NS['d']}}}dialog-info":
        raise ValueError(f"not a dialog-info document: {root.tag}")
    entries = []
    for d in root.findall("d:dialog", NS):
        state_el = d.find("d:state", NS)
        rendering = None
        for param in d.findall("d:local/d:target/d:param", NS):
            if param.get("pname") == "+sip.rendering":
                rendering = param.get("pvalue") or param.get("pval")
        entries.append(
            DialogEntry(
                id=d.get("id", ""),
                call_id=d.get("call-id", ""),
                local_tag=d.get("local-tag", ""),
                remote_tag=d.get("remote-tag", ""),
                direction=d.get("direction", ""),
                state=(state_el.text or "").strip() if state_el is not None else "",
                event=state_el.get("event", "") if state_el is not None else "",
                local_identity=(d.findtext("d:local/d:identity", "", NS) or "").strip(),
                rendering=rendering,
                remote_identity=(d.findtext("d:remote/d:identity", "", NS) or "").strip(),
                exclusive=d.findtext("sa:exclusive", None, NS),
            )
        )
    return DialogInfo(
        version=int(root.get("version", "-1")),
        state=root.get("state", ""),
        entity=root.get("entity", ""),
        dialogs=tuple(entries),
        subscription_state=subscription_state,
        cseq=cseq,
        raw=body,
    )


def document_of(msg: SipMessage) -> DialogInfo:
    """The dialog-info document a NOTIFY carries."""
    ctype = (msg.get("content-type") or "").split(";")[0].strip().lower()
    if ctype != CONTENT_TYPE:
        raise ValueError(f"NOTIFY with Content-Type {ctype!r}:\n{msg.text()}")
    cseq = int((msg.get("cseq") or "0").split()[0])
    return parse_dialog_info(msg.body, msg.get("subscription-state") or "", cseq)


def labels(docs: Iterable[DialogInfo]) -> list[str]:
    """Lamp states of ``docs`` with consecutive repeats collapsed (a refresh repeats one)."""
    out: list[str] = []
    for doc in docs:
        if not out or out[-1] != doc.label:
            out.append(doc.label)
    return out


def sipp_documents(trace: Path) -> list[DialogInfo]:
    """The dialog-info documents of every NOTIFY in a SIPp ``-trace_msg`` file, in order,
    retransmissions (same CSeq) dropped."""
    out: list[DialogInfo] = []
    seen: set[int] = set()
    for direction, msg in read_message_trace(trace):
        if direction != "received" or msg.is_response or msg.method != "NOTIFY":
            continue
        doc = document_of(msg)
        if doc.cseq not in seen:
            seen.add(doc.cseq)
            out.append(doc)
    return out


# --------------------------------------------------------------------------------------------
# the Python watcher


class SubscribeError(AssertionError):
    """The service refused or ignored a SUBSCRIBE we expected it to accept."""


class BlfWatcher:
    """One subscription to ``line``'s dialog state, as member ``user`` (digest, 407 first).

    A daemon thread owns the socket's receive side: NOTIFYs are answered 200 immediately and
    their documents appended to ``docs`` (retransmissions dropped by CSeq); responses are
    handed to the thread running a SUBSCRIBE transaction. All waits are bounded.
    """

    def __init__(
        self,
        server: tuple[str, int],
        line: str,
        user: str,
        password: str,
        *,
        domain: str = LOOPBACK,
        expires: int = 600,
    ) -> None:
        self.client = SipClient(server, "udp", timeout=5.0)
        self.line = line
        self.user = user
        self.password = password
        self.domain = domain
        self.expires = expires
        self.docs: list[DialogInfo] = []
        self.notifies: list[SipMessage] = []
        self.errors: list[str] = []
        self.call_id = ""
        self.from_tag = ""
        self.to_header = ""  # To of the 200 (with the service's tag): in-dialog requests
        self.target = ""  # the service's Contact: in-dialog Request-URI
        self._cseq = 0
        self._responses: queue.Queue[SipMessage] = queue.Queue()
        self._cond = threading.Condition()
        self._seen: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"blf-{user}-{line}", daemon=True)
        self._thread.start()

    # -- receive side (thread) ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.client.recv(0.2)
            except (SipParseError, ValueError) as exc:
                self.errors.append(f"unparsable message: {exc}")
                continue
            except OSError:
                return  # socket closed
            if msg is None:
                continue
            if msg.is_response:
                self._responses.put(msg)
            elif msg.method == "NOTIFY":
                self._on_notify(msg)
            else:
                self._reply(msg, 501, "Not Implemented")

    def _reply(self, msg: SipMessage, status: int, reason: str) -> None:
        lines = [f"SIP/2.0 {status} {reason}"]
        for name in ("via", "from", "to", "call-id", "cseq"):
            lines += [f"{name.title()}: {v}" for v in msg.get_all(name)]
        lines.append("Content-Length: 0")
        with contextlib.suppress(OSError):
            self.client.send_raw(("\r\n".join(lines) + "\r\n\r\n").encode())

    def _on_notify(self, msg: SipMessage) -> None:
        self._reply(msg, 200, "OK")
        key = (msg.get("call-id") or "", int((msg.get("cseq") or "0").split()[0]))
        with self._cond:
            if key in self._seen:
                return  # a retransmission we already answered
            self._seen.add(key)
            self.notifies.append(msg)
            try:
                self.docs.append(document_of(msg))
            except ValueError as exc:
                self.errors.append(str(exc))
            self._cond.notify_all()

    # -- SUBSCRIBE (caller's thread) ---------------------------------------------------------

    @property
    def ruri(self) -> str:
        return f"sip:{self.line}@{self.domain}"

    def _transaction(
        self, ruri: str, headers: list[tuple[str, str]], to: str, timeout: float = 5.0
    ) -> SipMessage:
        self._cseq += 1
        data, branch = self.client.build_request(
            "SUBSCRIBE",
            ruri,
            from_uri=f"sip:{self.user}@{self.domain}",
            to_uri=f"sip:{self.line}@{self.domain}",
            call_id=self.call_id,
            cseq=self._cseq,
            from_tag=self.from_tag,
            headers=headers,
        )
        if to:
            data = re.sub(rb"^To: [^\r\n]*", b"To: " + to.encode(), data, count=1, flags=re.M)
        deadline = time.monotonic() + timeout
        interval = 0.5
        self.client.send_raw(data)
        next_send = time.monotonic() + interval
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise SipTimeout(f"no final response to SUBSCRIBE {ruri} within {timeout}s")
            try:
                resp = self._responses.get(timeout=max(0.01, min(deadline, next_send) - now))
            except queue.Empty:
                if time.monotonic() >= next_send:
                    self.client.send_raw(data)
                    interval = min(interval * 2, 4.0)
                    next_send = time.monotonic() + interval
                continue
            if f"branch={branch}" not in (resp.get("via") or "") or resp.status < 200:
                continue
            return resp

    def subscribe(self, *, expires: int | None = None, event: str = "dialog") -> SipMessage:
        """A new subscription (new Call-ID): SUBSCRIBE, answer one 407, return the final
        response. ``docs`` gets the first NOTIFY shortly after a 200."""
        self.call_id = f"{secrets.token_hex(10)}@{LOOPBACK}"
        self.from_tag = new_tag()
        self.to_header = self.target = ""
        c = self.client
        base = [
            ("Contact", f"<sip:{self.user}@{c.local_hostport};transport=udp>"),
            ("Event", event),
            ("Accept", CONTENT_TYPE),
            ("Expires", str(self.expires if expires is None else expires)),
        ]
        resp = self._transaction(self.ruri, base, "")
        if resp.status in (401, 407):
            chosen = choose_challenge(challenges_of(resp), ("MD5",))
            auth = build_authorization(
                chosen,
                username=self.user,
                password=self.password,
                method="SUBSCRIBE",
                uri=self.ruri,
            )
            resp = self._transaction(self.ruri, [*base, (chosen.answer_header, auth)], "")
        if 200 <= resp.status < 300:
            self.to_header = resp.get("to") or ""
            contacts = contacts_of(resp)
            self.target = contacts[0].uri if contacts else self.ruri
        return resp

    def start(self, timeout: float = 5.0) -> DialogInfo:
        """Subscribe and wait for the first NOTIFY (the line's state now)."""
        mark = len(self.docs)
        resp = self.subscribe()
        if resp.status != 200:
            raise SubscribeError(
                f"{self.user} could not watch {self.line}: {resp.start_line}\n{resp.text()}"
            )
        return self.wait_for(lambda d: True, timeout, since=mark, what="the initial NOTIFY")

    def refresh(self, expires: int | None = None) -> SipMessage:
        """An in-dialog SUBSCRIBE (refresh; ``expires=0`` unsubscribes). The service answers
        with a NOTIFY of the current state, so this is also how a phone re-reads the line."""
        if not self.to_header:
            raise SubscribeError("no subscription to refresh")
        headers = [
            ("Contact", f"<sip:{self.user}@{self.client.local_hostport};transport=udp>"),
            ("Event", "dialog"),
            ("Expires", str(self.expires if expires is None else expires)),
        ]
        return self._transaction(self.target, headers, self.to_header)

    def unsubscribe(self) -> SipMessage:
        return self.refresh(expires=0)

    # -- reading documents -------------------------------------------------------------------

    def wait_for(
        self,
        predicate: Callable[[DialogInfo], bool],
        timeout: float = 5.0,
        *,
        since: int = 0,
        what: str = "a matching NOTIFY",
    ) -> DialogInfo:
        """The first document at index >= ``since`` that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for doc in self.docs[since:]:
                    if predicate(doc):
                        return doc
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"watcher {self.user} on {self.line}: no {what} within {timeout}s; "
                        f"got:\n{self.describe()}"
                    )
                self._cond.wait(left)

    def wait_label(self, label: str, timeout: float = 5.0, since: int = 0) -> DialogInfo:
        """The first document at index >= ``since`` whose lamp state is ``label``."""
        return self.wait_for(lambda d: d.label == label, timeout, since=since, what=label)

    def mark(self) -> int:
        with self._cond:
            return len(self.docs)

    def read_now(self, timeout: float = 5.0) -> DialogInfo:
        """Refresh and return the NOTIFY it triggers: the line's state right now."""
        mark = self.mark()
        resp = self.refresh()
        if resp.status != 200:
            raise SubscribeError(f"refresh refused: {resp.start_line}\n{resp.text()}")
        return self.wait_for(lambda d: True, timeout, since=mark, what="a NOTIFY after refresh")

    def describe(self) -> str:
        with self._cond:
            docs = list(self.docs)
        lines = [f"  {d.describe()}" for d in docs] or ["  (no NOTIFY)"]
        if self.errors:
            lines.append(f"  errors: {self.errors}")
        return "\n".join(lines)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.client.close()
