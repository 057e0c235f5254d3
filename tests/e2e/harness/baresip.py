"""Drive baresip 1.0.0 (Debian ``baresip-core``) headless as a real SIP phone.

Why baresip: it is a real user agent with its own SIP stack (libre), so it catches what a
scripted client does not (Contact with a generated user part, digest ``uri`` with
``;transport=udp``, no ``algorithm=`` in its Authorization, un-REGISTER on exit).

How: ``BaresipConfig.write()`` creates a config directory (loopback only, no sound card:
``aufile`` source, ALSA ``null`` player, ``ctrl_tcp`` on a loopback port); ``Baresip``
runs ``baresip -f DIR -n 127.0.0.1 -t LIFETIME`` in its own session and talks to it through
``BaresipCtl`` (netstring-framed JSON over TCP). Things learnt the hard way (baresip 1.0.0):

* it also binds TLS on SIP port + 1: allocate ports with ``free_port(span=2)``;
* ``-n lo`` fails, ``-n 127.0.0.1`` works; ``-t`` is a hard lifetime in seconds;
* the first ``REGISTER_OK`` event can fire before we connect to ctrl_tcp: poll ``reginfo``;
* any SHA-256 challenge in a 401 (even next to an MD5 one) makes its REGISTER fail with
  "Function not implemented": it only does MD5 (qop=auth or none);
* on exit it un-REGISTERs (Expires: 0), so check server-side bindings while it runs;
* never load ``mwi.so`` at start with ``mwi=yes`` (1.0.0 can SUBSCRIBE in a tight loop).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .ports import LOOPBACK, free_port, free_udp_range
from .service import tail
from .sipclient import SipMessage, SipParseError, parse_message

MODULE_PATH = "/usr/lib/baresip/modules"  # Debian baresip-core
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: One message of baresip's ``-s`` SIP trace: a bold-cyan ``#`` line, ``UDP src -> dst``,
#: the message as sent or received (CRLF line ends), then an ANSI reset.
_TRACE = re.compile(
    rb"\x1b\[36;1m#\r?\n(?P<transport>[A-Z]+) (?P<src>\S+) -> (?P<dst>\S+)\r?\n"
    rb"(?P<msg>.*?)\x1b\[;m",
    re.DOTALL,
)


@dataclass(frozen=True)
class TracedMessage:
    """One SIP message from baresip's trace; ``incoming`` = received by this phone."""

    transport: str
    src: str
    dst: str
    incoming: bool
    msg: SipMessage

    def __str__(self) -> str:
        arrow = "<-" if self.incoming else "->"
        return f"{arrow} {self.msg.start_line} ({self.src} -> {self.dst})"


def read_wav(path: Path) -> tuple[float, float]:
    """(duration in seconds, RMS of the samples) of a 16-bit WAV, for "is this audio" checks."""
    with wave.open(str(path), "rb") as w:
        frames = w.getnframes()
        rate = w.getframerate()
        data = w.readframes(frames)
        width = w.getsampwidth()
    if width != 2 or not data:
        return (frames / rate if rate else 0.0, 0.0)
    samples = struct.unpack(f"<{len(data) // 2}h", data[: len(data) // 2 * 2])
    rms = math.sqrt(sum(x * x for x in samples) / len(samples)) if samples else 0.0
    return frames / rate, rms


def baresip_binary() -> str | None:
    """Path of the ``baresip`` executable, or None."""
    return shutil.which("baresip")


def write_tone_wav(path: Path, seconds: int = 20, rate: int = 8000, freq: float = 440.0) -> Path:
    """8 kHz mono s16 WAV (aufile needs exactly that): 0.5 s tone, 0.5 s silence, repeated."""
    half = rate // 2
    period = [int(8000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(half)]
    second = struct.pack(f"<{half}h", *period) + b"\x00\x00" * half
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(second * seconds)
    return path


@dataclass
class BaresipConfig:
    """One baresip instance with one account (``user@server``)."""

    user: str
    password: str
    server: tuple[str, int]
    directory: Path
    sip_port: int = field(default_factory=lambda: free_port(span=2))
    ctrl_port: int = field(default_factory=lambda: free_port(udp=False, below_ephemeral=True))
    rtp_ports: tuple[int, int] = field(default_factory=free_udp_range)
    display_name: str = ""
    answermode: str = "auto"
    regint: int = 600
    transport: str = "udp"
    #: Digest user name when it differs from the AoR's user (a delegate registering the
    #: delegator's AoR: ``<sip:1001@...>;auth_user=1002``); "" = the AoR's user.
    auth_user: str = ""
    #: ``-s`` on the command line: every SIP message sent and received goes to the log.
    sip_trace: bool = False
    #: 8 kHz mono WAV the aufile source plays; None = a generated 0.5 s on/off 440 Hz tone.
    audio_file: Path | None = None
    #: Extra lines appended to the ``config`` file (e.g. ``"rtp_stats\t\tyes"``).
    extra_config: tuple[str, ...] = ()

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@{self.server[0]}:{self.server[1]}"

    def write(self) -> Path:
        """Create the config directory (wiped first); returns it."""
        host, port = self.server
        if host != LOOPBACK:
            raise ValueError("baresip only ever talks to 127.0.0.1 in these tests")
        d = self.directory.resolve()
        shutil.rmtree(d, ignore_errors=True)
        (d / "snd").mkdir(parents=True)
        tone = self.audio_file or write_tone_wav(d / "tone8k.wav")
        config = f"""# written by tests/e2e/harness/baresip.py: headless, loopback only
poll_method\t\tepoll
sip_listen\t\t{LOOPBACK}:{self.sip_port}
net_interface\t\t{LOOPBACK}
call_local_timeout\t120
call_max_calls\t\t4
audio_player\t\talsa,null
audio_source\t\taufile,{tone}
audio_alert\t\talsa,null
audio_level\t\tno
audio_buffer\t\t20-160
rtp_ports\t\t{self.rtp_ports[0]}-{self.rtp_ports[1]}
rtp_timeout\t\t0
rtcp_mux\t\tno
jitter_buffer_delay\t5-10
module_path\t\t{MODULE_PATH}
module\t\t\tg711.so
module\t\t\talsa.so
module\t\t\taufile.so
module\t\t\tsndfile.so
module_tmp\t\tuuid.so
module_tmp\t\taccount.so
module_app\t\tcontact.so
module_app\t\tmenu.so
module_app\t\tctrl_tcp.so
ctrl_tcp_listen\t\t{LOOPBACK}:{self.ctrl_port}
snd_path\t\t{d / "snd"}
"""
        config += "".join(line + "\n" for line in self.extra_config)
        (d / "config").write_text(config)
        name = self.display_name or self.user
        auth_user = f";auth_user={self.auth_user}" if self.auth_user else ""
        account = (
            f'"{name}" <sip:{self.user}@{host}:{port};transport={self.transport}>'
            f"{auth_user};auth_pass={self.password};answermode={self.answermode}"
            f";regint={self.regint}"
            ";mwi=no;call_transfer=yes;audio_codecs=pcmu,pcma;pubint=0\n"
        )
        (d / "accounts").write_text(account)
        (d / "contacts").write_text("")
        return d


class BaresipCtl:
    """Client for baresip's ctrl_tcp module: netstring-framed JSON, loopback only.

    request ``{"command": "reginfo", "params": "", "token": "t1"}``,
    reply   ``{"response": true, "ok": true, "data": "...", "token": "t1"}``,
    event   ``{"event": true, "type": "REGISTER_OK", ...}`` (kept in ``self.events``).
    """

    def __init__(self, port: int, *, connect_timeout: float = 10.0) -> None:
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock = socket.create_connection((LOOPBACK, port), timeout=1.0)
                if self.sock.getsockname() != self.sock.getpeername():
                    break
                # TCP simultaneous open: while baresip is not listening yet, the kernel may
                # pick the ctrl port itself (it lies in the ephemeral range) as our source
                # port and connect the socket to itself. Our commands then came back to us
                # and 'reginfo' timed out, now and then, under load.
                self.sock.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ConnectionError(f"baresip ctrl_tcp on port {port} did not accept")
            time.sleep(0.1)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self._token = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _read(self, timeout: float) -> list[dict[str, Any]]:
        self.sock.settimeout(max(0.01, timeout))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return []
        if not data:
            raise ConnectionError("baresip closed the ctrl_tcp connection")
        self.buf += data
        out: list[dict[str, Any]] = []
        while True:
            colon = self.buf.find(b":")
            if colon < 0:
                break
            n = int(self.buf[:colon])
            if len(self.buf) < colon + 1 + n + 1:
                break
            payload = self.buf[colon + 1 : colon + 1 + n]
            self.buf = self.buf[colon + 1 + n + 1 :]
            try:
                obj = json.loads(payload.decode("utf-8", "replace"))
            except ValueError:
                obj = {"raw": payload.decode("utf-8", "replace")}
            if obj.get("event"):
                self.events.append(obj)
            out.append(obj)
        return out

    def command(self, line: str, timeout: float = 5.0) -> dict[str, Any]:
        """Send ``"command params"`` and return the reply carrying our token."""
        command, _, params = line.partition(" ")
        self._token += 1
        token = f"t{self._token}"
        msg = json.dumps({"command": command, "params": params, "token": token}).encode()
        self.sock.sendall(str(len(msg)).encode() + b":" + msg + b",")
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            for obj in self._read(deadline - time.monotonic()):
                if obj.get("response") and obj.get("token") == token:
                    return obj
                seen.append(obj)
        # what came instead tells a silent baresip from a lost or misframed reply
        ends = f"{self.sock.getsockname()} -> {self.sock.getpeername()}"
        raise TimeoutError(
            f"baresip: no reply to {line!r} within {timeout}s on {ends}; "
            f"received meanwhile: {seen[:5]!r}; unframed: {self.buf[:200]!r}"
        )


class Baresip:
    """One baresip process (own session) with its ctrl_tcp connection."""

    def __init__(self, config: BaresipConfig, lifetime: int = 60, name: str = "") -> None:
        self.config = config
        self.lifetime = lifetime
        # two phones can hold the same AoR (a delegate's phone on the delegator's line):
        # ``name`` keeps their logs apart
        self.log_path = config.directory.parent / f"baresip-{name or config.user}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctl: BaresipCtl | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Baresip:
        binary = baresip_binary()
        if binary is None:
            raise FileNotFoundError("baresip not found (Debian: apt-get install baresip-core)")
        d = self.config.write()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (outlives this call: baresip's stdout)
        self.proc = subprocess.Popen(
            [binary, "-f", str(d), "-n", LOOPBACK, "-t", str(self.lifetime)]
            + (["-s"] if self.config.sip_trace else []),
            cwd=d,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.ctl = BaresipCtl(self.config.ctrl_port, connect_timeout=10.0)
        except OSError as exc:
            self.stop()
            raise RuntimeError(f"baresip ctrl_tcp did not come up\n{self.log_tail()}") from exc
        return self

    def reginfo(self) -> str:
        """The ``reginfo`` text with ANSI colours stripped."""
        if self.ctl is None:
            raise RuntimeError("baresip is not running")
        return _ANSI.sub("", str(self.ctl.command("reginfo").get("data", "")))

    def registered(self) -> bool:
        """True when reginfo shows the account line with status OK."""
        for line in self.reginfo().splitlines():
            if self.config.aor in line and re.search(r"\bOK\b", line):
                return True
        return False

    def wait_registered(self, timeout: float = 15.0) -> str:
        """Poll ``reginfo`` every 0.2 s until registered; returns the last reginfo text."""
        deadline = time.monotonic() + timeout
        info = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"baresip exited with {self.proc.returncode}\n{self.log_tail()}")
            info = self.reginfo()
            if self.registered():
                return info
            time.sleep(0.2)
        raise TimeoutError(
            f"baresip {self.config.aor} not registered within {timeout}s; reginfo:\n{info}\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        """``quit`` over ctrl_tcp, then SIGTERM, then SIGKILL the group; never hangs."""
        if self.ctl is not None:
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                self.ctl.command("quit", timeout=1.0)
            self.ctl.close()
            self.ctl = None
        if self.proc is not None:
            for sig, wait in ((None, 3.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
                if self.proc.poll() is not None:
                    break
                if sig is not None:
                    try:
                        os.killpg(self.proc.pid, sig)
                    except ProcessLookupError:
                        break
                try:
                    self.proc.wait(wait)
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        return f"--- baresip log {self.log_path}\n{tail(self.log_path, lines)}"

    # -- events, SIP trace and recordings (additions for the call tests) ---------------------

    def pump(self, timeout: float = 0.0) -> None:
        """Read whatever ctrl_tcp has (events land in ``ctl.events``)."""
        if self.ctl is None:
            raise RuntimeError("baresip is not running")
        deadline = time.monotonic() + timeout
        while True:
            got = self.ctl._read(max(0.0, deadline - time.monotonic()))
            if not got and time.monotonic() >= deadline:
                return

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.ctl.events if self.ctl is not None else []

    def wait_event(self, kind: str, timeout: float = 10.0, since: int = 0) -> dict[str, Any]:
        """The first ctrl_tcp event of type ``kind`` at index >= ``since``; waits up to timeout.

        Why ``since``: events accumulate for the whole life of the phone; a test takes
        ``mark = len(phone.events)`` before an action and waits for what follows it.
        """
        if self.ctl is None:
            raise RuntimeError("baresip is not running")
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.ctl.events[since:]:
                if ev.get("type") == kind:
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [e.get("type") for e in self.ctl.events[since:]]
                raise TimeoutError(
                    f"baresip {self.config.aor}: no {kind} within {timeout}s (events: {seen})\n"
                    f"{self.log_tail()}"
                )
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"baresip exited with {self.proc.returncode}\n{self.log_tail()}")
            self.ctl._read(min(left, 0.2))

    def sip_trace(self) -> list[TracedMessage]:
        """Every SIP message in the log (needs ``sip_trace=True``), in order."""
        try:
            raw = self.log_path.read_bytes()
        except OSError:
            return []
        out: list[TracedMessage] = []
        own = f":{self.config.sip_port}"
        for m in _TRACE.finditer(raw):
            try:
                msg = parse_message(m.group("msg"))
            except SipParseError:
                continue
            dst = m.group("dst").decode()
            out.append(
                TracedMessage(
                    m.group("transport").decode(),
                    m.group("src").decode(),
                    dst,
                    dst.endswith(own),
                    msg,
                )
            )
        return out

    def received(self, start: str) -> list[SipMessage]:
        """Received messages whose start line begins with ``start`` ("CANCEL", "SIP/2.0 200")."""
        return [
            t.msg for t in self.sip_trace() if t.incoming and t.msg.start_line.startswith(start)
        ]

    def log_text(self) -> str:
        """The whole log, ANSI colours stripped."""
        try:
            return _ANSI.sub("", self.log_path.read_text(errors="replace"))
        except OSError:
            return ""

    def rtp_stats(self) -> list[tuple[int, int]]:
        """(packets sent, packets received) per ended call, from the table baresip prints at
        call end when its config has ``rtp_stats yes`` (``extra_config``)::

            audio           Transmit:     Receive:
            packets:            103          101
        """
        return [
            (int(m.group(1)), int(m.group(2)))
            for m in re.finditer(
                r"Transmit:\s+Receive:\s*\r?\npackets:\s+(\d+)\s+(\d+)", self.log_text()
            )
        ]

    def recordings(self, kind: str = "dec") -> list[Path]:
        """sndfile's WAVs: ``dec`` = audio received from the network, ``enc`` = audio sent."""
        return sorted((self.config.directory / "snd").glob(f"dump-*-{kind}.wav"))
