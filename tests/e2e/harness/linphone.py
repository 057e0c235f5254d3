"""Drive linphone-daemon (linphone-cli 5.1.65) headless as a real SIP phone, in a netns.

Why linphone as well as baresip: it is a second, independent SIP stack (belle-sip) with its
own digest, offer/answer and call-state machine; a feature code that works with one phone
and not the other is a real interop bug.

Things learnt the hard way (see /work/shared/interop/README.md §5):

* every instance needs its **own HOME** with ``$HOME/.local/share/linphone`` created first,
  else liblinphone cannot open its sqlite DB and silently never opens a SIP socket; the same
  directory serves as ``XDG_RUNTIME_DIR`` (else PulseAudio leaves ``/tmp/pulse-*`` behind);
* it must run in a **loopback-only network namespace**: the host's DNS is unreachable and
  liblinphone does more network work than a test wants; inside, anything non-local fails
  at once. A veth pair between namespaces carried no traffic, so the *whole* test (service,
  other phones, SIPp, the test's own sockets) runs in that namespace: ``NetNamespace.entered``
  moves the test thread into it with ``setns(2)``; processes started from that thread inherit
  it, and the thread is moved back afterwards;
* ``--pipe NAME`` takes a name and creates the unix socket ``/tmp/NAME`` (a path fails); a
  unix socket is a file, so it does not care about network namespaces;
* the protocol: ``command\\n`` -> ``Status: Ok|Error``, ``Reason:``, ``Key: value`` lines;
  ``pop-event`` returns one queued event and ``Size: <still queued>``.

Everything is bounded: ``timeout LIFETIME linphone-daemon ...`` in its own session, killed by
process group at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .ports import LOOPBACK, free_port
from .service import tail

PIPE_DIR = Path("/tmp")  # fixed by linphone-daemon
CLONE_NEWNET = 0x40000000
_counter = 0


def linphone_binary() -> str | None:
    """Path of ``linphone-daemon`` (Debian package ``linphone-cli``), or None."""
    return shutil.which("linphone-daemon")


# --------------------------------------------------------------------------------------------
# network namespace


def netns_unavailable() -> str | None:
    """Why a loopback-only network namespace cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add, setns)"
    if shutil.which("ip") is None:
        return "ip(8) not installed (Debian: apt-get install iproute2)"
    if not Path("/proc/thread-self/ns/net").exists():
        return "no /proc/thread-self/ns/net"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ip netns does not work here: {exc}"
    return None


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetNamespace:
    """A named, loopback-only network namespace (``ip netns add``, ``lo`` up)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.created = False

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.name

    def create(self) -> NetNamespace:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.created = True
        subprocess.run(
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
            check=True,
            capture_output=True,
            timeout=10,
        )
        return self

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into the namespace for the block, then back.

        Only this thread moves (network namespaces are per thread); what it starts (the
        service, phones, SIPp, threads) and the sockets it opens live inside.
        """
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(self.path, os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def addresses(self) -> str:
        """``ip -br addr`` inside (for the report: only lo must be there)."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.name, "ip", "-br", "addr"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout

    def delete(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
            self.created = False


# --------------------------------------------------------------------------------------------
# the daemon

RC_TEMPLATE = """[sip]
sip_port={sip_port}
sip_tcp_port=0
sip_tls_port=0
bind_address={host}
use_ipv6=0
register_only_when_network_is_up=0
guess_hostname=1
inc_timeout=60
sip_random_port=0

[net]
firewall_policy=0
dns_srv_enabled=0
stun_server=
nat_policy_ref=

[rtp]
audio_rtp_port={rtp_port}
video_rtp_port={vrtp_port}
bind_address={host}
audio_jitt_comp=60

[sound]
echocancellation=0

[video]
capture=0
display=0
automatically_initiate=0
automatically_accept=0

[misc]
max_calls=4
user_agent_name=linphone-e2e-{name}
"""


@dataclass
class LinphoneConfig:
    """One linphone-daemon instance: UDP on 127.0.0.1 only, no STUN/ICE/DNS SRV, no video."""

    name: str
    directory: Path
    sip_port: int = field(default_factory=free_port)
    rtp_port: int = field(default_factory=lambda: free_port(span=4, tcp=False))

    @property
    def home(self) -> Path:
        return self.directory / "home"

    @property
    def rc_path(self) -> Path:
        return self.directory / f"{self.name}.rc"

    def write(self) -> Path:
        shutil.rmtree(self.directory, ignore_errors=True)
        (self.home / ".local" / "share" / "linphone").mkdir(parents=True)
        self.rc_path.write_text(
            RC_TEMPLATE.format(
                name=self.name,
                host=LOOPBACK,
                sip_port=self.sip_port,
                rtp_port=self.rtp_port,
                vrtp_port=self.rtp_port + 2,
            )
        )
        return self.rc_path


@dataclass
class LinphoneReply:
    """One reply of the daemon: ``Status``, ``Reason`` and the ``Key: value`` lines."""

    text: str

    @property
    def ok(self) -> bool:
        return self.field("Status") == "Ok"

    def field(self, key: str) -> str | None:
        m = re.search(rf"^{re.escape(key)}:\s*(.*)$", self.text, re.M)
        return m.group(1).strip() if m else None


class LinphoneDaemon:
    """One ``linphone-daemon`` process (own session, own HOME) and its command socket."""

    def __init__(
        self, config: LinphoneConfig, lifetime: int = 60, auto_answer: bool = False
    ) -> None:
        global _counter
        _counter += 1
        self.config = config
        self.lifetime = lifetime
        self.auto_answer = auto_answer
        self.pipe = f"lpd-e2e-{os.getpid()}-{_counter}"
        self.log_path = config.directory / f"{config.name}.log"
        self.stdout_path = config.directory / f"{config.name}.stdout"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.events: list[dict[str, str]] = []
        self.transcript: list[str] = []
        self._out: IO[bytes] | None = None

    def start(self, connect_timeout: float = 10.0) -> LinphoneDaemon:
        binary = linphone_binary()
        if binary is None:
            raise FileNotFoundError("linphone-daemon not found (apt-get install linphone-cli)")
        rc = self.config.write()
        home = str(self.config.home)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "XDG_RUNTIME_DIR": home,
            "LANG": "C.UTF-8",
        }
        argv = ["timeout", "-s", "KILL", str(self.lifetime), binary, "--config", str(rc)]
        argv += ["--pipe", self.pipe, "--log", str(self.log_path)]
        if self.auto_answer:
            argv.append("--auto-answer")
        self._out = open(self.stdout_path, "ab")  # noqa: SIM115 (the daemon's stdout)
        self.proc = subprocess.Popen(
            argv,
            cwd=self.config.directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + connect_timeout
        path = str(PIPE_DIR / self.pipe)
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                self.sock = s
                break
            except OSError:
                s.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"linphone-daemon {self.config.name}: no command socket {path}\n"
                        f"{self.log_tail()}"
                    ) from None
                time.sleep(0.1)
        return self

    def cmd(self, line: str, timeout: float = 5.0) -> LinphoneReply:
        """Send one command; the reply ends when ``Status:`` came and the socket is quiet."""
        if self.sock is None:
            raise RuntimeError("linphone-daemon is not running")
        self.sock.sendall((line + "\n").encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            quiet = 0.05 if b"Status:" in data else max(0.05, deadline - time.monotonic())
            self.sock.settimeout(quiet)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if b"Status:" in data:
                    break
                continue
            if not chunk:
                break
            data += chunk
        text = data.decode("utf-8", "replace")
        if line != "pop-event" or "Event-type" in text:
            self.transcript.append(f">> {line}\n{text.strip()}")
        return LinphoneReply(text)

    def poll_events(self, limit: int = 200) -> None:
        """Move queued events into ``events`` (one ``pop-event`` per event)."""
        for _ in range(limit):
            reply = self.cmd("pop-event")
            if "Event-type" in reply.text:
                self.events.append(dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", reply.text, re.M)))
            if reply.field("Size") in (None, "0"):
                return

    def mark(self) -> int:
        self.poll_events()
        return len(self.events)

    def wait_event(
        self, state: str, timeout: float = 10.0, *, since: int = 0, call_id: str | None = None
    ) -> dict[str, str]:
        """The first event at index >= ``since`` whose ``Event`` contains ``state``."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll_events()
            for ev in self.events[since:]:
                if state in ev.get("Event", "") and (call_id is None or ev.get("Id") == call_id):
                    return ev
            if time.monotonic() >= deadline:
                seen = [(e.get("Event-type"), e.get("Event"), e.get("Id")) for e in self.events]
                raise TimeoutError(
                    f"linphone {self.config.name}: no {state} within {timeout}s; events {seen}\n"
                    f"{self.log_tail()}"
                )
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"linphone-daemon exited\n{self.log_tail()}")
            time.sleep(0.1)

    def register(self, user: str, password: str, server: tuple[str, int]) -> None:
        host, port = server
        reply = self.cmd(f"register sip:{user}@{host}:{port} sip:{host}:{port} {password}")
        if not reply.ok:
            raise RuntimeError(f"linphone register refused: {reply.text}")

    def wait_registered(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            reply = self.cmd("register-status ALL")
            if "RegistrationOk" in reply.text:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"linphone {self.config.name} not registered: {reply.text}\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def call(self, uri: str) -> str:
        """Place a call; returns the daemon's call id."""
        reply = self.cmd(f"call {uri}")
        call_id = reply.field("Id")
        if not reply.ok or call_id is None:
            raise RuntimeError(f"linphone call {uri} refused: {reply.text}")
        return call_id

    def stop(self) -> None:
        """``quit``, then SIGTERM/SIGKILL the process group; never hangs."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.sendall(b"quit\n")
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            for sig, wait in ((None, 2.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 3.0)):
                if self.proc.poll() is not None:
                    break
                if sig is not None:
                    try:
                        os.killpg(self.proc.pid, sig)
                    except ProcessLookupError:
                        break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(wait)
        if self._out is not None:
            self._out.close()
            self._out = None
        with contextlib.suppress(OSError):
            (PIPE_DIR / self.pipe).unlink()

    def log_tail(self, lines: int = 40) -> str:
        return (
            f"--- linphone {self.config.name} commands\n"
            + "\n".join(self.transcript[-15:])
            + f"\n--- linphone log {self.log_path}\n{tail(self.log_path, lines)}"
            + f"\n--- stdout\n{tail(self.stdout_path, 10)}"
        )
