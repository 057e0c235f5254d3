"""Feature codes that change per-user state: DND and ringing opt-out, persisted."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dialplan import load_config_text
from softswitch.call_control import CallControl
from softswitch.call_setup import CallSetup
from softswitch.directory import Directory
from softswitch.registrar import Bindings
from softswitch.sip.digest import Algorithm, DigestAuthenticator, compute_response
from softswitch.sip.message import Request, Response, parse_message
from softswitch.sip.transaction import Address, InviteServerTransaction, server_key
from softswitch.sip.transaction_layer import TransactionLayer
from softswitch.store.sqlite import SqliteStore
from softswitch.throttle import FailureThrottle

CONFIG = """
domain: 127.0.0.1
listen: [udp:127.0.0.1:5060]
media: {address: 127.0.0.1, ports: 20000-20999}
users:
  - {extension: "1001", name: Alice, password: s1}
  - {extension: "1002", name: Bob, password: s2}
delegations:
  - {delegator: "1001", delegates: ["1002"]}
"""


PASSWORDS = {"1001": "s1", "1002": "s2"}


def dial(cc: CallControl, number: str, user: str) -> Request:
    """An INVITE to a feature code, with valid credentials of `user`."""
    nonce = cc.setup.auth.new_nonce(time.time())
    uri = f"sip:{number}@127.0.0.1"
    digest = compute_response(
        user, PASSWORDS[user], "127.0.0.1", nonce, "INVITE", uri, Algorithm.MD5, "00000001", "cn"
    )
    msg = parse_message(
        (
            f"INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5090;"
            f"branch=z9hG4bK{number}{user}\r\nFrom: <sip:{user}@127.0.0.1>;tag=1\r\n"
            f"To: <sip:{number}@127.0.0.1>\r\nCall-ID: f{number}\r\nCSeq: 1 INVITE\r\n"
            f'Proxy-Authorization: Digest username="{user}", realm="127.0.0.1", nonce="{nonce}", '
            f'uri="{uri}", response="{digest}", algorithm=MD5, qop=auth, nc=00000001, '
            'cnonce="cn"\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n'
        ).encode()
    )
    assert isinstance(msg, Request)
    return msg


def handle(cc: CallControl, req: Request, source: Address) -> bool:
    """`req` handed to call control in a server transaction of its own, as the service does
    (the compiled call control checks the transaction's class, D17)."""
    return cc.on_request(InviteServerTransaction(req, source, server_key(req)), req, source)


async def make(tmp_path: Path) -> tuple[CallControl, list[Response], SqliteStore]:
    cfg = load_config_text(CONFIG)
    store = SqliteStore(tmp_path / "db")
    await store.open()
    auth = DigestAuthenticator(cfg.realm, (Algorithm.MD5,))
    setup = CallSetup(cfg, Directory.from_config(cfg), auth, Bindings())
    sent: list[Response] = []

    def respond(txn: Any, req: Request, resp: Response, source: Address, **_: Any) -> None:
        sent.append(resp)

    cc = CallControl(
        TransactionLayer(),
        None,  # type: ignore[arg-type]  # no call reaches the B2BUA in these tests
        setup,
        store,
        FailureThrottle(),
        respond,
        cfg,
    )
    return cc, sent, store


async def test_ring_opt_out_persists_and_removes_the_delegate(tmp_path: Path) -> None:
    cc, sent, store = await make(tmp_path)
    src = Address("udp", "127.0.0.1", 5090)
    handle(cc, dial(cc, "*21", "1002"), src)
    assert sent[-1].status == 480 and sent[-1].reason == "Ringing Off For 1001"
    assert ("1001", "1002") in cc.opted_out
    for task in list(cc._tasks):
        await task
    await store.close()
    cc2, _, store2 = await make(tmp_path)
    await cc2.load_state()
    assert cc2.opted_out == {("1001", "1002")}
    handle(cc2, dial(cc2, "*22", "1002"), src)
    assert cc2.opted_out == set()
    for task in list(cc2._tasks):
        await task
    await store2.close()


async def test_dnd_toggles_and_non_delegates_cannot_opt_out(tmp_path: Path) -> None:
    cc, sent, store = await make(tmp_path)
    src = Address("udp", "127.0.0.1", 5090)
    handle(cc, dial(cc, "*78", "1001"), src)
    assert cc.dnd == {"1001"} and sent[-1].reason == "DND On"
    handle(cc, dial(cc, "*79", "1001"), src)
    assert cc.dnd == set()
    handle(cc, dial(cc, "*21", "1001"), src)
    assert sent[-1].reason == "Not A Delegate"
    for task in list(cc._tasks):
        await task
    await store.close()
