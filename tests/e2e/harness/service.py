"""Start, probe, signal and stop the softswitch exactly as an operator would: from its CLI.

Why a subprocess and not an in-process asyncio task: the e2e tests must see what users see
(config file parsing, signal handling, exit codes, persistence across SIGKILL) and must not
share an event loop, signal handlers or module state with pytest.

The service is started as ``sys.executable -m softswitch run --config FILE`` in its own
session (process group), so a crash-style ``SIGKILL`` reaches every process it spawned and
cleanup never touches anything else. stdout/stderr go to files in the test's tmp dir; their
tails are attached to failing test reports by ``tests/e2e/conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .ports import LOOPBACK, free_port, free_udp_range
from .sipclient import SipClient, SipTimeout

REPO_ROOT = Path(__file__).resolve().parents[3]

#: Generous throttle limits: every e2e test runs from 127.0.0.1, so a test that is not about
#: throttling must never trip it (a single SIPp run alone sends 2,000 REGISTERs).
RELAXED_AUTH: dict[str, Any] = {
    "algorithms": ["MD5"],
    "max_failures": 1_000_000,
    "failure_window": 60,
    "block_time": 60,
}


_PORT_CLASH = re.compile(r"address already in use|errno 98|eaddrinuse", re.IGNORECASE)


class ServiceError(RuntimeError):
    """The service did not start, did not become ready, or died."""


@dataclass(frozen=True)
class User:
    """One configured extension."""

    extension: str
    password: str
    name: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "extension": self.extension,
            "name": self.name or f"User {self.extension}",
            "password": self.password,
        }


ALICE = User("1001", "secret1", "Alice Exec")
BOB = User("1002", "secret2", "Bob Builder")
CAROL = User("1003", "secret3", "Carol Chef")


@dataclass
class ServiceConfig:
    """The YAML config the service reads (see the contract in the project docs)."""

    sip_port: int
    http_port: int
    data_dir: Path
    users: list[User]
    media_ports: tuple[int, int]
    auth: dict[str, Any] | None = field(default_factory=lambda: dict(RELAXED_AUTH))
    domain: str = LOOPBACK
    delegations: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def allocate(
        cls,
        data_dir: Path,
        users: Sequence[User],
        *,
        auth: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ServiceConfig:
        """A config on fresh free ports (SIP udp+tcp on one number, HTTP, an RTP range)."""
        return cls(
            sip_port=free_port(),
            http_port=free_port(udp=False),
            data_dir=Path(data_dir).resolve(),
            users=list(users),
            media_ports=free_udp_range(),
            auth=dict(RELAXED_AUTH) if auth is None else auth,
            **kwargs,
        )

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "domain": self.domain,
            "listen": [f"udp:{LOOPBACK}:{self.sip_port}", f"tcp:{LOOPBACK}:{self.sip_port}"],
            "http": f"{LOOPBACK}:{self.http_port}",
            "data_dir": str(self.data_dir),
            "media": {"address": LOOPBACK, "ports": f"{self.media_ports[0]}-{self.media_ports[1]}"},
            "users": [u.as_dict() for u in self.users],
            "delegations": list(self.delegations),
        }
        if self.auth is not None:
            d["auth"] = self.auth
        d.update(self.extra)
        return d

    def to_yaml(self) -> str:
        return to_yaml(self.as_dict())


def to_yaml(data: dict[str, Any]) -> str:
    """Emit YAML without a YAML library: block keys, JSON (= YAML flow) values.

    JSON scalars are always quoted where YAML could misread them (extensions like "0100",
    "udp:127.0.0.1:5060"), and a list of mappings gets one ``- {...}`` line per item so a
    human can read the file in a failure report.
    """
    lines = ["# written by tests/e2e/harness/service.py"]
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{key}:")
            lines += [f"  - {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def tail(path: Path, lines: int = 60, max_bytes: int = 64_000) -> str:
    """Last ``lines`` lines of a log file ('' if missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class SoftswitchService:
    """One softswitch process (restartable on the same config, ports and data_dir)."""

    def __init__(self, config: ServiceConfig, workdir: Path, name: str = "softswitch") -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.name = name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / f"{name}.yaml"
        self.stdout_path = self.workdir / f"{name}.stdout.log"
        self.stderr_path = self.workdir / f"{name}.stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._files: list[IO[bytes]] = []
        self._stopping = False

    # -- addresses ---------------------------------------------------------------------------

    @property
    def sip_addr(self) -> tuple[str, int]:
        return (LOOPBACK, self.config.sip_port)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "softswitch", "run", "--config", str(self.config_path)]

    # -- lifecycle ---------------------------------------------------------------------------

    def write_config(self, text: str | None = None) -> None:
        """Write ``self.config`` (or raw ``text``, e.g. a deliberately broken config)."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(self.config.to_yaml() if text is None else text)
        tmp.replace(self.config_path)  # atomic: a SIGHUP never sees half a file

    def start(self, ready_timeout: float = 10.0) -> SoftswitchService:
        """Spawn the service and wait until it answers OPTIONS with 200."""
        if self.alive():
            raise ServiceError(f"{self.name} is already running (pid {self.pid})")
        self._close_files()
        self.write_config()
        self.starts += 1
        # both files outlive this call (the child writes to them): closed in _close_files()
        out = open(self.stdout_path, "ab")  # noqa: SIM115
        err = open(self.stderr_path, "ab")  # noqa: SIM115
        self._files = [out, err]
        marker = f"----- harness: start #{self.starts} at {time.strftime('%H:%M:%S')} -----\n"
        for f in self._files:
            f.write(marker.encode())
            f.flush()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # A source checkout works even if the package is not installed (the venv still
        # needs the dependencies); an installed (editable) package resolves to the same code.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self._stopping = False
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def probe(self, timeout: float = 0.25) -> bool:
        """One OPTIONS over UDP; True on a 200."""
        try:
            with SipClient(self.sip_addr, "udp", timeout=timeout) as c:
                return c.options(timeout=timeout).status == 200
        except (SipTimeout, OSError, ValueError):
            return False

    def started(self) -> bool:
        """True once the latest start logged `service_started`: every listener is bound.

        OPTIONS over UDP alone is not enough: the UDP endpoint serves as soon as it is bound,
        while the TCP listener is still being set up, and a TCP test that connected in that
        gap was refused (once in CI).
        """
        text = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return '"event":"service_started"' in text.rsplit("----- harness: start #", 1)[-1]

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll OPTIONS every 50 ms until 200 and the start is logged as complete; fail fast
        if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll() if self.proc else None
            if code is not None:
                raise ServiceError(
                    f"{self.name} exited with code {code} before it was ready\n{self.log_tail()}"
                )
            if self.probe(timeout=0.2) and self.started():
                return
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"{self.name} did not answer OPTIONS sip:{LOOPBACK}:{self.config.sip_port} "
                    f"with 200 and log service_started within {timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """Signal the main process (not the group): SIGHUP, SIGTERM are its business."""
        if not self.alive() or self.proc is None:
            raise ServiceError(f"{self.name} is not running\n{self.log_tail()}")
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILLs the group after ``timeout``)."""
        if self.proc is None:
            raise ServiceError(f"{self.name} was never started")
        self._stopping = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._killpg()
                self.proc.wait(5)
                self._close_files()
                raise ServiceError(
                    f"{self.name} ignored SIGTERM for {timeout:.0f}s (SIGKILLed)\n{self.log_tail()}"
                ) from None
        self._close_files()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL the whole process group, like a crash or ``kill -9``."""
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self._killpg()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self._close_files()

    def restart(self, ready_timeout: float = 10.0) -> SoftswitchService:
        """Clean stop (SIGTERM) and start again on the same config and data_dir."""
        self.stop()
        return self.start(ready_timeout)

    def reload(self, config: ServiceConfig | None = None, *, text: str | None = None) -> None:
        """Rewrite the config file (new config or raw text) and send SIGHUP."""
        if config is not None:
            self.config = config
        self.write_config(text)
        self.send_signal(signal.SIGHUP)

    def died_unexpectedly(self) -> int | None:
        """Exit code if the process ended without the harness asking it to, else None."""
        if self.proc is None or self._stopping:
            return None
        return self.proc.poll()

    def cleanup(self) -> None:
        """Finalizer: whatever happened, leave no process behind."""
        if self.alive():
            with contextlib.suppress(ServiceError):
                self.stop(timeout=5.0)
        self.kill()

    def _killpg(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: pgid == pid

    def _close_files(self) -> None:
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()
        self._files = []

    # -- diagnostics -------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        parts = [f"--- {self.name}: {' '.join(self.command())}"]
        for path in (self.stderr_path, self.stdout_path):
            parts.append(f"--- {path} (last {lines} lines)\n{tail(path, lines)}")
        return "\n".join(parts)

    def log_paths(self) -> list[Path]:
        return [self.config_path, self.stderr_path, self.stdout_path]

    def failed_on_port_clash(self) -> bool:
        """True if the latest start's stderr says a listening port was taken.

        ``free_port()`` checks a port and the service binds it a moment later; in between
        another program can take it. Rare, but a test must not fail for that.
        """
        text = tail(self.stderr_path, 200)
        text = text.rsplit("----- harness: start #", 1)[-1]
        return bool(_PORT_CLASH.search(text))


def start_fresh(
    make_config: Callable[[], ServiceConfig],
    workdir: Path,
    name: str,
    register: Callable[[SoftswitchService], None],
    ready_timeout: float = 10.0,
) -> SoftswitchService:
    """Start a service; if another process took one of its ports between allocation and bind,
    retry (up to three times) with a new config from `make_config`.

    `register` sees the service before it starts (fixtures record it for `stop_all` and attach
    its log to the failure report), so a start that fails still leaves its log and is stopped.
    """
    svc = SoftswitchService(make_config(), workdir, name)
    register(svc)
    for attempt in range(3):
        try:
            return svc.start(ready_timeout)
        except ServiceError:
            if attempt == 2 or not svc.failed_on_port_clash():
                raise
            svc.config = make_config()
    return svc


def stop_all(services: Sequence[SoftswitchService]) -> list[str]:
    """Stop every service; one message per service that died during the test (else none)."""
    died = [(s, s.died_unexpectedly()) for s in services]
    for svc in services:
        svc.cleanup()
    return [
        f"{s.name} died during the test (exit code {code})\n{s.log_tail()}"
        for s, code in died
        if code is not None
    ]


def service_events(svc: SoftswitchService, event: str | None = None) -> list[dict[str, Any]]:
    """The service's JSON log lines (its stderr), optionally only those of one event.

    Lines that are not JSON (a traceback, Python's own warnings) are skipped.
    """
    out: list[dict[str, Any]] = []
    try:
        text = svc.stderr_path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if event is None or obj.get("event") == event:
            out.append(obj)
    return out
