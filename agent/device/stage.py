"""The stage runtime (`edgepipe-agent serve`): reliable, authenticated, flow-controlled hops around
one ONNX Runtime session. Protocol: docs/formats/wire.md (version 2).

    upstream DEALERs ──► ROUTER --listen ┐                         ┌─► DEALER ──► next stage replica(s)
    (previous stage, or clients)         ├─ I/O thread ◄─► compute ┤
                                         │  (all sockets)  (ORT)   └─► ROUTER --results ──► client DEALERs

Two threads. The I/O thread owns every socket and all state: it reads requests, de-duplicates them
by request id, checks them against the manifest, acknowledges them (``recv``), grants credit,
heartbeats every neighbour, feeds the compute thread fairly (round robin over upstream peers; at
the entry, over authenticated clients), sends results downstream through an ``Outbox`` (custody,
credits, resends, replicas; agent/link.py) and tells upstream ``done`` once a result is in the
next hop's hands. The compute thread only runs ONNX Runtime and encodes outputs in the hop's codec.

Custody: a message is forgotten upstream only when its result has been received one hop further
down, so killing any one stage loses nothing: its upstream sends again what it had not passed on
when it restarts (or to another replica at once), and what it had passed on is not computed again
(the stages after it de-duplicate). At the exit, a result is kept until its client acknowledges it;
a result for a client that is absent or not reading is held (bounded in count, bytes and time,
never blocking other clients) and its upstream released.

At the entry (stage 0) every request is stamped with the key its client authenticated with
(``owner``); clients may not send error messages, trace records or an owner, and are answered
directly, cheaply and at a bounded rate when a request is refused. The exit delivers a result only
to a connection authenticated with the request's owner key.

Nothing a peer sends can stop the daemon. On stop (SIGTERM/SIGINT) the stage takes no new work,
finishes and passes on what it has, and exits; if the next stage is gone it says what it could
not pass on (its upstream still holds those) instead of waiting for the drain timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from edgepipe.agent.device.session import create_session, run_stage
from edgepipe.agent.formats.bundle import StageManifest, load_bundle
from edgepipe.agent.formats.codecs import CODECS
from edgepipe.agent.formats.keys import KeyPair
from edgepipe.agent.formats.wire import (
    MAX_HEADER_BYTES,
    Ack,
    Header,
    Heartbeat,
    Limits,
    ProtocolError,
    RequestId,
    StageRecord,
    ack_messages,
    describe,
    encode_heartbeat,
    encode_tensors,
    error_header,
    pack_header,
    parse,
    stage_limits,
)
from edgepipe.agent.link import (
    DETECT_FACTOR,
    READ_BATCH,
    Identity,
    Neighbour,
    Outbox,
    Parcel,
    RateLimitedLog,
    Replica,
    forgive_own_pause,
    stamped,
)
from edgepipe.agent.transport import (
    INSECURE,
    ClientAuth,
    ServerAuth,
    bind_data,
    bind_results,
    bound_endpoint,
    check_endpoint,
    close_context,
    connect_data,
    doorbell,
    new_context,
    peer_key,
    recv_frames,
)

log = logging.getLogger("edgepipe.agent")

COMPUTE_SLOTS = 2  # requests handed to the compute thread at once: one running, one ready
FRAME_SLACK = 64 * 1024
HEADER_ESTIMATE = 512  # bytes a header adds to a message, for credit accounting
RECENT_IDS = 100_000  # completed request ids remembered for de-duplication
STAGE_CREDIT_SLACK = 2  # a trusted upstream stage may overdraw its credit this many times (replica moves)
CLIENT_REPLIES_PER_S = 20.0  # refusals answered per client key per second (a burst of 2 s); the rest are counted
PENALTY_S = 1.0  # a client key refused faster than that has its messages counted, unread, for this long
PURGE_AFTER_S = 60.0  # a peer down this long (and owed nothing) is forgotten
NO_PEER_WARN_S = 5.0  # warn when the next stage has not answered this long after start (then every 30 s)
BUSY_WINDOW_S = 10.0


@dataclass(frozen=True)
class NextHop:
    """One replica of the next stage: where it listens, its public key, its share of the work."""

    endpoint: str
    key: bytes | None = None  # Z85; None only on an insecure pipeline
    weight: float = 1.0


@dataclass(frozen=True)
class AgentConfig:
    bundle_dir: Path
    listen: str
    next: tuple[NextHop, ...] = ()  # empty for the last stage
    results: str | None = None  # where the last stage binds for clients
    keypair: KeyPair | None = None  # this device's key; None only with insecure
    allow: frozenset[bytes] = frozenset()  # keys that may send data in (previous stage; clients at the entry)
    allow_clients: frozenset[bytes] = frozenset()  # keys that may read results (last stage)
    insecure: bool = False
    codec: str = "raw"  # of this stage's output hop
    credit: int = 4  # messages each upstream peer (at the entry: each client key) may have in flight here
    credit_bytes: int = 64 * 2**20
    heartbeat_s: float = 0.5
    hold_s: float = 30.0  # how long the exit holds a result for an absent client
    hold_bytes: int = 256 * 2**20  # results held for absent clients, all clients together
    hold_per_client: int = 64
    device: str = field(default_factory=socket.gethostname)
    deployment: str = ""
    generation: int = 0
    threads: int = 1
    max_batch: int = 256
    max_frame_bytes: int | None = None  # per tensor; default from the manifest and max_batch
    drain_timeout_s: float = 30.0
    ready_file: Path | None = None
    cpus: tuple[int, ...] | None = None
    parent_pid: int | None = None  # stop when this process is no longer our parent


def check_config(config: AgentConfig) -> None:
    """Refuse a configuration that cannot work, before anything is loaded. Raises ValueError."""
    check_endpoint(config.listen, "--listen")
    for hop in config.next:
        check_endpoint(hop.endpoint, "--next")
        if hop.weight <= 0:
            raise ValueError(f"--next-weight {hop.weight:g}: must be more than 0")
    if config.results:
        check_endpoint(config.results, "--results")
    if config.next and config.results:
        raise ValueError("--results is for the last stage only; this stage has --next")
    if not config.next and not config.results:
        raise ValueError("the last stage (no --next) needs --results ENDPOINT for clients to connect to")
    if config.codec not in CODECS:
        raise ValueError(f"--codec {config.codec!r}: choose one of {', '.join(CODECS)}")
    if config.credit < 1 or config.credit_bytes < 1:
        raise ValueError("--credit and --credit-mb must be more than 0")
    if not 0.01 <= config.heartbeat_s <= 60:
        raise ValueError(f"--heartbeat-s {config.heartbeat_s:g}: must be in 0.01..60")
    if config.insecure:
        return
    if config.keypair is None:
        raise ValueError("a secure stage needs its key (--key FILE; create one with `edgepipe-agent keygen`), "
                         "or --insecure")
    if not config.allow:
        raise ValueError("--allow: no keys, so nobody could send to this stage; give the previous stage's public "
                         "key (for stage 0: the clients' keys), or --insecure")
    missing = [h.endpoint for h in config.next if h.key is None]
    if missing:
        raise ValueError(f"--next-key: no public key for {', '.join(missing)} (one --next-key per --next, "
                         "in the same order), or --insecure")
    if config.results and not config.allow_clients:
        raise ValueError("--allow-client: no keys, so no client could read results; give the clients' keys, "
                         "or --insecure")


# ---- what flows between the threads -------------------------------------------------------------

@dataclass(frozen=True)
class _Work:
    """A request handed to the compute thread."""

    rid: RequestId
    header: Header
    arrays: list[np.ndarray]
    recv: float  # time.time() it arrived


@dataclass(frozen=True)
class _Output:
    """What the compute thread made of a request: the next hop's header (trace without our record,
    which gets its send time when first sent) and its encoded tensor frames."""

    rid: RequestId
    header: Header
    frames: list[Any]
    record: StageRecord  # send == 0 until sent
    failed: bool = False


_STOP = object()


# ---- the I/O thread's state ----------------------------------------------------------------------

@dataclass
class _Entry:
    """A request taken in by this stage, until its result is done downstream."""

    rid: RequestId
    attempt: int
    state: str  # "queued", "computing", "out" (in our outbox / at a client), "forwarded" (downstream has it)
    senders: dict[bytes, tuple[Any, int]] = field(default_factory=dict)  # route -> (principal, bytes)
    nbytes: int = 0


@dataclass
class _Principal:
    """Whose credit a message counts against: an authenticated key (or, insecure, a connection).
    At the entry, requests are admitted to compute round robin over principals."""

    name: Any
    used_msgs: int = 0
    used_bytes: int = 0
    waiting: deque[_Work] = field(default_factory=deque)
    replies: float = 2 * CLIENT_REPLIES_PER_S  # token bucket for refusals answered
    replies_at: float = 0.0
    penalty_until: float = 0.0  # flooding: its messages are counted and dropped unread until then

    def answerable(self, now: float) -> bool:
        """Take a token for one refusal. Out of tokens: it floods; it goes in the penalty box."""
        self.replies = min(2 * CLIENT_REPLIES_PER_S, self.replies + (now - self.replies_at) * CLIENT_REPLIES_PER_S)
        self.replies_at = now
        if self.replies >= 1:
            self.replies -= 1
            return True
        self.penalty_until = now + PENALTY_S
        return False


@dataclass
class _Uplink:
    """One connection on our --listen socket: the previous stage (a replica of it) or a client."""

    route: bytes
    peer: Neighbour
    principal: _Principal
    rx: int = 0  # highest link sequence number read from it
    txs: int = 0  # highest ``tx`` of its heartbeats: echoed so it can tell what was lost
    next_hb: float = 0.0
    recv: list[RequestId] = field(default_factory=list)  # acks to flush at the end of the loop turn
    done: list[RequestId] = field(default_factory=list)


@dataclass
class _Result:
    """A result at the exit, on its way to its client."""

    rid: RequestId
    header: Header
    frames: list[Any]
    nbytes: int
    route: bytes | None = None
    ls: int = 0
    sent_at: float = 0.0
    released: bool = False  # upstream let go of it: we keep it on our own account, until ``deadline``
    deadline: float = 0.0


@dataclass
class _ClientLink:
    """A client's connection to our --results socket."""

    route: bytes
    peer: Neighbour
    target: tuple[str, str]  # (owner, client session id) of the requests whose results it takes
    tx: int = 0
    next_hb: float = 0.0


@dataclass
class Counters:
    requests_in: int = 0
    requests_out: int = 0
    computed: int = 0
    failed: int = 0
    errors_out: int = 0
    rejected: int = 0
    dropped: int = 0
    duplicates: int = 0
    resends: int = 0
    held: int = 0
    undeliverable: int = 0
    refused_at_stop: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.__dict__.items())


class StageStatus:
    """The stage's status for another thread (the control endpoint's): calling it asks the I/O
    thread for a fresh snapshot (it publishes one within a loop tick) and returns it; if the I/O
    thread does not answer in time (it is stopping), the last one."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}
        self.wanted = threading.Event()
        self.published = threading.Event()

    def __call__(self, timeout_s: float = 0.5) -> dict[str, Any]:
        self.published.clear()
        self.wanted.set()
        self.published.wait(timeout_s)
        return dict(self.snapshot)

    def publish(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.wanted.clear()
        self.published.set()


class _Busy:
    """Seconds spent in ONNX Runtime over the last BUSY_WINDOW_S (written by compute, read by I/O)."""

    def __init__(self) -> None:
        self._runs: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self._runs.append((start, end))
            while self._runs and self._runs[0][1] < end - BUSY_WINDOW_S:
                self._runs.popleft()

    def fraction(self, now: float) -> float:
        with self._lock:
            runs = list(self._runs)
        since = now - BUSY_WINDOW_S
        busy = sum(max(0.0, end - max(start, since)) for start, end in runs if end > since)
        return min(1.0, busy / BUSY_WINDOW_S)


def frame_limit(limits: Limits) -> int:
    """ZMQ MAXMSGSIZE for the data socket. Twice the largest legal tensor (plus slack for the
    header frame): an oversized batch up to 2x --max-batch still arrives and gets a clear error
    answer from ``decode``; anything bigger is cut off by libzmq before it is allocated."""
    return max(MAX_HEADER_BYTES, 2 * (limits.max_tensor_bytes or 0)) + FRAME_SLACK


def new_incarnation() -> str:
    return secrets.token_hex(6)


def serve(config: AgentConfig, stop: threading.Event, abort: threading.Event | None = None,
          status: StageStatus | None = None) -> int:
    """Run the stage until ``stop`` is set, then drain and return an exit code (0 = everything taken
    in was passed on). Raises BundleError, SessionError, TransportError or ValueError before serving
    if the stage cannot start. ``abort`` (a second signal) stops at once."""
    abort = abort or threading.Event()
    check_config(config)
    if config.cpus:
        try:
            os.sched_setaffinity(0, config.cpus)  # before ORT starts its threads, which inherit it
        except OSError as exc:
            raise ValueError(f"cannot pin to CPUs {list(config.cpus)}: {exc.strerror}") from None
    manifest = load_bundle(config.bundle_dir)
    session = create_session(config.bundle_dir, manifest, config.threads)
    limits = stage_limits(manifest.inputs, config.max_batch, config.max_frame_bytes)
    ctx = new_context()
    io: _StageIO | None = None
    compute: threading.Thread | None = None
    try:
        io = _StageIO(config, manifest, limits, ctx, stop, abort, status or StageStatus())
        if config.insecure:
            log.warning("INSECURE: the data sockets of this stage accept any peer and carry tensors in plaintext "
                        "(--insecure); anyone who can reach %s can submit, inject or read data", io.listen_endpoint)
        compute = threading.Thread(target=_guard, name="compute", daemon=True,
                                   args=(_compute_loop, session, io.work_q, io.done_q, io.bell_ring,
                                         [i.name for i in manifest.inputs], [o.name for o in session.get_outputs()],
                                         manifest.stage_index, config.codec, io.busy, io.counters))
        compute.start()
        io.compute_thread = compute
        io.status.publish(io.status_now(time.monotonic()))  # never empty once we say we are ready
        if config.ready_file:
            _write_ready(config.ready_file, io.ready_info())
        log.info("ready stage=%d/%d model=%s listen=%s %s threads=%d max_batch=%d codec=%s %s pid=%d",
                 manifest.stage_index, manifest.stage_count, manifest.model_id, io.listen_endpoint,
                 f"results={io.results_endpoint}" if io.results_endpoint else
                 "next=" + ",".join(h.endpoint for h in config.next), config.threads, config.max_batch,
                 config.codec, "insecure" if config.insecure else f"key={config.keypair.public_text}",
                 os.getpid())
        return io.run()
    finally:
        if io is not None:
            if compute is not None:
                io.work_q.put(_STOP)
                compute.join(10.0)  # the stage it is computing finishes first
            io.close()
        close_context(ctx)


def _write_ready(path: Path, info: dict[str, Any]) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(info) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def _guard(loop: Callable[..., None], *args: Any) -> None:
    try:
        loop(*args)
    except Exception:
        log.exception("%s thread failed", threading.current_thread().name)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ---- compute ------------------------------------------------------------------------------------

def _compute_loop(session: Any, work_q: queue.Queue, done_q: queue.Queue, bell: zmq.Socket,
                  input_names: list[str], output_names: list[str], stage: int, codec: str, busy: _Busy,
                  counters: Counters) -> None:
    """Run each request through ONNX Runtime and encode its outputs. ``bell`` is this thread's."""
    try:
        while True:
            item = work_q.get()
            if item is _STOP:
                return
            assert isinstance(item, _Work)
            done_q.put(_compute(session, item, input_names, output_names, stage, codec, busy, counters))
            with contextlib.suppress(zmq.Again):  # unread rings already wake the I/O thread
                bell.send(b"", zmq.NOBLOCK)
    finally:
        bell.close(0)


def _compute(session: Any, item: _Work, input_names: list[str], output_names: list[str], stage: int,
             codec: str, busy: _Busy, counters: Counters) -> _Output:
    header = item.header
    if header.kind != "data":  # an error from upstream passes on without compute
        record = StageRecord(stage, item.recv, item.recv, item.recv, 0.0)
        return _Output(item.rid, replace(header, ls=0), [], record)
    if all(t.name == "" for t in header.tensors):
        feed = dict(zip(input_names, item.arrays, strict=True))  # positional (validated against the manifest)
    else:
        feed = {t.name: arr for t, arr in zip(header.tensors, item.arrays, strict=True)}
    start = time.time()
    try:
        outputs = run_stage(session, feed)
        end = time.time()
        busy.add(start, end)
        out = Header("data", header.client, header.seq, describe(dict(zip(output_names, outputs, strict=True)), codec),
                     trace=header.trace, owner=header.owner, attempt=header.attempt)
        frames = encode_tensors(out, outputs)
    except Exception as exc:  # ORT failure on this input (or an output the wire cannot carry)
        end = time.time()
        counters.failed += 1
        reason = _one_line(exc)
        log.warning("failed %s: ONNX Runtime: %s", header.label, reason)
        err = error_header(header.client, header.seq, stage, f"ONNX Runtime failed: {reason}", header.trace,
                           owner=header.owner)
        return _Output(item.rid, replace(err, attempt=header.attempt), [],
                       StageRecord(stage, item.recv, start, end, 0.0), failed=True)
    counters.computed += 1
    log.debug("computed %s in %.1f ms", header.label, (end - start) * 1000)
    return _Output(item.rid, out, frames, StageRecord(stage, item.recv, start, end, 0.0))


# ---- the I/O thread -----------------------------------------------------------------------------

class _StageIO:
    """All sockets and all request state of a stage; used by one thread (``run``)."""

    def __init__(self, config: AgentConfig, manifest: StageManifest, limits: Limits, ctx: zmq.Context,
                 stop: threading.Event, abort: threading.Event, status: StageStatus) -> None:
        self.config, self.manifest, self.limits = config, manifest, limits
        self.stop, self.abort, self.status = stop, abort, status
        self.stage = manifest.stage_index
        self.is_entry = self.stage == 0
        self.is_exit = not config.next
        self.secure = not config.insecure
        self.inc = new_incarnation()
        self.me = Identity(self.inc, "stage", self.stage, config.device, "", config.deployment, config.generation)
        self.timeout_s = DETECT_FACTOR * config.heartbeat_s
        self.counters = Counters()
        self.busy = _Busy()
        self.warn = RateLimitedLog(log)
        self.warn_rarely = RateLimitedLog(log, 30.0)
        self.started = time.monotonic()
        self.work_q: queue.Queue = queue.Queue()
        self.done_q: queue.Queue = queue.Queue()
        self.compute_thread: threading.Thread | None = None
        self._socks: list[zmq.Socket] = []
        self.bell_ring, self.bell = doorbell(ctx, f"stage-bell-{id(self)}")
        self._socks.append(self.bell)
        self.listen_endpoint = ""
        self.results: zmq.Socket | None = None
        self.results_endpoint: str | None = None
        self.outbox: Outbox | None = None
        try:
            self._open_sockets(ctx)
        except BaseException:
            self.close()  # what was opened, or the context could never terminate
            raise
        # request state
        self.table: dict[RequestId, _Entry] = {}
        self.recent: OrderedDict[RequestId, int] = OrderedDict()  # completed id -> attempt
        self.uplinks: dict[bytes, _Uplink] = {}
        self.principals: dict[Any, _Principal] = {}
        self.ready: deque[_Principal] = deque()  # principals with waiting work, round robin
        self.in_compute = 0
        # exit state
        self.client_links: dict[bytes, _ClientLink] = {}
        self.routes: dict[tuple[str, str], bytes] = {}  # (owner, client) -> route
        self.unacked: OrderedDict[RequestId, _Result] = OrderedDict()  # handed to a connection, not acknowledged
        self.held: OrderedDict[RequestId, _Result] = OrderedDict()  # no connection took it (yet)
        self.kept_bytes = 0  # results kept on our own account (released upstream), bounded by hold_bytes
        self.held_undelivered_at_stop = 0
        self.stopping_since: float | None = None

    def _open_sockets(self, ctx: zmq.Context) -> None:
        config, keypair = self.config, self.config.keypair
        listen_auth = ServerAuth(keypair, config.allow) if self.secure else INSECURE
        self.listen = bind_data(ctx, config.listen, auth=listen_auth, max_frame_bytes=frame_limit(self.limits))
        self._socks.append(self.listen)
        self.listen_endpoint = bound_endpoint(self.listen)
        if self.is_exit:
            auth = ServerAuth(keypair, config.allow_clients) if self.secure else INSECURE
            self.results = bind_results(ctx, config.results, auth=auth)
            self._socks.append(self.results)
            self.results_endpoint = bound_endpoint(self.results)
        else:
            replicas = []
            for hop in config.next:
                auth = ClientAuth(keypair, hop.key) if self.secure else INSECURE
                sock = connect_data(ctx, hop.endpoint, auth=auth)
                self._socks.append(sock)
                key = hop.key.decode() if hop.key else None
                replicas.append(Replica(sock, Neighbour("downstream", hop.endpoint, key), hop.weight))
            self.outbox = Outbox(replicas, self.me, config.heartbeat_s, self.warn)

    # -- lifecycle

    def ready_info(self) -> dict[str, Any]:
        m = self.manifest
        return {"pid": os.getpid(), "listen": self.listen_endpoint, "results": self.results_endpoint,
                "next": [h.endpoint for h in self.config.next], "stage_index": m.stage_index,
                "stage_count": m.stage_count, "model_id": m.model_id, "incarnation": self.inc,
                "public_key": None if self.config.keypair is None else self.config.keypair.public_text,
                "device": self.config.device, "codec": self.config.codec}

    def close(self) -> None:
        """After the compute thread has stopped (it closes its end of the doorbell itself)."""
        for sock in self._socks:
            sock.close()
        if not self.bell_ring.closed:  # the compute thread never started, or is stuck in ORT
            self.bell_ring.close(0)

    def run(self) -> int:
        poller = zmq.Poller()
        for sock in self._socks:
            poller.register(sock, zmq.POLLIN)
        tick_s = min(0.05, self.config.heartbeat_s / 4)
        last = time.monotonic()
        next_status = 0.0
        while True:
            events = dict(poller.poll(int(tick_s * 1000)))
            now = time.monotonic()
            if now - last > self.timeout_s:  # we were stopped (SIGSTOP) or starved, not our peers
                log.warning("this process did not run for %.1f s (paused or starved); not counting it against "
                            "the neighbours", now - last)
                forgive_own_pause(self._neighbours(), now - last)
            last = now
            if self.bell in events:
                self._drain_bell()
            if self.listen in events:
                self._read_upstream(now)
            if self.outbox is not None:
                for index, replica in enumerate(self.outbox.replicas):
                    if replica.sock in events:
                        received, done = self.outbox.read(index, now)
                        self._forwarded(received)
                        self._completed(done)
            if self.results is not None and self.results in events:
                self._read_clients(now)
            self._take_outputs(now)
            self._feed_compute()
            if self.outbox is not None:
                self.outbox.pump(now)
            self._timers(now)
            self._flush_acks()
            if now >= next_status or self.status.wanted.is_set():
                self.status.publish(self.status_now(now))
                next_status = now + 1.0
            finished = self._check_stop(now)
            if finished is not None:
                self.status.publish(self.status_now(now))
                return finished

    def _check_stop(self, now: float) -> int | None:
        """None while serving or draining; the exit code once done."""
        if self.abort.is_set():
            log.error("exit: aborted with %d requests in progress; %s", len(self.table), self.counters.line())
            return 1
        if self.compute_thread is not None and not self.compute_thread.is_alive():
            log.error("exit: the compute thread died; %s", self.counters.line())
            return 1
        if self.config.parent_pid is not None and os.getppid() != self.config.parent_pid and not self.stop.is_set():
            log.warning("parent process %d exited; stopping", self.config.parent_pid)
            self.stop.set()
        if not self.stop.is_set():
            return None
        if self.stopping_since is None:
            self.stopping_since = now
            log.info("stopping: draining %d requests in progress (up to %.0f s)", self._unfinished(),
                     self.config.drain_timeout_s)
            for up in self.uplinks.values():
                up.next_hb = 0.0  # tell everyone upstream at once that we take nothing more
        unfinished = self._unfinished()
        held = len(self.held)
        if unfinished == 0 and held == 0:
            code = 1 if self.held_undelivered_at_stop else 0
            log.info("exit %s", self.counters.line())
            return code
        if unfinished == 0 and held and not any(self._deliverable(r) for r in self.held.values()):
            if now - self.stopping_since >= min(self.config.hold_s, self.config.drain_timeout_s):
                return self._give_up(f"{held} results held for clients that did not come back", held)
            return None
        if self._downstream_gone(now) and self.in_compute == 0 and not self._queued():
            return self._give_up(f"{unfinished} messages not passed on: the next stage is gone "
                                 "(its upstream, if still running, holds them and sends them again)", unfinished)
        if now - self.stopping_since >= self.config.drain_timeout_s:
            return self._give_up(f"drain timed out after {self.config.drain_timeout_s:.0f} s with {unfinished} "
                                 "messages not passed on", unfinished)
        return None

    def _give_up(self, why: str, count: int) -> int:
        log.warning("exit: %s", why)
        log.info("exit %s", self.counters.line())
        return 1 if count else 0

    def _unfinished(self) -> int:
        """Requests taken in whose result is not yet in the next hop's (or its client's) hands."""
        return sum(1 for e in self.table.values() if e.state in ("queued", "computing", "out"))

    def _queued(self) -> int:
        return sum(len(p.waiting) for p in self.principals.values())

    def _downstream_gone(self, now: float) -> bool:
        if self.outbox is None:
            return False
        return all(not r.peer.up and (not r.peer.heard_once or now - r.peer.last_seen >= 2 * self.timeout_s)
                   for r in self.outbox.replicas)

    def _neighbours(self) -> list[Neighbour]:
        peers = [u.peer for u in self.uplinks.values()] + [c.peer for c in self.client_links.values()]
        if self.outbox is not None:
            peers += [r.peer for r in self.outbox.replicas]
        return peers

    def _drain_bell(self) -> None:
        while True:
            try:
                self.bell.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    # -- upstream: requests in

    def _read_upstream(self, now: float) -> None:
        for _ in range(READ_BATCH):
            try:
                frames = recv_frames(self.listen, self.limits.max_frames + 1, zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._from_upstream(frames, now)
            except Exception as exc:  # a validation gap must cost one message, never the daemon
                self.counters.dropped += 1
                log.error("dropped message: unexpected %s while reading it: %s", type(exc).__name__, _one_line(exc))

    def _uplink(self, route: bytes, key: str | None, now: float) -> _Uplink:
        up = self.uplinks.get(route)
        if up is None:
            role = "client" if self.is_entry else "upstream"
            principal_name = key if key is not None else route
            principal = self.principals.get(principal_name)
            if principal is None:
                principal = self.principals[principal_name] = _Principal(principal_name)
            up = _Uplink(route, Neighbour(role, key or "", key), principal)
            up.peer.last_seen = now
            self.uplinks[route] = up
        return up

    def _from_upstream(self, frames: list[zmq.Frame], now: float) -> None:
        route, body = frames[0].bytes, frames[1:]
        up = self.uplinks.get(route)
        if up is not None and up.principal.penalty_until > now:  # flooding: as cheap as we can make it
            self.counters.dropped += 1
            return
        key = peer_key(frames[1]) if self.secure and len(frames) > 1 else None
        up = self._uplink(route, key, now)
        was_down_for = now - up.peer.last_seen
        try:
            message = parse(body, self.limits)
        except ProtocolError as exc:
            self._uplink_back(up, up.peer.heard(now), was_down_for)
            self._bad_message(up, exc, body, now)
            return
        if isinstance(message, Heartbeat):
            self._uplink_heartbeat(up, message, now)
            return
        self._uplink_back(up, up.peer.heard(now), was_down_for)
        if isinstance(message, Ack):
            self.counters.dropped += 1
            self.warn(logging.WARNING, f"ack-up-{route.hex()}",
                      f"{up.peer.name} sent an acknowledgement against the data direction; ignored")
            return
        header, arrays = message
        up.rx = max(up.rx, header.ls)
        self.counters.bytes_in += sum(len(f) for f in body)
        if self.is_entry:
            refusal = _client_forgery(header)
            if refusal:
                self._refuse(up, header.client, header.seq, refusal)
                return
            header = replace(header, owner=key or "")  # the request's owner: who authenticated, not who it says
        self._take(up, header, arrays, sum(len(f) for f in body), now)

    def _bad_message(self, up: _Uplink, exc: ProtocolError, body: list[zmq.Frame], now: float) -> None:
        if exc.client is None:
            self.counters.dropped += 1
            if self.is_entry:
                up.principal.answerable(now)  # garbage counts towards the penalty box too
            self.warn(logging.WARNING, f"noid-{up.principal.name!r}",
                      lambda: f"dropped message with no request id ({len(body)} frames) from {up.peer.name}: {exc}")
            return
        if self.is_entry:
            self._refuse(up, exc.client, exc.seq, f"bad request: {exc}")
            return
        # From a trusted upstream stage: an error result for its request, passed on like any result.
        header = error_header(exc.client, exc.seq, self.stage, f"bad request: {exc}", owner=exc.owner)
        self.warn(logging.WARNING, "bad-up", f"rejected {header.label} from {up.peer.name}: {exc}")
        self.counters.rejected += 1
        self._take(up, header, [], sum(len(f) for f in body), now)

    def _refuse(self, up: _Uplink, client: str, seq: int, message: str) -> None:
        """Answer a client's request with an error, straight back on its connection, at a bounded
        rate per client key; beyond that the refusal is only counted."""
        principal = up.principal
        self.warn(logging.WARNING, f"refused-{principal.name!r}",
                  lambda: f"refused {client}/{seq} from {up.peer.name}: {message}")
        if not principal.answerable(time.monotonic()):
            self.counters.dropped += 1
            return
        self.counters.rejected += 1
        header = error_header(client, seq, self.stage, message, owner=up.peer.key or "")
        try:
            self.listen.send_multipart([up.route, pack_header(header)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters.dropped += 1  # it is not reading, or gone: nobody to tell

    def _take(self, up: _Uplink, header: Header, arrays: list[np.ndarray], nbytes: int, now: float) -> None:
        rid = header.request_id
        entry = self.table.get(rid)
        if entry is not None:  # a copy of something in progress here: it is coming, say we have it
            self.counters.duplicates += 1
            if up.route not in entry.senders:
                entry.senders[up.route] = (up.principal, 0)
                up.principal.used_msgs += 1
            up.recv.append(rid)
            if entry.state == "forwarded":
                self._done_to(entry, up.route)
            log.debug("duplicate %s (%s)", header.label, entry.state)
            return
        done_attempt = self.recent.get(rid)
        if done_attempt is not None and done_attempt >= header.attempt:  # finished here; not computed again
            self.counters.duplicates += 1
            up.recv.append(rid)
            up.done.append(rid)
            log.debug("duplicate %s (done)", header.label)
            return
        if self.stopping_since is not None:
            self.counters.refused_at_stop += 1  # not acknowledged: the sender keeps it and sends it again later
            return
        principal = up.principal
        limit_msgs = self.config.credit * (1 if self.is_entry else STAGE_CREDIT_SLACK)
        limit_bytes = self.config.credit_bytes * (1 if self.is_entry else STAGE_CREDIT_SLACK)
        if principal.used_msgs >= limit_msgs or (principal.used_msgs and principal.used_bytes + nbytes > limit_bytes):
            # Not acknowledged, not answered: a sender that keeps to its credit sends it again once
            # credit is free (it sees the gap); one that floods us gets nothing for it but the cost.
            self.counters.dropped += 1
            if self.is_entry:
                principal.answerable(now)  # so does flooding with requests beyond its credit
            self.warn(logging.WARNING, f"over-credit-{principal.name!r}",
                      lambda: f"{up.peer.name} sent beyond its credit ({principal.used_msgs} in progress, credit "
                      f"{limit_msgs}); not taken")
            return
        self.counters.requests_in += 1
        principal.used_msgs += 1
        principal.used_bytes += nbytes
        entry = _Entry(rid, header.attempt, "queued", {up.route: (principal, nbytes)}, nbytes)
        self.table[rid] = entry
        up.recv.append(rid)
        log.debug("received %s kind=%s", header.label, header.kind)
        if not principal.waiting:
            self.ready.append(principal)
        principal.waiting.append(_Work(rid, header, arrays, time.time()))

    def _uplink_heartbeat(self, up: _Uplink, hb: Heartbeat, now: float) -> None:
        was_down_for = now - up.peer.last_seen
        event = up.peer.heartbeat(hb, now)
        up.txs = max(up.txs, hb.tx)
        if event is not None or hb.tx > up.rx:
            up.next_hb = 0.0  # answer at once: credit to a newcomer, or tell it what it lost
        if self.is_entry:
            return  # clients come and go; their comings and goings are not warnings
        if event == "restarted":
            self.warn(logging.WARNING, f"uprestart-{up.route.hex()}",
                      f"upstream {up.peer.name} restarted (incarnation {hb.inc})")
        elif event == "first":
            log.info("upstream %s connected (incarnation %s)", up.peer.name, hb.inc)
        self._uplink_back(up, event, was_down_for)

    def _uplink_back(self, up: _Uplink, event: str | None, was_down_for: float) -> None:
        if event == "back" and not self.is_entry:
            self.warn(logging.WARNING, f"upback-{up.route.hex()}",
                      f"upstream {up.peer.name} is back after {was_down_for:.1f} s of silence")

    def _done_to(self, entry: _Entry, route: bytes) -> None:
        principal, nbytes = entry.senders.pop(route, (None, 0))
        if principal is not None:
            principal.used_msgs -= 1
            principal.used_bytes -= nbytes
        up = self.uplinks.get(route)
        if up is not None:
            up.done.append(entry.rid)

    def _flush_acks(self) -> None:
        for up in self.uplinks.values():
            if not up.recv and not up.done:
                continue
            for message in ack_messages(up.recv, up.done):
                self._send_up(up, message)
            up.recv.clear()
            up.done.clear()

    def _send_up(self, up: _Uplink, message: bytes) -> None:
        with contextlib.suppress(zmq.ZMQError):  # gone (EHOSTUNREACH) or not reading: it asks again
            self.listen.send_multipart([up.route, message], flags=zmq.NOBLOCK)

    # -- compute

    def _feed_compute(self) -> None:
        while self.in_compute < COMPUTE_SLOTS and self.ready:
            principal = self.ready.popleft()
            work = principal.waiting.popleft()
            if principal.waiting:
                self.ready.append(principal)  # round robin: its next request waits for the others' turn
            entry = self.table.get(work.rid)
            if entry is None or entry.state != "queued":
                continue
            entry.state = "computing"
            self.in_compute += 1
            self.work_q.put(work)

    def _take_outputs(self, now: float) -> None:
        while True:
            try:
                out = self.done_q.get_nowait()
            except queue.Empty:
                return
            self.in_compute -= 1
            entry = self.table.get(out.rid)
            if entry is None:
                continue
            entry.state = "out"
            # ``send`` is set again when it first leaves (it may wait for credit): a placeholder until then.
            header = replace(out.header, trace=(*out.header.trace, replace(out.record, send=time.time())))
            if header.kind == "error":
                self.counters.errors_out += 1
            nbytes = HEADER_ESTIMATE + sum(_nbytes(f) for f in out.frames)
            if self.outbox is not None:
                self.outbox.add(Parcel(out.rid, header, out.frames, nbytes, stamp_send=True))
            else:
                self._deliver(_Result(out.rid, header, out.frames, nbytes), now)

    # -- downstream acknowledgements

    def _forwarded(self, rids: list[RequestId]) -> None:
        """Our output for these is in the next stage's hands: upstream may forget them."""
        for rid in rids:
            entry = self.table.get(rid)
            if entry is None or entry.state == "forwarded":
                continue
            entry.state = "forwarded"
            self.counters.requests_out += 1
            log.debug("passed on %s/%s", rid[1], rid[2])
            for route in list(entry.senders):
                self._done_to(entry, route)

    def _completed(self, rids: list[RequestId]) -> None:
        """The next stage passed these on too: nothing of them is left here but their id."""
        for rid in rids:
            entry = self.table.pop(rid, None)
            if entry is None:
                continue
            if entry.state != "forwarded":
                self._forwarded([rid])
            self._remember(rid, entry.attempt)

    def _remember(self, rid: RequestId, attempt: int) -> None:
        self.recent[rid] = attempt
        self.recent.move_to_end(rid)
        while len(self.recent) > RECENT_IDS:
            self.recent.popitem(last=False)

    # -- the exit: results to clients

    def _read_clients(self, now: float) -> None:
        assert self.results is not None
        for _ in range(READ_BATCH):
            try:
                frames = recv_frames(self.results, 2, zmq.NOBLOCK)
            except zmq.Again:
                return
            route = frames[0].bytes
            key = peer_key(frames[1]) if self.secure and len(frames) > 1 else None
            try:
                message = parse(frames[1:], Limits(max_tensors=0))
            except ProtocolError as exc:
                self.counters.dropped += 1
                self.warn(logging.WARNING, "bad-client", f"malformed message on --results from key {key}: {exc}")
                continue
            if isinstance(message, Heartbeat):
                self._client_heartbeat(route, key, message, now)
            elif isinstance(message, Ack):
                link = self.client_links.get(route)
                if link is not None:
                    link.peer.heard(now)
                self._client_ack(key, message, now)
            else:
                self.counters.dropped += 1
                self.warn(logging.WARNING, "data-on-results", f"a client (key {key}) sent data to --results; ignored")

    def _client_heartbeat(self, route: bytes, key: str | None, hb: Heartbeat, now: float) -> None:
        if hb.role != "client" or not hb.client:
            self.counters.dropped += 1
            return
        target = (key or "", hb.client)
        link = self.client_links.get(route)
        if link is None or link.target != target:
            link = self.client_links[route] = _ClientLink(route, Neighbour("client", key or "", key), target)
            log.info("client %s connected to --results", hb.client)
        event = link.peer.heartbeat(hb, now)
        old = self.routes.get(target)
        self.routes[target] = route
        if event is not None or old != route:
            link.next_hb = 0.0
            self._redeliver(target, now)
        if hb.txs:  # results sent before the heartbeat it has seen, never acknowledged: lost on the way
            for result in [r for r in self.unacked.values() if r.route == route and r.ls <= hb.txs]:
                self._send_result(result, route, now)

    def _client_ack(self, key: str | None, ack: Ack, now: float) -> None:
        owner = key or ""
        for rid in ack.recv:
            if rid[0] != owner:  # only the owner's own connections may acknowledge its results
                self.counters.dropped += 1
                continue
            result = self.unacked.pop(rid, None) or self.held.pop(rid, None)
            if result is None:
                continue
            self.counters.requests_out += 1
            self._forget_result(result)

    def _forget_result(self, result: _Result) -> None:
        """The result is with its client, or given up: nothing of it stays here but its id."""
        if result.released:
            self.kept_bytes -= result.nbytes
        else:
            self._release_upstream(result.rid)
        entry = self.table.pop(result.rid, None)
        if entry is not None:
            self._remember(result.rid, entry.attempt)

    def _release_upstream(self, rid: RequestId) -> None:
        entry = self.table.get(rid)
        if entry is not None and entry.state != "forwarded":
            entry.state = "forwarded"
            for route in list(entry.senders):
                self._done_to(entry, route)

    def _deliver(self, result: _Result, now: float) -> None:
        route = self.routes.get((result.rid[0], result.rid[1]))
        if route is None or not self._send_result(result, route, now):
            self._hold(result, now)

    def _send_result(self, result: _Result, route: bytes, now: float) -> bool:
        """Hand a result to its client's connection (never blocking: a full pipe or a gone client
        is a False). Only a connection authenticated with the result's owner key has that route."""
        assert self.results is not None
        link = self.client_links.get(route)
        if link is None:
            return False
        link.tx += 1
        if not result.sent_at:
            result.header = stamped(result.header, time.time())  # the trace says when it first left
        header = replace(result.header, ls=link.tx)
        try:
            self.results.send_multipart([route, pack_header(header), *result.frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            link.tx -= 1
            if exc.errno == zmq.EHOSTUNREACH:  # that connection is gone
                self.client_links.pop(route, None)
                if self.routes.get(link.target) == route:
                    del self.routes[link.target]
            return False  # EAGAIN: its pipe is full, it is not reading
        if result.sent_at:
            self.counters.resends += 1
        log.debug("sent %s to client %s", result.header.label, link.target[1])
        result.route, result.ls, result.sent_at = route, link.tx, now
        self.counters.bytes_out += result.nbytes
        self.held.pop(result.rid, None)
        self.unacked[result.rid] = result
        return True

    def _hold(self, result: _Result, now: float) -> None:
        """Keep a result its client's connection could not take (not connected, not reading)."""
        self.unacked.pop(result.rid, None)
        if result.rid not in self.held:
            self.counters.held += 1
            self.held[result.rid] = result
        result.route = None
        self._release(result, now)

    def _release(self, result: _Result, now: float) -> None:
        """Keep the result on our own account and let upstream forget it: a client that is absent
        or not reading must never hold the pipeline's credit. Bounded per client and in bytes."""
        if result.released:
            return
        result.released = True
        result.deadline = now + self.config.hold_s
        self.kept_bytes += result.nbytes
        self._release_upstream(result.rid)
        target = (result.rid[0], result.rid[1])
        mine = [r for r in (*self.held.values(), *self.unacked.values())
                if r.released and (r.rid[0], r.rid[1]) == target]
        while len(mine) > self.config.hold_per_client:
            self._give_up_result(mine.pop(0), f"more than {self.config.hold_per_client} results kept for this client")
        while self.kept_bytes > self.config.hold_bytes:
            oldest = next((r for r in (*self.held.values(), *self.unacked.values()) if r.released), None)
            if oldest is None or oldest is result:
                break
            self._give_up_result(oldest, "results kept for absent clients above the byte limit")

    def _give_up_result(self, result: _Result, why: str) -> None:
        if result.rid in self.held:
            del self.held[result.rid]
            self.counters.undeliverable += 1
            if self.stopping_since is not None:
                self.held_undelivered_at_stop += 1
            self.warn(logging.WARNING, "undeliverable",
                      f"undeliverable {result.header.label}: {why}; dropped (the client sends it again if it still "
                      "wants it)")
        elif self.unacked.pop(result.rid, None) is not None:
            log.debug("%s was handed to its client but never acknowledged (%s); forgotten", result.header.label, why)
        else:
            return
        self._forget_result(result)

    def _deliverable(self, result: _Result) -> bool:
        return self.routes.get((result.rid[0], result.rid[1])) is not None

    def _redeliver(self, target: tuple[str, str], now: float) -> None:
        """The client (re)connected: what it has not acknowledged goes to its current connection."""
        route = self.routes.get(target)
        if route is None:
            return
        for result in [r for r in self.unacked.values() if (r.rid[0], r.rid[1]) == target and r.route != route]:
            if not self._send_result(result, route, now):
                self._hold(result, now)
        for result in [r for r in self.held.values() if (r.rid[0], r.rid[1]) == target]:
            if not self._send_result(result, route, now):
                break

    # -- timers

    def _timers(self, now: float) -> None:
        self._flush_acks()  # before any heartbeat: its ``txs`` must not overtake our acks of what it covers
        if self.outbox is not None:
            self.outbox.tick(now)
            self.counters.resends = self.outbox.resends
            self.counters.bytes_out = self.outbox.bytes_out
            self._warn_no_downstream(now)
        credit = (0, 0) if self.stopping_since is not None else (self.config.credit, self.config.credit_bytes)
        for route, up in list(self.uplinks.items()):
            if up.peer.check_silence(now, self.timeout_s) and not self.is_entry:
                self.warn(logging.WARNING, f"updown-{route.hex()}",
                          f"upstream {up.peer.name} silent for {now - up.peer.last_seen:.1f} s: declared down")
            if not up.peer.up and now - up.peer.last_seen > PURGE_AFTER_S:
                del self.uplinks[route]
                principal = up.principal
                if (not principal.used_msgs and not principal.waiting
                        and not any(u.principal is principal for u in self.uplinks.values())):
                    self.principals.pop(principal.name, None)
                continue
            if now >= up.next_hb and (up.peer.up or not up.peer.heard_once):
                hb = Heartbeat(self.inc, "stage", self.stage, self.config.device, "", self.config.deployment,
                               self.config.generation, credit, 0, up.txs)
                self._send_up(up, encode_heartbeat(hb))
                up.next_hb = now + self.config.heartbeat_s
        if self.results is not None:
            self._client_timers(now)

    def _client_timers(self, now: float) -> None:
        ack_grace = max(2.0, 4 * self.config.heartbeat_s)
        for route, link in list(self.client_links.items()):
            link.peer.check_silence(now, self.timeout_s)  # a busy client is silent; only status shows it
            if not link.peer.up and now - link.peer.last_seen > PURGE_AFTER_S:
                del self.client_links[route]
                if self.routes.get(link.target) == route:
                    del self.routes[link.target]
                continue
            if link.peer.up and now >= link.next_hb:  # a silent client gets none: they would fill its pipe
                hb = Heartbeat(self.inc, "stage", self.stage, self.config.device, "", self.config.deployment,
                               self.config.generation, None, link.tx, 0)
                with contextlib.suppress(zmq.ZMQError):
                    self.results.send_multipart([route, encode_heartbeat(hb)], flags=zmq.NOBLOCK)
                link.next_hb = now + self.config.heartbeat_s
        for result in list(self.unacked.values()):
            if self.stopping_since is not None and now - result.sent_at > min(1.0, ack_grace):
                # In a connected client's socket when we stop: as good as delivered.
                self.unacked.pop(result.rid)
                self.counters.requests_out += 1
                self._forget_result(result)
            elif not result.released and now - result.sent_at > ack_grace:
                self._release(result, now)  # handed over, not acknowledged: the client is busy or gone
            elif result.released and now >= result.deadline:
                self._give_up_result(result, f"not acknowledged within {self.config.hold_s:g} s")
        for result in list(self.held.values()):
            if now >= result.deadline:
                self._give_up_result(result, f"client not reachable at --results for {self.config.hold_s:g} s")
            elif self._deliverable(result):
                self._send_result(result, self.routes[(result.rid[0], result.rid[1])], now)

    def _warn_no_downstream(self, now: float) -> None:
        assert self.outbox is not None
        waited = now - self.started
        if waited < NO_PEER_WARN_S:
            return
        for replica in self.outbox.replicas:
            if not replica.peer.heard_once:
                self.warn_rarely(logging.WARNING, f"nopeer-{replica.peer.where}", f"no answer from the next stage "
                                 f"at {replica.peer.where} for {waited:.0f} s: is it running and listening there, "
                                 "and is --next-key its public key?")

    # -- status

    def status_now(self, now: float) -> dict[str, Any]:
        m, c = self.manifest, self.counters
        role = ("single" if self.is_exit else "entry") if self.is_entry else ("exit" if self.is_exit else "middle")
        queued = [w for p in self.principals.values() for w in p.waiting]
        neighbours = [{**u.peer.status(now),
                       "inflight_msgs": sum(1 for e in self.table.values() if u.route in e.senders)}
                      for u in self.uplinks.values()]
        if self.outbox is not None:
            neighbours += self.outbox.status(now)
        neighbours += [{**cl.peer.status(now), "inflight_msgs": sum(1 for r in self.unacked.values()
                                                                     if r.route == cl.route)}
                       for cl in self.client_links.values()]
        inflight_msgs = len(self.outbox) if self.outbox is not None else len(self.unacked)
        inflight_bytes = (self.outbox.inflight_bytes if self.outbox is not None
                          else sum(r.nbytes for r in self.unacked.values()))
        return {
            "stage_index": m.stage_index, "stage_count": m.stage_count, "model_id": m.model_id,
            "device": self.config.device, "incarnation": self.inc, "deployment": self.config.deployment,
            "generation": self.config.generation, "role": role, "codec": self.config.codec, "secure": self.secure,
            "uptime_s": round(now - self.started, 3), "busy": round(self.busy.fraction(time.time()), 4),
            **c.__dict__,
            "queue_msgs": len(queued) + self.in_compute,
            "queue_bytes": sum(sum(a.nbytes for a in w.arrays) for w in queued),
            "inflight_msgs": inflight_msgs, "inflight_bytes": inflight_bytes,
            "held_msgs": len(self.held), "held_bytes": self.kept_bytes,
            "peers_down": sum(1 for n in neighbours if n["state"] == "down" and n["role"] != "client"),
            "neighbours": neighbours,
            "stopping": self.stopping_since is not None,
        }


def _client_forgery(header: Header) -> str | None:
    """What a client may not send: those are the stages' to write."""
    if header.kind != "data":
        return "bad request: clients may not send error messages"
    if header.trace:
        return "bad request: clients may not send trace records"
    if header.owner:
        return "bad request: clients may not set 'owner' (the entry sets it from the key they authenticated with)"
    return None


def _nbytes(frame: Any) -> int:
    nbytes = getattr(frame, "nbytes", None)
    return int(nbytes) if nbytes is not None else len(frame)
