"""SIGHUP reload in-process: the new config is read off the loop, a bad one changes nothing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dialplan import Config, load_config
from softswitch import service as service_module
from softswitch.service import Service

from .test_service_register import free_port


def config_text(tmp_path: Path, users: str, extra: str = "") -> str:
    return (
        f"domain: 127.0.0.1\nlisten: [udp:127.0.0.1:{free_port(socket.SOCK_DGRAM)}]\n"
        f"http: 127.0.0.1:{free_port(socket.SOCK_STREAM)}\ndata_dir: {tmp_path / 'var'}\n"
        "media: {address: 127.0.0.1, ports: 23100-23199}\n"
        f"{extra}users:\n{users}"
    )


ALICE = '  - {extension: "1001", name: Alice, password: pw}\n'
BOB = '  - {extension: "1002", name: Bob, password: pw2}\n'


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[Service, Path]]:
    path = tmp_path / "softswitch.yaml"
    path.write_text(config_text(tmp_path, ALICE))
    svc = Service(load_config(path), path)
    await svc.start()
    try:
        yield svc, path
    finally:
        await svc.stop()


async def reloaded(svc: Service) -> None:
    """Wait for the reload (and any reload queued behind it) to finish."""
    while svc._reloading is not None:
        await asyncio.wait([svc._reloading])
        await asyncio.sleep(0)  # the done callback may start the queued one


async def test_reload_applies_a_valid_config(service: tuple[Service, Path]) -> None:
    svc, path = service
    text = path.read_text().replace("users:\n", "overload: {max_queue_delay_ms: 200}\nusers:\n")
    path.write_text(text + BOB)
    svc.reload()
    assert svc._reloading is not None  # read in a worker thread: nothing changed yet
    assert svc.cfg.user("1002") is None
    await reloaded(svc)
    assert svc.cfg.user("1002") is not None
    assert svc.registrar.directory.is_user("1002")
    assert svc.stale.max_delay == 0.2


async def test_invalid_config_keeps_the_running_one(service: tuple[Service, Path]) -> None:
    svc, path = service
    before = svc.cfg
    path.write_text(path.read_text() + '  - {extension: "1001", name: Twin, password: x}\n')
    svc.reload()
    await reloaded(svc)
    assert svc.cfg is before
    assert svc.registrar.directory.is_user("1001")


async def test_a_sighup_during_a_reload_reloads_once_more(
    service: tuple[Service, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file may change again while the first reload reads it: the last state wins."""
    svc, path = service
    reads = 0

    def counted(path: Path, **kwargs: Any) -> Config:
        # the module's global, not the method: the compiled Service's methods can't be patched
        nonlocal reads
        reads += 1
        return load_config(path, **kwargs)

    monkeypatch.setattr(service_module, "load_config", counted)
    svc.reload()
    first = svc._reloading
    path.write_text(path.read_text() + BOB)
    svc.reload()
    svc.reload()  # coalesced with the one before
    assert svc._reloading is first
    await reloaded(svc)
    assert reads == 2
    assert svc.cfg.user("1002") is not None
