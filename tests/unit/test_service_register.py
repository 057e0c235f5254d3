"""The service's REGISTER path in-process: the 200 only after the commit, 500 when it fails."""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dialplan import load_config
from softswitch.service import Service
from softswitch.sip.transaction import Address
from softswitch.store.sqlite import StoreError

PHONE = Address("udp", "127.0.0.1", 5070)
URI = "sip:127.0.0.1"


def free_port(kind: int) -> int:
    probe = socket.socket(socket.AF_INET, kind)
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


def register(cseq: int, auth: str = "") -> bytes:
    return (
        f"REGISTER {URI} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-r{cseq}\r\n"
        "From: <sip:1001@127.0.0.1>;tag=a\r\nTo: <sip:1001@127.0.0.1>\r\n"
        f"Call-ID: reg-1@127.0.0.1\r\nCSeq: {cseq} REGISTER\r\n"
        f"Contact: <sip:1001@127.0.0.1:5070>\r\n{auth}Expires: 300\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def authorization(nonce: str) -> str:
    ha1 = hashlib.md5(b"1001:127.0.0.1:pw").hexdigest()
    ha2 = hashlib.md5(f"REGISTER:{URI}".encode()).hexdigest()
    resp = hashlib.md5(f"{ha1}:{nonce}:00000001:c0ffee:auth:{ha2}".encode()).hexdigest()
    return (
        f'Authorization: Digest username="1001",realm="127.0.0.1",uri="{URI}",nonce="{nonce}",'
        f'response="{resp}",algorithm=MD5,cnonce="c0ffee",qop=auth,nc=00000001\r\n'
    )


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[Service, list[bytes]]]:
    cfg_path = tmp_path / "softswitch.yaml"
    cfg_path.write_text(
        f"domain: 127.0.0.1\nlisten: [udp:127.0.0.1:{free_port(socket.SOCK_DGRAM)}]\n"
        f"http: 127.0.0.1:{free_port(socket.SOCK_STREAM)}\ndata_dir: {tmp_path / 'var'}\n"
        "media: {address: 127.0.0.1, ports: 23000-23099}\nauth: {algorithms: [MD5]}\n"
        'users:\n  - {extension: "1001", name: Alice, password: pw}\n'
    )
    svc = Service(load_config(cfg_path), cfg_path)
    await svc.start()
    sent: list[bytes] = []
    svc.transports.send = lambda data, dest: sent.append(data)  # type: ignore[method-assign]
    try:
        yield svc, sent
    finally:
        await svc.stop()


async def answer(sent: list[bytes], status: bytes) -> bytes:
    for _ in range(200):
        found = [d for d in sent if d.startswith(b"SIP/2.0 " + status)]
        if found:
            return found[-1]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {status!r} in {sent!r}")


async def authenticated_register(svc: Service, sent: list[bytes]) -> None:
    svc._on_message(register(1), PHONE)
    challenge = await answer(sent, b"401")
    nonce = re.search(rb'nonce="([^"]+)"', challenge).group(1).decode()  # type: ignore[union-attr]
    svc._on_message(register(2, authorization(nonce)), PHONE)


async def test_the_200_leaves_after_the_commit(service: tuple[Service, list[bytes]]) -> None:
    svc, sent = service
    await authenticated_register(svc, sent)
    assert not any(d.startswith(b"SIP/2.0 200") for d in sent)  # not before the store answered
    ok = await answer(sent, b"200")
    assert b"Contact: <sip:1001@127.0.0.1:5070>;expires=" in ok
    stored = await svc.store.load_bindings(0.0)
    assert [b.contact for b in stored] == ["<sip:1001@127.0.0.1:5070>"]


async def test_a_failed_commit_answers_500_and_reloads_from_disk(
    service: tuple[Service, list[bytes]],
) -> None:
    svc, sent = service
    loop = asyncio.get_running_loop()

    def fail(upserts: object, deletes: object, done: object) -> None:
        loop.call_soon(done, None, StoreError("disk full"))  # type: ignore[arg-type]

    svc.store.save_bindings_then = fail  # type: ignore[method-assign]
    await authenticated_register(svc, sent)
    error = await answer(sent, b"500")
    assert b"\r\nRetry-After: 5\r\n" in error
    await asyncio.sleep(0.1)  # the reload from disk runs as a task
    assert len(svc.bindings) == 0  # memory follows the disk, where nothing was written


async def test_the_challenge_keeps_no_transaction(service: tuple[Service, list[bytes]]) -> None:
    """A REGISTER without credentials is answered statelessly: no Timer J entry, no table
    row per 401 (a scanner's flood leaves nothing behind); its retransmission gets the very
    same 401, as a transaction would have sent."""
    svc, sent = service
    svc._on_message(register(1), PHONE)
    svc._on_message(register(1), PHONE)  # retransmitted
    first, second = [d for d in sent if d.startswith(b"SIP/2.0 401")]
    assert svc.layer.stats().servers == 0
    assert first == second
    assert b"\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-r1\r\n" in first
    nonce = re.search(rb'nonce="([^"]+)"', first).group(1)  # type: ignore[union-attr]
    svc._on_message(register(2, authorization(nonce.decode())), PHONE)
    assert b"Contact: <sip:1001@127.0.0.1:5070>;expires=" in await answer(sent, b"200")


async def test_kept_challenges_are_forgotten_after_their_time(
    service: tuple[Service, list[bytes]],
) -> None:
    """Nothing of a challenge outlives the retransmission window (memory per binding): the
    service's one timer is armed for the kept 401's expiry, which then forgets it."""
    svc, _ = service
    svc._on_message(register(1), PHONE)
    assert len(svc.challenges) == 1
    expiry = svc.challenges.get_timer()
    assert expiry is not None and svc._timer_at is not None and svc._timer_at <= expiry
    svc.challenges.handle_timer(expiry)
    assert len(svc.challenges) == 0 and svc.challenges.get_timer() is None
