"""Fixtures for the e2e tests: services, SIP clients, peers, diagnostics and time bounds.

Why these exist:
* every service/peer a test starts is registered with the test item, so a failing test's
  report carries the tails of the service's stderr/stdout and the peers' logs;
* finalizers stop (and, if needed, SIGKILL the process group of) everything a test started,
  and fail the test if the service died on its own during it;
* each e2e test gets a hard wall-clock bound (SIGALRM), ``@pytest.mark.e2e_timeout(S)``,
  so a hung peer or service can never eat CI's budget;
* SIPp/baresip missing: skipped on a developer machine, a failure under CI (``CI`` set),
  because a silently skipped interop suite is worse than a red build.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from .harness.baresip import baresip_binary
from .harness.service import (
    ALICE,
    BOB,
    CAROL,
    ServiceConfig,
    SoftswitchService,
    User,
    start_fresh,
    stop_all,
)
from .harness.sipclient import Registrar, SipClient
from .harness.sipp import sipp_binary

DEFAULT_TIMEOUT_S = 120.0

_DIAGNOSTICS = pytest.StashKey[list[Callable[[], str]]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e_timeout(seconds): hard wall-clock limit for one e2e test (SIGALRM)"
    )


def attach_diagnostics(node: pytest.Item, produce: Callable[[], str]) -> None:
    """Call ``produce()`` and add its text to the report if this test fails."""
    node.stash.setdefault(_DIAGNOSTICS, []).append(produce)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for produce in item.stash.get(_DIAGNOSTICS, []):
            try:
                text = produce()
            except Exception as exc:  # diagnostics must never hide the real failure
                text = f"(could not collect diagnostics: {exc!r})"
            report.sections.append((f"e2e diagnostics ({report.when})", text))
    return report


class E2ETimeout(Exception):
    """The test ran past its e2e_timeout."""


@pytest.fixture(autouse=True)
def _e2e_time_bound(request: pytest.FixtureRequest) -> Iterator[None]:
    """Hard upper bound per test; fixture finalizers (process cleanup) still run after it."""
    marker = request.node.get_closest_marker("e2e_timeout")
    seconds = float(marker.args[0]) if marker else DEFAULT_TIMEOUT_S

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise E2ETimeout(f"e2e test exceeded {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _missing_tool(what: str, package: str) -> None:
    msg = f"{what} not installed (Debian: apt-get install {package}; or scripts/setup.sh --peers)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def require_sipp() -> str:
    path = sipp_binary()
    if path is None:
        _missing_tool("sipp", "sip-tester")
    assert path is not None
    return path


@pytest.fixture
def require_baresip() -> str:
    path = baresip_binary()
    if path is None:
        _missing_tool("baresip", "baresip-core")
    assert path is not None
    return path


ServiceFactory = Callable[..., SoftswitchService]


@pytest.fixture
def service_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceFactory]:
    """``make(users, *, auth=None, name=None, start=True)`` -> a (started) SoftswitchService.

    Each service gets fresh ports and its own data_dir under the test's tmp dir.
    ``auth=None`` means relaxed throttle limits (see harness.service.RELAXED_AUTH).
    """
    services: list[SoftswitchService] = []

    def make(
        users: Sequence[User] = (ALICE, BOB, CAROL),
        *,
        auth: dict[str, Any] | None = None,
        name: str | None = None,
        start: bool = True,
        ready_timeout: float = 10.0,
    ) -> SoftswitchService:
        name = name or f"softswitch{len(services) + 1}"
        workdir = tmp_path / name

        def config() -> ServiceConfig:
            return ServiceConfig.allocate(workdir / "data", users, auth=auth)

        def register(svc: SoftswitchService) -> None:
            services.append(svc)
            attach_diagnostics(request.node, svc.log_tail)

        if not start:
            svc = SoftswitchService(config(), workdir, name)
            register(svc)
            return svc
        return start_fresh(config, workdir, name, register, ready_timeout)

    yield make

    crashed = stop_all(services)
    if crashed:
        pytest.fail("\n".join(crashed))


@pytest.fixture
def service(service_factory: ServiceFactory) -> SoftswitchService:
    """A running service with Alice (1001), Bob (1002) and Carol (1003)."""
    return service_factory()


ClientFactory = Callable[..., tuple[SipClient, Registrar]]


@pytest.fixture
def sip_client() -> Iterator[ClientFactory]:
    """``make(service, transport="udp", timeout=4.0)`` -> (SipClient, Registrar); auto-closed."""
    clients: list[SipClient] = []

    def make(
        svc: SoftswitchService, transport: str = "udp", timeout: float = 4.0
    ) -> tuple[SipClient, Registrar]:
        client = SipClient(svc.sip_addr, transport, timeout=timeout)
        clients.append(client)
        return client, Registrar(client, domain=svc.config.domain)

    yield make
    for c in clients:
        c.close()
