"""TCP bounds: a connection flood is refused at max_connections, stalled peers are closed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from softswitch.sip.transaction import Address
from softswitch.transport import TcpLimits, TransportManager

OPTIONS = (
    b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKt\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\nCall-ID: t\r\n"
    b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
)


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """True if the server closed (or reset) the connection within `within` seconds."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def start(limits: TcpLimits) -> tuple[TransportManager, int, list[Address]]:
    heard: list[Address] = []
    manager = TransportManager(lambda data, peer: heard.append(peer), tcp=limits)
    local = await manager.listen("tcp", "127.0.0.1", 0)
    return manager, local.port, heard


async def test_connections_over_the_limit_are_closed_at_once() -> None:
    manager, port, _ = await start(TcpLimits(max_connections=2, message_timeout=30))
    try:
        first = await asyncio.open_connection("127.0.0.1", port)
        second = await asyncio.open_connection("127.0.0.1", port)
        third = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_by_server(third[0], 2.0)
        kept = {peer.port for peer in manager._connections}
        assert kept == {w.get_extra_info("sockname")[1] for _, w in (first, second)}
        assert len(manager._connections) == 2
        for _, writer in (first, second, third):
            writer.close()
    finally:
        await manager.close()


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition` holds (bounded: 500 turns of 10 ms)."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)


async def test_stalled_and_silent_peers_are_closed_idle_registered_ones_kept() -> None:
    """The sweep closes who held half a message or said nothing for `message_timeout`; the
    clock is moved by hand (each connection's last progress set 31 s back), not waited for."""
    manager, port, heard = await start(TcpLimits(max_connections=10, message_timeout=30))
    try:
        idle = await asyncio.open_connection("127.0.0.1", port)
        idle[1].write(OPTIONS)  # a whole message, then quiet: a phone between messages
        slow = await asyncio.open_connection("127.0.0.1", port)
        slow[1].write(OPTIONS[:40])  # half a message, never finished
        silent = await asyncio.open_connection("127.0.0.1", port)
        await until(lambda: len(heard) == 1 and len(manager._connections) == 3)
        await until(lambda: any(c.framer.buffered for c in manager._connections.values()))
        for conn in manager._connections.values():
            conn.progress_at -= 31
        manager._sweep()
        assert await closed_by_server(slow[0], 3.0)
        assert await closed_by_server(silent[0], 3.0)
        await until(lambda: len(manager._connections) == 1)
        assert len(heard) == 1 and len(manager._connections) == 1
        (kept,) = manager._connections.values()
        assert kept.heard and kept.framer.buffered == 0  # the idle phone's connection
        for _, writer in (idle, slow, silent):
            writer.close()
    finally:
        await manager.close()
