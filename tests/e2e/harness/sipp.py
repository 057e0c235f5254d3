"""Run SIPp 3.6.1 scenarios headless, bounded in count and time, and read back its statistics.

Why a wrapper: SIPp's own ``-timeout`` does not end a run while a call still waits for UDP
retransmissions (a dead server keeps it alive ~30 s), it binds a control port (8888) and
media ports (6000, 6002) by default that collide between runs, and its exit code alone says
nothing about *how many* calls succeeded. The wrapper pins every port to a free loopback
one, adds ``-recv_timeout`` so each call is bounded, kills the run's process group on a hard
deadline, and parses the ``-trace_stat`` CSV into counters.

SIPp exit codes: 0 all calls succeeded, 1 at least one failed, 97 stopped by an internal
command, 99 ended without processing calls, 255/-1 fatal error, 254/-2 fatal bind error
(then the run is retried on fresh ports, up to 3 times, unless the caller fixed the port).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .ports import LOOPBACK, free_port, port_is_free
from .service import tail
from .sipclient import SipMessage, SipParseError, parse_message

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"


def sipp_binary() -> str | None:
    """Path of the ``sipp`` executable (Debian package ``sip-tester``), or None."""
    return shutil.which("sipp")


def write_inf_csv(path: Path, users: Iterable[tuple[str, str]], order: str = "SEQUENTIAL") -> Path:
    """Write a SIPp ``-inf`` file: field0 = user, field1 = the whole authentication keyword.

    SIPp 3.6.1 cannot nest ``[field1]`` inside ``[authentication username=[field0] ...]``
    (the header comes out garbled), so each line carries the complete keyword, e.g.
    ``200000;[authentication username=200000 password=pw200000]``, and the scenario puts
    ``[field1]`` where the Authorization header goes.
    """
    with open(path, "w") as f:
        f.write(order + "\n")
        for user, password in users:
            if any(c in user + password for c in ";[] \n"):
                raise ValueError(f"user/password unusable in a SIPp CSV: {user!r}/{password!r}")
            f.write(f"{user};[authentication username={user} password={password}]\n")
    return path


@dataclass
class SippResult:
    """Outcome of one SIPp run."""

    returncode: int
    stats: dict[str, str]
    workdir: Path
    name: str
    command: list[str]
    local_port: int
    timed_out: bool = False
    files: dict[str, Path] = field(default_factory=dict)

    def counter(self, name: str) -> int:
        v = self.stats.get(name, "").strip()
        return int(v) if v else 0

    @property
    def successful(self) -> int:
        return self.counter("SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return self.counter("FailedCall(C)")

    @property
    def created(self) -> int:
        return self.counter("OutgoingCall(C)") + self.counter("IncomingCall(C)")

    def messages(self, direction: str = "received") -> list[SipMessage]:
        """Messages from the full trace (runs started with ``start_sipp``), in order."""
        path = self.files.get("trace")
        if path is None:
            return []
        return [m for d, m in read_message_trace(path) if d == direction]

    def failure_breakdown(self) -> dict[str, int]:
        return {
            k: self.counter(k)
            for k in self.stats
            if k.startswith("Failed") and k.endswith("(C)") and self.counter(k)
        }

    def describe(self, lines: int = 25) -> str:
        """Counters plus the tails of SIPp's own logs, for assertion messages."""
        out = [
            f"sipp {self.name}: exit {self.returncode}{' (TIMED OUT)' if self.timed_out else ''}, "
            f"created {self.created}, successful {self.successful}, failed {self.failed}, "
            f"retransmissions {self.counter('Retransmissions(C)')}, "
            f"failures {self.failure_breakdown()}",
            "command: " + " ".join(self.command),
        ]
        for label, path in self.files.items():
            if label in ("stat", "screen"):  # the screen repeats stdout
                continue
            text = tail(path, lines)
            if text:
                out.append(f"--- sipp {label}: {path}\n{text}")
        return "\n".join(out)


def read_stat_csv(path: Path) -> dict[str, str]:
    """The last row of a ``-trace_stat`` file as {column: value} ({} if missing/empty)."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f, delimiter=";") if r]
    except OSError:
        return {}
    if len(rows) < 2:
        return {}
    header = [h.strip() for h in rows[0]]
    return {h: v.strip() for h, v in zip(header, rows[-1], strict=False)}


def run_sipp(
    scenario: str | Path,
    *,
    target: tuple[str, int],
    workdir: Path,
    name: str = "sipp",
    transport: str = "u1",
    inf: Path | None = None,
    calls: int = 1,
    rate: float = 10.0,
    limit: int | None = None,
    recv_timeout_ms: int = 5000,
    run_timeout: float = 60.0,
    local_port: int | None = None,
    extra: Sequence[str] = (),
    trace_messages: bool = True,
) -> SippResult:
    """Run one SIPp client, bounded by ``-m calls`` and ``run_timeout`` seconds.

    ``scenario`` is a file name in ``tests/e2e/scenarios`` or a path. The run's files
    (stat CSV, error log, screen, short message trace) land in ``workdir`` under ``name``.
    ``result.local_port`` is SIPp's SIP port (the port in the Contacts it registers).
    """
    for attempt in range(3):
        result = _run_sipp_once(
            scenario,
            target=target,
            workdir=workdir,
            name=name,
            transport=transport,
            inf=inf,
            calls=calls,
            rate=rate,
            limit=limit,
            recv_timeout_ms=recv_timeout_ms,
            run_timeout=run_timeout,
            local_port=local_port,
            extra=extra,
            trace_messages=trace_messages,
        )
        if result.returncode != FATAL_BIND_ERROR or local_port is not None or attempt == 2:
            return result
    raise AssertionError("unreachable")


FATAL_BIND_ERROR = 254


def _run_sipp_once(
    scenario: str | Path,
    *,
    target: tuple[str, int],
    workdir: Path,
    name: str,
    transport: str,
    inf: Path | None,
    calls: int,
    rate: float,
    limit: int | None,
    recv_timeout_ms: int,
    run_timeout: float,
    local_port: int | None,
    extra: Sequence[str],
    trace_messages: bool,
) -> SippResult:
    run = _start_sipp(
        scenario,
        target=target,
        workdir=workdir,
        name=name,
        transport=transport,
        inf=inf,
        calls=calls,
        rate=rate,
        limit=limit,
        recv_timeout_ms=recv_timeout_ms,
        run_timeout=run_timeout,
        local_port=local_port,
        extra=extra,
        trace_messages=trace_messages,
        full_trace=False,
    )
    return run.wait()


def _start_sipp(
    scenario: str | Path,
    *,
    target: tuple[str, int],
    workdir: Path,
    name: str,
    transport: str,
    inf: Path | None,
    calls: int,
    rate: float,
    limit: int | None,
    recv_timeout_ms: int,
    run_timeout: float,
    local_port: int | None,
    extra: Sequence[str],
    trace_messages: bool,
    full_trace: bool,
) -> SippProcess:
    binary = sipp_binary()
    if binary is None:
        raise FileNotFoundError("sipp not found (Debian: apt-get install sip-tester)")
    host, port = target
    if host != LOOPBACK:
        raise ValueError("SIPp only ever talks to 127.0.0.1 in these tests")
    scen = Path(scenario)
    if not scen.is_absolute():
        scen = SCENARIO_DIR / scen
    workdir.mkdir(parents=True, exist_ok=True)
    files = {
        "stat": workdir / f"{name}_stat.csv",
        "errors": workdir / f"{name}_errors.log",
        "screen": workdir / f"{name}_screen.log",
        "messages": workdir / f"{name}_shortmessages.log",
        "stdout": workdir / f"{name}_stdout.log",
    }
    if full_trace:
        files["trace"] = workdir / f"{name}_messages.log"
        files["logs"] = workdir / f"{name}_logs.log"
    for p in files.values():
        p.unlink(missing_ok=True)
    sip_port = local_port or free_port()
    cmd = [
        binary, f"{host}:{port}",
        "-sf", str(scen),
        "-t", transport,
        "-i", LOOPBACK, "-mi", LOOPBACK, "-ci", LOOPBACK,
        "-p", str(sip_port),
        "-mp", str(free_port(span=4, tcp=False)),  # sipp binds mp and mp+2
        "-cp", str(free_port(tcp=False)),          # control socket, 8888 by default
        "-nostdin",
        "-m", str(calls),
        "-r", f"{rate:g}",
        "-l", str(limit or max(calls, 1)),
        "-recv_timeout", str(recv_timeout_ms),
        "-timeout", f"{max(1, int(run_timeout) - 5)}s",
        "-trace_stat", "-stf", str(files["stat"]), "-fd", "1",
        "-trace_err", "-error_file", str(files["errors"]),
        "-trace_screen", "-screen_file", str(files["screen"]),
    ]  # fmt: skip
    if trace_messages:
        cmd += ["-trace_shortmsg", "-shortmessage_file", str(files["messages"])]
    if full_trace:
        cmd += ["-trace_msg", "-message_file", str(files["trace"])]
        cmd += ["-trace_logs", "-log_file", str(files["logs"])]
    if inf is not None:
        cmd += ["-inf", str(inf)]
    cmd += list(extra)
    out = open(files["stdout"], "wb")  # noqa: SIM115 (outlives this call: SIPp's stdout)
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except BaseException:
        out.close()
        raise
    return SippProcess(proc, cmd, workdir, name, sip_port, files, run_timeout, out)


class SippProcess:
    """A SIPp run in flight: ``wait()`` bounds it and returns its ``SippResult``.

    Why: a SIPp UAS (a desk phone that rings, answers or is busy) must be listening while the
    test places the call, so it runs in the background; ``run_sipp`` is start + wait.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        cmd: list[str],
        workdir: Path,
        name: str,
        local_port: int,
        files: dict[str, Path],
        run_timeout: float,
        out: IO[bytes],
    ) -> None:
        self.proc = proc
        self.cmd = cmd
        self.workdir = workdir
        self.name = name
        self.local_port = local_port
        self.files = files
        self.deadline = time.monotonic() + run_timeout
        self._out = out
        self.result: SippResult | None = None

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for the exit (at most ``timeout`` s, or until the run's own deadline).

        On the deadline the process group is SIGTERMed (SIPp then writes its statistics).
        """
        if self.result is not None:
            return self.result
        left = self.deadline - time.monotonic()
        if timeout is not None:
            left = min(left, timeout)
        timed_out = False
        try:
            rc = self.proc.wait(max(0.0, left))
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = _terminate_group(self.proc)
        self._out.close()
        # the stat file is written at exit; give a slow filesystem a moment
        deadline = time.monotonic() + 2.0
        stats = read_stat_csv(self.files["stat"])
        while not stats and time.monotonic() < deadline:
            time.sleep(0.1)
            stats = read_stat_csv(self.files["stat"])
        self.result = SippResult(
            rc, stats, self.workdir, self.name, self.cmd, self.local_port, timed_out, self.files
        )
        return self.result

    def stop(self) -> SippResult:
        """End the run now (SIGTERM, then SIGKILL) and collect what it wrote."""
        return self.wait(timeout=0.0)

    def listening(self) -> bool:
        """True once SIPp has bound its UDP SIP port (so an INVITE sent now is received)."""
        return self.proc.poll() is None and not port_is_free(self.local_port, tcp=False)

    def wait_listening(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"sipp {self.name} exited early\n{self.wait().describe()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"sipp {self.name} not listening on {self.local_port}")
            time.sleep(0.05)

    def describe(self) -> str:
        """For failure reports: the result if it ended, else the command line."""
        if self.result is not None:
            return self.result.describe()
        running = SippResult(-1, {}, self.workdir, self.name, self.cmd, self.local_port)
        running.files = self.files
        return "(still running) " + running.describe()


def start_sipp(
    scenario: str | Path,
    *,
    target: tuple[str, int],
    workdir: Path,
    name: str = "sipp",
    transport: str = "u1",
    calls: int = 1,
    recv_timeout_ms: int = 10000,
    run_timeout: float = 60.0,
    local_port: int | None = None,
    keys: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> SippProcess:
    """Start SIPp in the background with a full message trace (``SippResult.messages()``).

    ``keys`` become ``-key NAME VALUE`` (the scenario's ``[NAME]``). Use ``local_port`` to
    run a UAS on the port a ``register_sipp`` call registered.
    """
    args = list(extra)
    for k, v in (keys or {}).items():
        args += ["-key", k, v]
    return _start_sipp(
        scenario,
        target=target,
        workdir=workdir,
        name=name,
        transport=transport,
        inf=None,
        calls=calls,
        rate=10.0,
        limit=None,
        recv_timeout_ms=recv_timeout_ms,
        run_timeout=run_timeout,
        local_port=local_port,
        extra=args,
        trace_messages=True,
        full_trace=True,
    )


def register_sipp(
    target: tuple[str, int],
    *,
    workdir: Path,
    aor_user: str,
    password: str,
    auth_user: str | None = None,
    local_port: int | None = None,
    expires: int = 300,
    name: str | None = None,
) -> SippResult:
    """REGISTER ``aor_user`` with Contact on SIPp's port (``result.local_port``), digest auth.

    Run a UAS with ``local_port=result.local_port`` afterwards: the service forks to the
    binding's source address, which is that port.
    """
    return run_sipp(
        "reg_one.xml",
        target=target,
        workdir=workdir,
        name=name or f"reg_{aor_user}",
        calls=1,
        local_port=local_port or free_port(),
        run_timeout=15.0,
        extra=[
            "-s", aor_user,
            "-au", auth_user or aor_user,
            "-ap", password,
            "-key", "expires", str(expires),
        ],
    )  # fmt: skip


#: One entry of SIPp's ``-trace_msg`` file: a dashed line with a timestamp, then
#: "UDP message received [N] bytes :" or "UDP message sent (N bytes):", a blank line, the
#: message.
_MSG_ENTRY = re.compile(
    r"^-{10,} [^\n]*\n(?P<proto>\S+) message (?P<dir>received|sent)[^\n]*:\n\n",
    re.MULTILINE,
)


def read_message_trace(path: Path) -> list[tuple[str, SipMessage]]:
    """Parse a ``-trace_msg`` file into ("received"|"sent", message) pairs, in order."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    heads = list(_MSG_ENTRY.finditer(text))
    out: list[tuple[str, SipMessage]] = []
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        chunk = text[m.end() : end].strip("\n")
        if not chunk.strip():
            continue
        try:
            msg = parse_message(chunk.replace("\r\n", "\n").replace("\n", "\r\n").encode())
        except SipParseError:
            continue
        out.append((m.group("dir"), msg))
    return out


def _terminate_group(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM the run's process group (SIPp then dumps its stats), SIGKILL after 3 s."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait(1.0)
