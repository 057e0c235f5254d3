"""The Lines API over a real socket: HTTP parsing edges, auth, /api/lines and the event stream.

Line state is published on a `LineBus` by hand (the B2BUA does the same in production), and the
server is talked to with a raw asyncio client, so what is tested is the bytes a browser or a
script sees. Every wait is bounded with `asyncio.wait_for`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from dialplan import Config, load_config_text
from softswitch.directory import Directory
from softswitch.http_api import HttpApi, openapi_document
from softswitch.http_server import (
    MAX_HEAD,
    HttpError,
    HttpServer,
    HttpServerError,
    Request,
    Response,
    parse_head,
)
from softswitch.lines import CallState, Direction, LineBus, LineEvent
from softswitch.sip.digest import Algorithm, DigestAuthenticator
from softswitch.sip.message import Request as SipRequest
from softswitch.sip.message import parse_message
from softswitch.sip.transaction import Address
from softswitch.sip.transaction_layer import RequestReceived, ResponseReceived, TransactionLayer
from softswitch.subscriptions import SubscriptionManager

TIMEOUT = 5.0
CONFIG = """
domain: 127.0.0.1
listen: [udp:127.0.0.1:5060]
media: {address: 127.0.0.1, ports: 20000-20999}
users:
  - {extension: "1001", name: Alice Exec, password: s1}
  - {extension: "1002", name: Bob Assistant, password: "sé2"}
  - {extension: "1003", name: Carol Assistant, password: s3}
  - {extension: "1004", name: Dave Outsider, password: s4}
trusted: ["127.0.0.9/32"]
delegations:
  - delegator: "1001"
    delegates: ["1002", "1003"]
auth: {max_failures: 3, failure_window: 60, block_time: 30}
"""
PASSWORDS = {"1001": "s1", "1002": "sé2", "1003": "s3", "1004": "s4"}
T0 = 1_800_000_000.0


@dataclass
class Rig:
    cfg: Config
    bus: LineBus
    api: HttpApi
    server: HttpServer
    now: list[float] = field(default_factory=lambda: [T0])

    @property
    def port(self) -> int:
        return self.server.address[1]

    def publish(
        self,
        line: str,
        call: str,
        state: CallState,
        *,
        party: str | None = None,
        remote: str = "+15550109999",
        direction: Direction = Direction.INBOUND,
        started: float = T0,
        reason: str | None = None,
        private: bool = False,
    ) -> LineEvent:
        event = LineEvent(
            line,
            call,
            state,
            direction,
            party,
            remote,
            "Zed Caller",
            started,
            self.now[0],
            reason,
            private=private,
        )
        self.bus.publish(event)
        return event


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    cfg = load_config_text(CONFIG)
    bus = LineBus()
    holder = Rig(cfg, bus, None, None)  # type: ignore[arg-type]
    api = HttpApi(lambda: holder.cfg, bus, clock=lambda: holder.now[0], keepalive=TIMEOUT * 2)
    server = HttpServer(api.handle)
    await server.start("127.0.0.1", 0)
    holder.api, holder.server = api, server
    yield holder
    await asyncio.wait_for(server.close(), TIMEOUT)


# --- a raw client -------------------------------------------------------------------------------
def auth(user: str, password: str | None = None) -> str:
    secret = PASSWORDS.get(user, "x") if password is None else password
    token = base64.b64encode(f"{user}:{secret}".encode()).decode()
    return f"Authorization: Basic {token}\r\n"


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


def parse_reply(data: bytes) -> Reply:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if "content-length" in headers:
        assert len(body) == int(headers["content-length"])
    return Reply(int(status), headers, body)


async def exchange(port: int, raw: bytes) -> Reply:
    """Send `raw`, read until the server closes, parse the response."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        writer.write(raw)
        await writer.drain()
        return parse_reply(await asyncio.wait_for(reader.read(), TIMEOUT))
    finally:
        writer.close()


async def fetch(port: int, path: str, user: str | None = None) -> Reply:
    return await exchange(port, get(path, auth(user) if user else ""))


@dataclass
class Sse:
    """An event-stream client: `message()` returns one SSE block as a dict of its fields."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    async def open(cls, port: int, user: str, *, rcvbuf: int | None = None) -> Sse:
        if rcvbuf is None:
            conn = asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            conn = asyncio.open_connection(sock=sock, limit=1 << 22)
        reader, writer = await asyncio.wait_for(conn, TIMEOUT)
        writer.write(get("/api/events", auth(user)))
        await writer.drain()
        return cls(reader, writer)

    async def head(self) -> None:
        reply = parse_reply(await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT))
        self.status, self.headers = reply.status, reply.headers

    async def message(self) -> dict[str, Any]:
        block = await asyncio.wait_for(self.reader.readuntil(b"\n\n"), TIMEOUT)
        out: dict[str, Any] = {}
        for line in block.decode().splitlines():
            if line.startswith(":"):
                out["comment"] = line[1:].strip()
            elif line:
                name, _, value = line.partition(":")
                out[name] = json.loads(value) if name == "data" else value.removeprefix(" ")
        return out

    async def event(self) -> dict[str, Any]:
        """The next message that is not a keepalive comment."""
        while "comment" in (msg := await self.message()):
            pass
        return msg

    async def closed(self) -> bool:
        """True once the server has closed the stream (reads what is left)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), TIMEOUT):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


async def until(predicate: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), TIMEOUT)


# --- unauthenticated endpoints ------------------------------------------------------------------
async def test_health_needs_no_auth(rig: Rig) -> None:
    reply = await fetch(rig.port, "/api/health")
    assert reply.status == 200 and reply.json() == {"status": "ok"}
    assert reply.headers["connection"] == "close"
    assert reply.headers["cache-control"] == "no-store"


async def test_openapi_document_describes_both_endpoints(rig: Rig) -> None:
    reply = await fetch(rig.port, "/api/openapi.json")
    assert reply.status == 200
    doc = reply.json()
    assert doc == json.loads(json.dumps(openapi_document()))
    assert doc["openapi"].startswith("3.1")
    assert {"/api/lines", "/api/events"} <= set(doc["paths"])
    lines_ok = doc["paths"]["/api/lines"]["get"]["responses"]["200"]
    assert lines_ok["content"]["application/json"]["schema"]["$ref"].endswith("/LinesView")
    events_ok = doc["paths"]["/api/events"]["get"]["responses"]["200"]
    assert "text/event-stream" in events_ok["content"]
    schemas = doc["components"]["schemas"]
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', reply.body.decode()))
    assert refs and refs <= set(schemas)  # every $ref resolves
    call = schemas["CallView"]["properties"]
    assert {"call_id", "state", "direction", "party", "remote", "started_at", "duration"} <= set(
        call
    )
    assert set(schemas["CallState"]["enum"]) >= {"ringing", "active", "held"}


# --- authentication -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/api/lines", "/api/events"])
async def test_missing_wrong_and_unknown_credentials_get_the_same_401(rig: Rig, path: str) -> None:
    attempts = [
        "",
        auth("1002", "wrong"),
        auth("9999", "s1"),
        "Authorization: Basic !!notbase64\r\n",
        "Authorization: Bearer abc\r\n",
    ]
    replies = []
    for extra in attempts:
        replies.append(await exchange(rig.port, get(path, extra)))
        rig.now[0] += 61  # past auth.failure_window: this test is not about throttling
    for reply in replies:
        assert reply.status == 401
        assert reply.headers["www-authenticate"] == 'Basic realm="softswitch"'
        assert reply.body == replies[0].body
    assert (await fetch(rig.port, "/api/lines", "1002")).status == 200  # non-ASCII password


async def test_repeated_failures_are_throttled_per_address(rig: Rig) -> None:
    for _ in range(3):  # auth.max_failures
        assert (await exchange(rig.port, get("/api/lines", auth("1001", "bad")))).status == 401
    blocked = await fetch(rig.port, "/api/lines", "1001")  # even the right password
    assert blocked.status == 429 and blocked.headers["retry-after"] == "30"
    assert (await fetch(rig.port, "/api/health")).status == 200
    rig.now[0] += 31  # auth.block_time
    assert (await fetch(rig.port, "/api/lines", "1001")).status == 200


async def test_requests_without_credentials_do_not_count_as_failures(rig: Rig) -> None:
    for _ in range(5):  # a browser's first request never carries credentials
        assert (await fetch(rig.port, "/api/lines")).status == 401
    assert (await fetch(rig.port, "/api/lines", "1001")).status == 200


# --- /api/lines ---------------------------------------------------------------------------------
async def test_lines_of_delegator_delegate_and_outsider(rig: Rig) -> None:
    rig.publish("1001", "c1", CallState.RINGING, started=T0 - 5)
    rig.publish("1001", "c1", CallState.ACTIVE, party="1002", started=T0 - 5)
    rig.publish(
        "1004", "c2", CallState.DIALING, party="1004", remote="1003", direction=Direction.OUTBOUND
    )
    rig.now[0] = T0 + 42.7

    alice = (await fetch(rig.port, "/api/lines", "1001")).json()
    assert alice["user"] == "1001"
    assert [(x["line"], x["role"], x["name"]) for x in alice["lines"]] == [
        ("1001", "owner", "Alice Exec")
    ]
    [line] = alice["lines"]
    assert line["version"] == 2
    assert line["calls"] == [
        {
            "call_id": "c1",
            "state": "active",
            "direction": "inbound",
            "party": "1002",
            "party_name": "Bob Assistant",
            "remote": "+15550109999",
            "remote_name": "Zed Caller",
            "started_at": "2027-01-15T07:59:55Z",
            "started_at_epoch": T0 - 5,
            "duration": 47,
            "private": False,
        }
    ]

    bob = (await fetch(rig.port, "/api/lines", "1002")).json()
    assert [(x["line"], x["role"], x["version"]) for x in bob["lines"]] == [
        ("1002", "owner", 0),
        ("1001", "delegate", 2),
    ]
    assert bob["lines"][0]["calls"] == []
    assert bob["lines"][1] == {**line, "role": "delegate"}  # the same calls as the owner sees

    dave = (await fetch(rig.port, "/api/lines", "1004")).json()
    assert [x["line"] for x in dave["lines"]] == ["1004"]  # not a member of 1001
    [call] = dave["lines"][0]["calls"]
    assert (call["state"], call["direction"], call["remote"]) == ("dialing", "outbound", "1003")


async def test_the_current_config_decides_membership(rig: Rig) -> None:
    rig.publish("1001", "c1", CallState.RINGING)
    assert len((await fetch(rig.port, "/api/lines", "1002")).json()["lines"]) == 2
    rig.cfg = load_config_text(CONFIG + "policy: {delegation: false}\n")  # a reload
    assert [x["line"] for x in (await fetch(rig.port, "/api/lines", "1002")).json()["lines"]] == [
        "1002"
    ]
    rig.cfg = load_config_text(CONFIG.replace('password: "sé2"', "password: new"))
    assert (await fetch(rig.port, "/api/lines", "1002")).status == 401


# --- /api/events --------------------------------------------------------------------------------
async def test_stream_starts_with_a_snapshot_then_events_in_publish_order(rig: Rig) -> None:
    rig.publish("1001", "c1", CallState.RINGING)  # before subscribing: in the snapshot
    sse = await Sse.open(rig.port, "1002")
    await sse.head()
    assert sse.status == 200 and sse.headers["content-type"] == "text/event-stream"
    snapshot = await sse.event()
    assert snapshot["event"] == "snapshot"
    assert snapshot["data"] == (await fetch(rig.port, "/api/lines", "1002")).json()
    assert snapshot["data"]["lines"][1]["calls"][0]["state"] == "ringing"

    rig.publish("1004", "x", CallState.RINGING)  # not Bob's line: never streamed
    rig.publish("1001", "c1", CallState.ACTIVE, party="1003")
    rig.publish("1002", "c3", CallState.RINGING)
    rig.publish("1001", "c1", CallState.ENDED, party="1003", reason="bye")
    got = [await sse.event() for _ in range(3)]
    assert [(m["event"], m["id"]) for m in got] == [
        ("line", "1001:2"),
        ("line", "1002:1"),
        ("line", "1001:3"),
    ]
    assert [(m["data"]["call_id"], m["data"]["state"]) for m in got] == [
        ("c1", "active"),
        ("c3", "ringing"),
        ("c1", "ended"),
    ]
    ended = got[2]["data"]
    assert ended["reason"] == "bye" and ended["party_name"] == "Carol Assistant"
    assert ended["at"] == "2027-01-15T08:00:00Z" and ended["at_epoch"] == T0
    sse.close()


async def test_lines_and_stream_show_the_same_states_in_the_same_order(rig: Rig) -> None:
    """What the stream says after each change is what GET /api/lines says at that moment,
    in the order the bus published it (the order the dialog-info NOTIFYs are sent in)."""
    sse = await Sse.open(rig.port, "1003")
    await sse.head()
    await sse.event()  # snapshot
    sequence = [
        (CallState.RINGING, None),
        (CallState.ACTIVE, "1001"),
        (CallState.HELD, "1001"),
        (CallState.ACTIVE, "1003"),  # picked up by the delegate
        (CallState.HELD, "1003"),
        (CallState.ENDED, "1003"),
    ]
    for state, party in sequence:
        rig.publish("1001", "c1", state, party=party, private=state is CallState.HELD)
        streamed = (await sse.event())["data"]
        listed = (await fetch(rig.port, "/api/lines", "1003")).json()["lines"][1]
        assert (streamed["state"], streamed["party"]) == (state.value, party)
        assert streamed["version"] == listed["version"]
        calls = [(c["state"], c["party"], c["private"]) for c in listed["calls"]]
        expected = [] if state is CallState.ENDED else [(state.value, party, streamed["private"])]
        assert calls == expected
    sse.close()


DIALOG_NS = {"d": "urn:ietf:params:xml:ns:dialog-info"}


class Notifier:
    """The dialog-event notifier on the same bus, watched by Bob's phone (a trusted peer, so
    no digest round), every NOTIFY answered 200 at once so none is coalesced."""

    PHONE = Address("udp", "127.0.0.9", 5090)

    def __init__(self, rig: Rig) -> None:
        self.layer = TransactionLayer()
        self.mgr = SubscriptionManager(
            self.layer,
            lambda transport: Address(transport, "127.0.0.1", 5060),
            DigestAuthenticator(rig.cfg.realm, (Algorithm.MD5,), 300, secret=b"k" * 32),
            Directory.from_config(rig.cfg),
            rig.cfg,
            rig.bus.model,
            lambda: None,
            lambda: 1000.0,
            wall=lambda: rig.now[0],
        )
        rig.bus.subscribe(self.mgr.on_line_event)
        raw = (
            "SUBSCRIBE sip:1001@127.0.0.1 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.9:5090;branch=z9hG4bKsub1;rport\r\n"
            "From: <sip:1002@127.0.0.1>;tag=ft1\r\nTo: <sip:1001@127.0.0.1>\r\n"
            "Call-ID: sub1\r\nCSeq: 1 SUBSCRIBE\r\nMax-Forwards: 70\r\n"
            "Contact: <sip:1002@127.0.0.9:5090>\r\nEvent: dialog\r\nExpires: 600\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        self.layer.receive(parse_message(raw.encode()), self.PHONE, 1000.0)
        assert len(self.notified()) == 1  # the initial full state

    def notified(self) -> list[list[tuple[str, str | None, str | None]]]:
        """Pump the layer; answer and decode every NOTIFY sent: (call, state, rendering)."""
        docs = []
        while (event := self.layer.next_event()) is not None:
            if isinstance(event, RequestReceived):
                self.mgr.on_subscribe(event.txn, event.request, event.source)
            elif isinstance(event, ResponseReceived):
                assert self.mgr.on_response(event.txn, event.response)
        for data, _ in self.layer.datagrams_to_send():
            msg = parse_message(data)
            if isinstance(msg, SipRequest) and msg.method == "NOTIFY":
                self.layer.receive(parse_message(msg.make_response(200).to_bytes()), self.PHONE, 0)
                docs.append(self._dialogs(msg.body))
        if docs:
            docs += self.notified()  # the answers may release deferred NOTIFYs
        return docs

    def _dialogs(self, body: bytes) -> list[tuple[str, str | None, str | None]]:
        out = []
        for d in ET.fromstring(body).findall("d:dialog", DIALOG_NS):
            param = d.find("d:local/d:target/d:param", DIALOG_NS)
            rendering = param.get("pval") if param is not None else None
            out.append((d.get("id") or "", d.findtext("d:state", namespaces=DIALOG_NS), rendering))
        return out


#: How each Lines API state reads in RFC 4235 dialog-info (with the +sip.rendering of an
#: answered call: a held call is confirmed but not rendered).
AS_DIALOG_INFO = {
    "ringing": ("early", None),
    "active": ("confirmed", "yes"),
    "held": ("confirmed", "no"),
    "ended": ("terminated", None),
}


async def test_stream_and_lines_agree_with_the_notifys(rig: Rig) -> None:
    """The issue's "done when": GET /api/lines and the event stream show the same states in
    the same order as the dialog-info NOTIFYs sent for the same line."""
    notifier = Notifier(rig)
    sse = await Sse.open(rig.port, "1002")
    await sse.head()
    await sse.event()  # snapshot
    sequence = [
        (CallState.RINGING, None),
        (CallState.ACTIVE, "1002"),
        (CallState.HELD, "1002"),
        (CallState.ACTIVE, "1002"),
        (CallState.ENDED, "1002"),
    ]
    from_notifys, from_stream, from_lines = [], [], []
    for state, party in sequence:
        rig.publish("1001", "c1", state, party=party)
        [dialogs] = notifier.notified()
        from_notifys.append(dialogs)
        streamed = (await sse.event())["data"]
        from_stream.append([(streamed["call_id"], *AS_DIALOG_INFO[streamed["state"]])])
        calls = (await fetch(rig.port, "/api/lines", "1002")).json()["lines"][1]["calls"]
        from_lines.append([(c["call_id"], *AS_DIALOG_INFO[c["state"]]) for c in calls])
    assert from_stream == from_notifys
    # The list shows current calls only; an ended call is shown once as terminated elsewhere.
    assert from_lines == [*from_notifys[:-1], []]
    assert [d[0][1] for d in from_notifys] == [
        "early",
        "confirmed",
        "confirmed",
        "confirmed",
        "terminated",
    ]
    sse.close()


async def test_keepalive_comments(rig: Rig) -> None:
    rig.api.keepalive = 0.05
    sse = await Sse.open(rig.port, "1001")
    await sse.head()
    assert (await sse.message())["event"] == "snapshot"
    assert await sse.message() == {"comment": "keepalive"}
    sse.close()


async def test_disconnect_unsubscribes(rig: Rig) -> None:
    sse = await Sse.open(rig.port, "1002")
    await sse.head()
    await sse.event()
    assert rig.bus.subscribers == 1 and rig.api.streams == 1
    sse.close()
    await until(lambda: rig.bus.subscribers == 0 and rig.server.connections == 0)
    assert rig.api.streams == 0
    rig.publish("1001", "c1", CallState.RINGING)  # nobody left to tell: no error


async def test_stalled_client_does_not_block_the_bus(rig: Rig) -> None:
    sse = await Sse.open(rig.port, "1002", rcvbuf=4096)  # and never reads a byte
    await until(lambda: rig.bus.subscribers == 1)
    # publish() is synchronous: it cannot wait for the client. What must hold is that the
    # client's queue is bounded, so the stalled stream is cut instead of growing without end.
    for i in range(5000):
        rig.publish("1001", f"c{i}", CallState.RINGING)
        if i % 100 == 0:
            await asyncio.sleep(0)  # let the stream write what it can
    await until(lambda: rig.bus.subscribers == 0 and rig.api.streams == 0)  # dropped
    assert await sse.closed()
    fresh = await Sse.open(rig.port, "1002")  # reconnecting gets the full state back
    await fresh.head()
    snapshot = await fresh.event()
    assert len(snapshot["data"]["lines"][1]["calls"]) == 5000
    fresh.close()
    sse.close()


async def test_reload_changing_membership_sends_a_new_snapshot(rig: Rig) -> None:
    sse = await Sse.open(rig.port, "1002")
    await sse.head()
    await sse.event()
    rig.cfg = load_config_text(CONFIG + "policy: {delegation: false}\n")
    rig.publish("1001", "c1", CallState.RINGING)
    msg = await sse.event()
    assert msg["event"] == "snapshot"
    assert [x["line"] for x in msg["data"]["lines"]] == ["1002"]
    rig.publish("1001", "c1", CallState.ENDED)  # no longer Bob's line
    rig.publish("1002", "c2", CallState.RINGING)
    assert (await sse.event())["id"] == "1002:1"
    sse.close()


async def test_password_change_ends_the_stream(rig: Rig) -> None:
    sse = await Sse.open(rig.port, "1002")
    await sse.head()
    await sse.event()
    rig.cfg = load_config_text(CONFIG.replace('password: "sé2"', "password: new"))
    rig.publish("1001", "c1", CallState.RINGING)
    assert await sse.closed()
    await until(lambda: rig.bus.subscribers == 0)


async def test_server_close_ends_streams(rig: Rig) -> None:
    sse = await Sse.open(rig.port, "1001")
    await sse.head()
    await sse.event()
    await asyncio.wait_for(rig.server.close(), TIMEOUT)
    assert await sse.closed()
    assert rig.bus.subscribers == 0 and rig.api.streams == 0


# --- HTTP edges ---------------------------------------------------------------------------------
async def test_unknown_path_is_404_and_other_methods_405(rig: Rig) -> None:
    assert (await fetch(rig.port, "/api/nope")).status == 404
    assert (await fetch(rig.port, "/api/lines/")).status == 404
    for method in ("POST", "HEAD", "DELETE"):
        raw = f"{method} /api/lines HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        reply = await exchange(rig.port, raw)
        assert reply.status == 405 and reply.headers["allow"] == "GET"
    body = b'{"x": 1}' * 1000  # unread, yet the client still gets the answer
    head = f"POST /api/lines HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    assert (await exchange(rig.port, head.encode() + body)).status == 405


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"garbage\r\n\r\n", 400),
        (b"GET /api/health\r\n\r\n", 400),
        (b"GET /api/health HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /api/health HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /api/health HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET /api/health HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"GET /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 400),
        (
            b"GET /api/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"GET /api/health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
        (b"GET /api/health HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n", 431),
        (b"GET /api/health HTTP/1.1\r\nHost: x\r\n", 400),  # then EOF
        (b"GET /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 200),
        (b"\r\nGET /api/health HTTP/1.0\n\n", 200),  # bare LF, no Host needed in 1.0
        (b"GET http://127.0.0.1/api/%68ealth?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    ],
)
async def test_malformed_requests(rig: Rig, raw: bytes, status: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(raw)
    if not raw.endswith(b"\n\n") and not raw.endswith(b"hello"):
        writer.write_eof()
    reply = parse_reply(await asyncio.wait_for(reader.read(), TIMEOUT))
    writer.close()
    assert reply.status == status, reply
    if status != 200:
        assert "error" in reply.json()


async def test_silent_and_slow_clients_are_closed(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.close()  # connects and leaves: nothing to answer
    rig.server.head_timeout = 0.1
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(b"GET /api/health HTTP/1.1\r\n")  # and never finishes
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    await until(lambda: rig.server.connections == 0)


async def test_handler_failure_is_a_500_and_the_server_lives_on(rig: Rig) -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("bug")

    rig.api.routes["/api/broken"] = broken
    assert (await fetch(rig.port, "/api/broken")).status == 500
    assert (await fetch(rig.port, "/api/health")).status == 200


async def test_connection_limit(rig: Rig) -> None:
    rig.server.max_connections = 1
    sse = await Sse.open(rig.port, "1001")
    await sse.head()
    assert (await fetch(rig.port, "/api/health")).status == 503
    sse.close()


async def test_listening_on_a_busy_port_fails_clearly(rig: Rig) -> None:
    other = HttpServer(rig.api.handle)
    with pytest.raises(HttpServerError, match="cannot listen for HTTP"):
        await other.start("127.0.0.1", rig.port)


def test_parse_head() -> None:
    peer = ("127.0.0.1", 5)
    req = parse_head(b"GET /api/%6Cines?a=b HTTP/1.1\r\nHost: x\r\nA: 1\r\na: 2\r\n", peer)
    assert (req.method, req.path, req.query, req.version) == ("GET", "/api/lines", "a=b", "1.1")
    assert req.header("A") == "1, 2" and not req.has_body
    assert parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n", peer).has_body
    for bad in (
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n",
        b"GET foo HTTP/1.1\r\nHost: x\r\n",
        b"GET  / HTTP/1.1\r\nHost: x\r\n",
    ):
        with pytest.raises(HttpError) as info:
            parse_head(bad, peer)
        assert info.value.status == 400, bad


def test_under_uvloop() -> None:
    """The service runs on uvloop (softswitch.cli): streams, drops and close work there too."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        cfg = load_config_text(CONFIG)
        bus = LineBus()
        rig = Rig(cfg, bus, HttpApi(lambda: cfg, bus), None)  # type: ignore[arg-type]
        rig.server = HttpServer(rig.api.handle)
        await rig.server.start("127.0.0.1", 0)
        assert (await fetch(rig.port, "/api/lines", "1001")).status == 200
        stalled = await Sse.open(rig.port, "1002", rcvbuf=4096)
        live = await Sse.open(rig.port, "1001")
        await live.head()
        await live.event()
        await until(lambda: bus.subscribers == 2)

        async def read_all() -> list[str]:
            return [(await live.event())["id"] for _ in range(5000)]

        reading = asyncio.ensure_future(read_all())
        for i in range(5000):
            rig.publish("1001", f"c{i}", CallState.RINGING)
            if i % 100 == 0:
                await asyncio.sleep(0)
        await until(lambda: bus.subscribers == 1)  # the stalled one is gone, the reader is not
        assert await stalled.closed()
        ids = await asyncio.wait_for(reading, TIMEOUT)
        assert ids == [f"1001:{n}" for n in range(1, 5001)]
        await asyncio.wait_for(rig.server.close(), TIMEOUT)
        assert await live.closed() and bus.subscribers == 0
        stalled.close()
        live.close()

    uvloop.run(scenario())
