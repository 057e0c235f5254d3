"""The running service: wires transports, the transaction layer, the registrar and the store.

Lifecycle as in aiohttp's runner: `start()` opens the store, loads bindings and binds the
listeners; `stop()` undoes it in reverse; `run_forever()` adds SIGHUP (reload, keeping the last
good config) and SIGTERM/SIGINT (clean stop). The protocol objects never see the loop: this
module feeds them bytes and `loop.time()`, sends what they emit and keeps one timer armed at
their earliest deadline (the aioquic pattern).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from pathlib import Path

from dialplan import Config, ConfigError, load_config
from media.relay import MediaManager
from softswitch.logline import EventLog

from . import logs, native
from .call_control import CallControl
from .call_model import Call, ForkTarget
from .call_setup import CallSetup
from .calls import B2BUA
from .directory import Directory
from .http_api import HttpApi
from .http_server import HttpServer, HttpServerError
from .lines import Direction, LineBus
from .overload import REPORT_INTERVAL, StaleFilter, Verdict
from .registrar import AuthResult, Bindings, Outcome, Registrar, RegistrarPolicy
from .sca import ScaManager
from .sip.dialog import new_tag
from .sip.digest import Algorithm, DigestAuthenticator
from .sip.errorreply import error_response
from .sip.errors import ParseError
from .sip.message import REASONS, Request, Response, parse_message
from .sip.transaction import Address, ClientTransaction, ServerTransaction
from .sip.transaction_layer import (
    AckReceived,
    AckTimeout,
    RequestReceived,
    ResponseReceived,
    StrayResponse,
    TransactionLayer,
    TransactionTimeout,
    stamp_received,
)
from .sip.transaction_layer import TransportError as DeliveryFailed
from .sip.uri import SipUri
from .stateless import StatelessReplies
from .store.sqlite import SqliteStore, StoreError
from .subscriptions import SubscriptionManager
from .throttle import FailureThrottle
from .transport import TcpLimits, TransportError, TransportManager

log = EventLog("softswitch")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, REFER, NOTIFY, SUBSCRIBE, UPDATE, INFO"
SUPPORTED: frozenset[str] = frozenset()
ALLOW_EVENTS = "dialog, call-info, line-seize"
HOUSEKEEPING_INTERVAL = 30.0
FULL_GC_AFTER = 100  # middle-generation collections between full ones (CPython's default: 10)


class ServiceError(Exception):
    """The service cannot start (a port in use, the data directory unwritable)."""


class Service:
    """One softswitch instance."""

    def __init__(self, cfg: Config, config_path: Path, data_dir_base: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.data_dir_base = data_dir_base
        self.layer = TransactionLayer()
        self.stale = StaleFilter(cfg.overload.max_queue_delay_ms / 1000, self._retransmits)
        self._overload_report: asyncio.TimerHandle | None = None
        self.transports = TransportManager(
            self._on_message,
            cfg.max_message_size,
            self._on_framing_error,
            admit=self._admit,
            kernel_drops=self._kernel_drops,
            tcp=_tcp_limits(cfg),
        )
        self.store = SqliteStore(cfg.data_dir / "softswitch.db")
        self.bindings = Bindings()
        self.throttle = FailureThrottle()
        self.registrar = self._make_registrar(cfg, None)
        self.bus = LineBus()
        self.media = MediaManager(str(cfg.media.address), cfg.media.ports.low, cfg.media.ports.high)
        self.b2bua = B2BUA(
            self.layer, self.media, self.bus, self._local_address, self._flush, self._loop_time
        )
        self.calls = CallControl(
            self.layer,
            self.b2bua,
            self._make_setup(cfg),
            self.store,
            self.throttle,
            self._respond,
            cfg,
        )
        # The dialog-event and the SCA notifiers are fed the same way: build, subscribe,
        # route responses, timeouts, timers and reloads to both (`_notifiers`).
        notifier = (
            self.layer, self._local_address, self.registrar.auth, self.registrar.directory,
            cfg, self.bus.model, self._flush, self._loop_time,
        )  # fmt: skip
        self.subscriptions = SubscriptionManager(*notifier, throttle=self.throttle)
        self.sca = ScaManager(*notifier, throttle=self.throttle)
        self._notifiers: tuple[SubscriptionManager, ...] = (self.subscriptions, self.sca)
        for n in self._notifiers:
            self.bus.subscribe(n.on_line_event)
        #: Stateless 401s by (hash of the REGISTER's bytes, its source), for retransmissions
        self.challenges = StatelessReplies()
        # Asked after every message: bound methods, not a tuple rebuilt each time.
        self._timer_sources = (
            self.layer.get_timer,
            self.b2bua.get_timer,
            *(n.get_timer for n in self._notifiers),
            self.challenges.get_timer,
        )
        self.calls.sca = self.sca
        self.b2bua.fork_headers = self._fork_headers
        self.http_api = HttpApi(lambda: self.cfg, self.bus)
        self.http = HttpServer(self.http_api.handle)
        self._pumping = False
        self._pump_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._housekeeping: asyncio.Task[None] | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.store.open()
            self.bindings.load(await self.store.load_bindings(time.time()))
            await self.calls.load_state()
        except (StoreError, OSError) as exc:
            raise ServiceError(f"cannot open the data store: {exc}") from exc
        try:
            for spec in self.cfg.listen:
                await self.transports.listen(spec.transport, str(spec.host), spec.port)
            await self.http.start(*self.cfg.http.address)
        except (TransportError, HttpServerError) as exc:
            await self.http.close()
            await self.transports.close()
            await self.store.close()
            raise ServiceError(str(exc)) from exc
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
        # The start-up heap (config, bindings, modules) never dies: keep the cyclic collector
        # from re-walking it, which cost 40-56 ms pauses in the NOTIFY fan-out benchmark.
        gc.collect()
        gc.freeze()
        # Full collections walk every live object not frozen: tens of thousands of finished
        # transactions waiting out Timers D/J/K. They were the 50-65 ms maxima of a 16-way
        # fork (bench_inproc.py --fork). Run them 10x less often (after 100 middle-generation
        # passes instead of 10, still gated by CPython's 25 %-growth rule): calls break their
        # own reference cycles, so little cyclic garbage waits longer.
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, FULL_GC_AFTER)
        log.info(
            "service_started",
            listen=[f"{a.transport}:{a.host}:{a.port}" for a in self.transports.local],
            http=str(self.cfg.http),
            bindings=len(self.bindings),
            data_dir=str(self.cfg.data_dir),
            native=f"{len(native.compiled_modules())}/{len(native.module_names())}",
        )

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._reloading is not None:  # its worker thread cannot be cancelled: let it end
            self._reload_again = False
            await asyncio.wait([self._reloading], timeout=5)
        await self.http.close()
        await self.transports.close()
        await self.media.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._timer is not None:
            self._timer.cancel()
        if self._overload_report is not None:
            self._overload_report.cancel()
        await self.store.close()
        log.info("service_stopped")

    async def run_forever(self) -> int:
        self._stopping = asyncio.Event()
        await self.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self._stopping.wait()
        await self.stop()
        return 0

    def reload(self) -> None:
        """SIGHUP: load the config again; keep the running one if the new one is invalid.

        Reading and validating a large config takes a while (~0.4 s for 10,000 users), so it
        runs in a worker thread while the loop goes on answering SIP; only the switch-over
        happens on the loop. A SIGHUP during a reload makes one more reload after it, so the
        file's latest state always wins.
        """
        if self._reloading is not None:
            self._reload_again = True
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload())
        self._reloading.add_done_callback(self._reloaded)

    def _reloaded(self, _: asyncio.Task[None]) -> None:
        self._reloading = None
        if self._reload_again:
            self._reload_again = False
            self.reload()

    async def _reload(self) -> None:
        try:
            cfg, directory = await asyncio.to_thread(self._read_config)
        except ConfigError as exc:
            log.error(
                "config_reload_failed",
                file=str(self.config_path),
                issues=[str(i) for i in exc.issues],
            )
            return
        self._apply_config(cfg, directory)

    def _read_config(self) -> tuple[Config, Directory]:
        """The new config and its user directory (digest keys for every user): thread work."""
        cfg = load_config(self.config_path, data_dir_base=self.data_dir_base)
        return cfg, Directory.from_config(cfg)

    def _apply_config(self, cfg: Config, directory: Directory) -> None:
        changed = [
            name
            for name, old, new in (
                ("listen", [str(x) for x in self.cfg.listen], [str(x) for x in cfg.listen]),
                ("data_dir", self.cfg.data_dir, cfg.data_dir),
                ("http", self.cfg.http, cfg.http),
                ("media", self.cfg.media, cfg.media),
            )
            if old != new
        ]
        if changed:
            log.warning("config_reload_needs_restart", changed=changed)
        self.registrar = self._make_registrar(cfg, self.registrar.auth, directory)
        self.calls.setup = self._make_setup(cfg)
        for n in self._notifiers:
            n.update(cfg, self.registrar.directory, self.registrar.auth)
        self.calls.cfg = cfg
        self.stale.max_delay = cfg.overload.max_queue_delay_ms / 1000
        self.transports.tcp = _tcp_limits(cfg)
        self.cfg = cfg
        log.info("config_reloaded", file=str(self.config_path), users=len(cfg.users))

    def _make_registrar(
        self, cfg: Config, auth: DigestAuthenticator | None, directory: Directory | None = None
    ) -> Registrar:
        if directory is None:
            directory = Directory.from_config(cfg)
        algorithms = tuple(Algorithm(a) for a in cfg.auth.algorithms)
        if auth is None or auth.realm != cfg.realm or auth.algorithms != algorithms:
            auth = DigestAuthenticator(cfg.realm, algorithms, cfg.auth.nonce_ttl)
        auth.nonce_ttl = float(cfg.auth.nonce_ttl)
        self.throttle.max_failures = cfg.auth.max_failures
        self.throttle.window = float(cfg.auth.failure_window)
        self.throttle.block_time = float(cfg.auth.block_time)
        r = cfg.registrar
        policy = RegistrarPolicy(r.min_expires, r.max_expires, r.default_expires)
        return Registrar(directory, auth, policy, self.bindings)

    def _make_setup(self, cfg: Config) -> CallSetup:
        return CallSetup(cfg, self.registrar.directory, self.registrar.auth, self.bindings)

    def _fork_headers(self, call: Call, target: ForkTarget) -> list[tuple[str, str]]:
        """`Call-Info: <sip:domain>;appearance-index=N` on the INVITE to an SCA phone of the
        line that rings, so it alerts on key N like every other phone of the line. Phones
        that do not watch call-info get nothing: the index means nothing to them."""
        ref = next((r for r in call.lines if r.direction is Direction.INBOUND), None)
        if ref is None or not self.sca.is_sca_phone(ref.line, target.dest):
            return []
        value = self.sca.appearance_header(ref.line, call.id)
        return [("Call-Info", value)] if value else []

    def _local_address(self, transport: str) -> Address:
        """Our listening address for `transport`: what goes into Via and Contact."""
        for local in self.transports.local:
            if local.transport == transport:
                return local
        return self.transports.local[0]

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            now = time.time()
            gone = self.bindings.expire(now)
            if gone:
                try:
                    await self.store.save_bindings([], gone)
                except StoreError as exc:
                    log.error("store_purge_failed", error=str(exc))
                log.info("bindings_expired", count=len(gone))
            self.registrar.auth.forget_expired(now)
            self.throttle.prune(now)

    # --- the SIP pump -----------------------------------------------------------------------
    def _on_message(self, data: bytes, source: Address) -> None:
        now = time.time()
        if self.throttle.blocked(source.host, now):
            return
        if self.challenges and data.startswith(b"REGISTER "):
            repeat = self.challenges.get((hash(data), source))
            if repeat is not None:  # a retransmission we challenged: the same 401 again
                self.transports.send(repeat, source)
                return
        try:
            msg = parse_message(data, stream=source.transport != "udp")
        except ParseError as exc:
            self._reject_malformed(data, source, exc)
            return
        if (
            isinstance(msg, Request)
            and msg.method == "REGISTER"
            and self._challenge_statelessly(msg, source, data)
        ):
            return
        self.layer.receive(msg, source, self._loop_time())
        self._pump()

    def _challenge_statelessly(self, req: Request, source: Address, data: bytes) -> bool:
        """Answer a REGISTER without credentials (its 401, or a 404 for a bad AoR) without a
        server transaction, as kamailio's `www_challenge` does with `sl_send_reply`.

        Half of all REGISTERs are such first attempts. Keeping a transaction for each meant
        a Timer J heap entry and 32 s of memory per 401, and a flood of unauthenticated
        REGISTERs (a scanner) filled the tables. A retransmission still gets the very same
        401 (SIPp, unlike a phone, takes a 401 with another nonce for a new message), from
        `challenges`. False: not such a request, the normal path takes it.
        """
        if "authorization" in req.headers or not isinstance(req.uri, SipUri):
            return False
        if self._precheck(req) is not None:
            return False
        stamp_received(req, source)
        peer = f"{source.transport}:{source.host}:{source.port}"
        outcome = self.registrar.handle(req, peer, time.time())
        wire = outcome.response.to_bytes()
        self.transports.send(wire, source)
        self.challenges.put((hash(data), source), wire, self._loop_time())
        self._arm_timer()
        self._log_outcome(req, outcome.response, source, outcome.event, outcome.user, None)
        return True

    def _admit(self, data: bytes, age: float, addr: tuple[str | int, ...]) -> bool:
        """The UDP transport asks this for every datagram: overload control (`StaleFilter`)."""
        verdict = self.stale.judge(data, age)
        if verdict is Verdict.ADMIT:
            return True
        if verdict is Verdict.REFUSE:
            reply = error_response(data, 503, "Service Unavailable", to_tag=new_tag())
            if reply is not None:
                self.transports.send(reply, Address("udp", str(addr[0]), int(addr[1])))
        self._report_overload_later()
        return False

    def _retransmits(self, data: bytes) -> bool:
        """Does `data` repeat a request the transaction layer already has? Parses: asked only
        for a stale INVITE about to be refused, so overload, never the normal path, pays."""
        try:
            msg = parse_message(data)
        except ParseError:
            return False
        return isinstance(msg, Request) and self.layer.has_server(msg)

    def _kernel_drops(self, total: int) -> None:
        self.stale.kernel_dropped(total)
        self._report_overload_later()

    def _report_overload_later(self) -> None:
        if self._overload_report is None:
            loop = asyncio.get_running_loop()
            self._overload_report = loop.call_later(REPORT_INTERVAL, self._report_overload)

    def _report_overload(self) -> None:
        """One warning a second at most while requests are dropped: enough to alert an
        operator, and the log must not add work to an overloaded service."""
        self._overload_report = None
        report = self.stale.report()
        if report is None:
            return
        log.warning(
            "sip_overload",
            dropped=report.dropped,
            refused=report.refused,
            oldest_ms=round(report.oldest * 1000),
            max_queue_delay_ms=round(self.stale.max_delay * 1000),
            kernel_drops=report.kernel_drops,
            dropped_total=self.stale.dropped,
        )

    def _on_framing_error(self, data: bytes, source: Address, exc: ParseError) -> None:
        self._reject_malformed(data, source, exc)

    def _reject_malformed(self, data: bytes, source: Address, exc: ParseError) -> None:
        reply = error_response(data, exc.status, _reason(exc.status))
        log.info(
            "sip_malformed",
            peer=f"{source.transport}:{source.host}:{source.port}",
            status=exc.status if reply else None,
            reason=exc.reason,
        )
        if reply is not None:
            self.transports.send(reply, source)

    def _pump(self) -> None:
        """Handle every event the transaction layer produced, send its bytes, re-arm the timer.

        Re-entrant calls (a handler that sends and flushes) only send: the outer loop drains
        whatever events they caused.
        """
        if self._pumping:
            self._pump_datagrams()
            return
        self._pumping = True
        try:
            while (event := self.layer.next_event()) is not None:
                self._dispatch(event)
                self._pump_datagrams()
        finally:
            self._pumping = False
        self._pump_datagrams()
        self._arm_timer()

    def _flush(self) -> None:
        self._pump()

    def _dispatch(self, event: object) -> None:
        if isinstance(event, RequestReceived):
            self._on_request(event.txn, event.request, event.source)
        elif isinstance(event, ResponseReceived):
            txn, resp = event.txn, event.response
            if not any(n.on_response(txn, resp) for n in self._notifiers):
                self.calls.on_response(txn, resp)
        elif isinstance(event, AckReceived):
            self.calls.on_ack(event.request)
        elif isinstance(event, AckTimeout) and isinstance(event.txn, ServerTransaction):
            log.warning("ack_timeout", call_id=event.txn.request.call_id)
            self.calls.on_ack_timeout(event.txn)
        elif (
            isinstance(event, TransactionTimeout) and isinstance(event.txn, ClientTransaction)
        ) or (isinstance(event, DeliveryFailed) and isinstance(event.txn, ClientTransaction)):
            if not any(n.on_timeout(event.txn) for n in self._notifiers):
                self.calls.on_timeout(event.txn)
        elif isinstance(event, StrayResponse):
            self.calls.on_stray(event.response)

    def _arm_timer(self) -> None:
        deadlines = [d for timer in self._timer_sources if (d := timer()) is not None]
        if not deadlines:
            return
        deadline = min(deadlines)
        if self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._loop_time()
        self.layer.handle_timer(now)
        self.b2bua.handle_timer(now)
        for n in self._notifiers:
            n.handle_timer(now)
        self.challenges.handle_timer(now)
        self._pump()

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    # --- requests ---------------------------------------------------------------------------
    def _on_request(self, txn: ServerTransaction, req: Request, source: Address) -> None:
        early = self._precheck(req)
        if early is not None:
            self._respond(txn, req, early, source)
            return
        if req.method == "SUBSCRIBE" and self.sca.handles(req):  # call-info, line-seize
            self.sca.on_subscribe(txn, req, source)
            return
        if req.method == "SUBSCRIBE" and (req.to.tag is None or self.subscriptions.find(req)):
            self.subscriptions.on_subscribe(txn, req, source)
            return
        if self.calls.on_request(txn, req, source):
            return
        if req.method == "REGISTER":
            self._on_register(txn, req, source)
        elif req.method == "OPTIONS":
            resp = req.make_response(200, "OK")
            resp.headers.add("Allow", ALLOW)
            resp.headers.add("Allow-Events", ALLOW_EVENTS)
            resp.headers.add("Accept", "application/sdp")
            self._respond(txn, req, resp, source)
        elif req.method == "ACK":
            return
        else:
            resp = req.make_response(501, "Not Implemented")
            resp.headers.add("Allow", ALLOW)
            self._respond(txn, req, resp, source)

    def _precheck(self, req: Request) -> Response | None:
        """Checks that apply to every request before any work (RFC 4475 §3.3)."""
        if req.uri.scheme not in ("sip", "sips", "tel") and req.method != "ACK":
            resp = req.make_response(416, "Unsupported URI Scheme")
            return resp
        required = [r for r in req.headers.get_all("require") if r.lower() not in SUPPORTED]
        if required and req.method not in ("ACK", "CANCEL"):
            resp = req.make_response(420, "Bad Extension")
            resp.headers.add("Unsupported", ", ".join(required))
            return resp
        return None

    def _on_register(self, txn: ServerTransaction, req: Request, source: Address) -> None:
        now = time.time()
        if not isinstance(req.uri, SipUri):
            self._respond(txn, req, req.make_response(416, "Unsupported URI Scheme"), source)
            return
        try:
            outcome = self.registrar.handle(
                req, f"{source.transport}:{source.host}:{source.port}", now
            )
        except ParseError as exc:
            self._respond(
                txn,
                req,
                req.make_response(exc.status, _reason(exc.status)),
                source,
                detail=exc.reason,
            )
            return
        if outcome.auth is AuthResult.FAILED and self.throttle.record_failure(source.host, now):
            log.warning("auth_source_blocked", peer=source.host, seconds=self.throttle.block_time)
        if outcome.upserts or outcome.deletes:
            self.store.save_bindings_then(
                outcome.upserts,
                outcome.deletes,
                lambda _, exc: self._persisted(txn, req, outcome, source, exc),
            )
            return
        self._respond(txn, req, outcome.response, source, event=outcome.event, user=outcome.user)

    def _persisted(
        self,
        txn: ServerTransaction,
        req: Request,
        outcome: Outcome,
        source: Address,
        exc: BaseException | None,
    ) -> None:
        """Group commit: the 200 leaves only once the binding is on disk.

        The store calls this on the loop for every REGISTER of a commit in one go, so the
        transaction layer's timer is re-armed once per commit (`_pump_soon`), not per REGISTER.
        """
        if exc is None:
            self._respond(
                txn, req, outcome.response, source, event=outcome.event, user=outcome.user
            )
        else:
            log.error("store_write_failed", call_id=req.call_id, error=str(exc))
            # Memory already changed: the disk is the truth, so reload it.
            task = asyncio.get_running_loop().create_task(self._reload_bindings())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            resp = req.make_response(500, "Server Internal Error")
            resp.headers.add("Retry-After", "5")
            self._respond(txn, req, resp, source, event="register_store_failed")
        self._pump_soon()

    def _pump_soon(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        self._pump()

    async def _reload_bindings(self) -> None:
        try:
            self.bindings.replace_all(await self.store.load_bindings(time.time()))
        except StoreError as exc:
            log.error("store_reload_failed", error=str(exc))

    def _respond(
        self,
        txn: ServerTransaction,
        req: Request,
        resp: Response,
        source: Address,
        *,
        event: str = "sip_request",
        user: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.layer.send_response(txn, resp, self._loop_time())
        if resp.status >= 200:
            self._log_outcome(req, resp, source, event, user, detail)
        self._pump_datagrams()

    @staticmethod
    def _log_outcome(
        req: Request,
        resp: Response,
        source: Address,
        event: str,
        user: str | None,
        detail: str | None,
    ) -> None:
        """The one log event per SIP transaction outcome."""
        peer = f"{source.transport}:{source.host}:{source.port}"
        logs.outcome(event, req.method, resp.status, req.call_id, user, peer, detail)

    def _pump_datagrams(self) -> None:
        for data, dest in self.layer.datagrams_to_send():
            self.transports.send(data, dest)


def _tcp_limits(cfg: Config) -> TcpLimits:
    return TcpLimits(cfg.tcp.max_connections, float(cfg.tcp.message_timeout))


def _reason(status: int) -> str:
    return REASONS.get(status, "Bad Request")
