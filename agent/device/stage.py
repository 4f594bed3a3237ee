"""The agent daemon: receive, compute and send on three threads joined by small bounded queues.

    PULL --receiver--> q_in (2) --compute (ORT)--> q_out (2) --sender--> PUSH (next stage)
                                                                     or ROUTER (results to clients)

Each socket is used by exactly one thread. The queues are what makes communication overlap
computation, and their bound (with the sockets' small HWM) is what turns a slow downstream into
back-pressure: the sender blocks, then compute, then the receiver, then the upstream PUSH.

Nothing a peer sends can stop the daemon: a message that fails validation or makes ONNX Runtime
fail becomes an error message for its client, sent downstream like a result; a message without a
readable request id is logged and counted. On stop (SIGTERM/SIGINT) the receiver stops taking new
work, everything already received is computed and sent, and the sockets are closed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from edgepipe.agent.device.session import create_session, run_stage
from edgepipe.agent.formats.bundle import StageManifest, load_bundle
from edgepipe.agent.formats.wire import (
    MAX_HEADER_BYTES,
    Header,
    Limits,
    ProtocolError,
    StageRecord,
    decode,
    describe,
    encode,
    error_header,
    stage_limits,
)
from edgepipe.agent.transport import (
    INSECURE,
    bind_pull,
    bind_router,
    bound_endpoint,
    close_context,
    connect_push,
    new_context,
    recv_frames,
    send_frames,
)

log = logging.getLogger("edgepipe.agent")

QUEUE_SIZE = 2
POLL_S = 0.1
HOLD_RETRY_MIN_S = 0.0005  # the first retry comes quickly: a full pipe to a reading client drains in
HOLD_RETRY_MAX_S = 0.02  # well under a millisecond; an absent client is retried less often
MAX_HELD = 64  # results the exit holds for clients that are not connected (or not reading) yet
DRAIN_ALREADY_QUEUED = 16  # messages taken from the socket after a stop request (already delivered to us)
FRAME_SLACK = 64 * 1024


@dataclass(frozen=True)
class AgentConfig:
    bundle_dir: Path
    listen: str
    next: str | None = None  # next stage's --listen; None for the last stage
    results: str | None = None  # where the last stage binds its ROUTER for clients
    threads: int = 1
    max_batch: int = 256
    max_frame_bytes: int | None = None  # per tensor; default from the manifest and max_batch
    hwm: int = 2
    hold_s: float = 5.0  # how long the last stage retries a result for an unreachable client
    drain_timeout_s: float = 30.0
    ready_file: Path | None = None
    cpus: tuple[int, ...] | None = None
    parent_pid: int | None = None  # stop when this process is no longer our parent


@dataclass
class AgentStats:
    """Counters, each written by one thread only; read at exit for the summary line."""

    received: int = 0  # well-formed data messages
    rejected: int = 0  # answered with an error (bad request)
    unparseable: int = 0  # dropped: no request id to answer
    passed_errors: int = 0  # error messages from upstream passed on
    computed: int = 0
    failed: int = 0  # ONNX Runtime raised
    sent: int = 0
    held: int = 0  # results the exit could not route at the first try (client absent or not reading)
    undeliverable: int = 0  # results for clients that never became reachable
    dropped_at_stop: int = 0

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.__dict__.items())


@dataclass(frozen=True)
class _Work:
    header: Header
    arrays: list[np.ndarray] = field(default_factory=list)
    recv: float = 0.0
    compute_start: float = 0.0
    compute_end: float = 0.0


_STOP = object()


class _Abort(Exception):
    """Raised inside a worker thread when the drain deadline passed."""


def frame_limit(limits: Limits) -> int:
    """ZMQ MAXMSGSIZE for the data socket. Twice the largest legal tensor (plus slack for the
    header frame): an oversized batch up to 2x --max-batch still arrives and gets a clear error
    answer from ``decode``; anything bigger is cut off by libzmq before it is allocated."""
    return max(MAX_HEADER_BYTES, 2 * (limits.max_tensor_bytes or 0)) + FRAME_SLACK


def serve(config: AgentConfig, stop: threading.Event, abort: threading.Event | None = None) -> int:
    """Run the agent until ``stop`` is set, then drain and return an exit code (0 = all delivered).

    Raises BundleError, SessionError or TransportError before serving if the stage cannot start.
    ``abort`` (set by a second signal, or by the drain deadline) drops in-flight work."""
    abort = abort or threading.Event()
    if config.cpus:
        try:
            os.sched_setaffinity(0, config.cpus)  # before ORT starts its threads, which inherit it
        except OSError as exc:
            raise ValueError(f"cannot pin to CPUs {list(config.cpus)}: {exc.strerror}") from None
    manifest = load_bundle(config.bundle_dir)
    is_last = config.next is None
    if is_last and not config.results:
        raise ValueError("the last stage (no --next) needs --results ENDPOINT for clients to connect to")
    session = create_session(config.bundle_dir, manifest, config.threads)
    limits = stage_limits(manifest.inputs, config.max_batch, config.max_frame_bytes)
    output_names = [o.name for o in session.get_outputs()]
    input_names = [i.name for i in manifest.inputs]
    stats = AgentStats()
    ctx = new_context()
    pull = out = None
    workers: list[threading.Thread] = []
    try:
        pull = bind_pull(ctx, config.listen, auth=INSECURE, max_frame_bytes=frame_limit(limits), hwm=config.hwm)
        if is_last:
            out = bind_router(ctx, config.results, auth=INSECURE, hwm=config.hwm)
        else:
            out = connect_push(ctx, config.next, auth=INSECURE, hwm=config.hwm)
        listen = bound_endpoint(pull)
        results = bound_endpoint(out) if is_last else None
        if config.ready_file:
            _write_ready(config.ready_file, manifest, listen, results)
        log.info("ready stage=%d/%d model=%s listen=%s %s threads=%d max_batch=%d pid=%d",
                 manifest.stage_index, manifest.stage_count, manifest.model_id, listen,
                 f"results={results}" if is_last else f"next={config.next}", config.threads,
                 config.max_batch, os.getpid())
        stage = manifest.stage_index
        q_in: queue.Queue = queue.Queue(QUEUE_SIZE)
        q_out: queue.Queue = queue.Queue(QUEUE_SIZE)
        workers += [
            threading.Thread(target=_guard, name="receiver", daemon=True,
                             args=(_receive_loop, pull, q_in, limits, stage, stats, stop, abort)),
            threading.Thread(target=_guard, name="compute", daemon=True,
                             args=(_compute_loop, session, q_in, q_out, input_names, output_names, stage,
                                   stats, abort)),
            threading.Thread(target=_guard, name="sender", daemon=True,
                             args=(_send_loop, out, q_out, is_last, stage, stats, config.hold_s, abort)),
        ]
        for worker in workers:
            worker.start()
        crashed = _wait_for_stop(workers, stop, abort, config.parent_pid)
        log.info("stopping: draining in-flight work (up to %.0f s)", config.drain_timeout_s)
        clean = _drain(workers, abort, config.drain_timeout_s)
        stats.dropped_at_stop += _queued_work(q_in)
        if not clean:
            # A worker still owns its socket; closing it from here would be unsafe. The process exits.
            log.error("exit: workers did not finish; %s", stats.line())
            return 1
        log.info("exit %s", stats.line())
        return 1 if crashed or stats.dropped_at_stop else 0
    finally:
        if not any(w.is_alive() for w in workers):
            for sock in (pull, out):
                if sock is not None:
                    sock.close()
            close_context(ctx)


def _write_ready(path: Path, manifest: StageManifest, listen: str, results: str | None) -> None:
    info = {"pid": os.getpid(), "listen": listen, "results": results, "stage_index": manifest.stage_index,
            "stage_count": manifest.stage_count, "model_id": manifest.model_id}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(info) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def _wait_for_stop(workers: list[threading.Thread], stop: threading.Event, abort: threading.Event,
                   parent_pid: int | None) -> bool:
    """Block until asked to stop. Returns True if a worker died (a bug: workers catch everything
    that input can cause), which also stops the agent."""
    while not stop.wait(0.25):
        if parent_pid is not None and os.getppid() != parent_pid:
            log.warning("parent process %d exited; stopping", parent_pid)
            stop.set()
        dead = [w.name for w in workers if not w.is_alive()]
        if dead:
            log.error("worker thread %s died; stopping", ",".join(dead))
            stop.set()
            abort.set()
            return True
    return False


def _drain(workers: list[threading.Thread], abort: threading.Event, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    if any(w.is_alive() for w in workers):
        if not abort.is_set():
            log.warning("drain timed out after %.0f s (is the next stage gone?); dropping in-flight work",
                        timeout_s)
        abort.set()
        for worker in workers:
            worker.join(5.0)
    return not any(w.is_alive() for w in workers)


def _queued_work(q: queue.Queue) -> int:
    """Messages still in a queue (the stop marker is not one). Only called once its users stopped."""
    return sum(1 for item in list(q.queue) if item is not _STOP)


def _guard(loop: Callable[..., None], *args: Any) -> None:
    try:
        loop(*args)
    except _Abort:
        pass
    except Exception:
        log.exception("%s thread failed", threading.current_thread().name)


def _put(q: queue.Queue, item: object, abort: threading.Event) -> None:
    while True:
        try:
            q.put(item, timeout=POLL_S)
            return
        except queue.Full:
            if abort.is_set():
                raise _Abort from None


def _get(q: queue.Queue, abort: threading.Event, timeout_s: float | None = None) -> object | None:
    """Next item, or None after ``timeout_s`` (never returns None when timeout_s is None)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if abort.is_set():
            raise _Abort
        wait = POLL_S if deadline is None else min(POLL_S, max(0.0, deadline - time.monotonic()))
        try:
            return q.get(timeout=wait)
        except queue.Empty:
            if deadline is not None and time.monotonic() >= deadline:
                return None


# ---- receiver ---------------------------------------------------------------------------------

def _receive_loop(pull: zmq.Socket, q_in: queue.Queue, limits: Limits, stage: int, stats: AgentStats,
                  stop: threading.Event, abort: threading.Event) -> None:
    poller = zmq.Poller()  # one poller for the thread's life; Socket.poll() would build one per call
    poller.register(pull, zmq.POLLIN)
    try:
        while not stop.is_set():
            if poller.poll(int(POLL_S * 1000)):
                _receive_safely(pull, q_in, limits, stage, stats, abort)
        # Messages already queued in our socket would be lost when it closes; take a bounded few.
        for _ in range(DRAIN_ALREADY_QUEUED):
            if not pull.poll(0):
                break
            _receive_safely(pull, q_in, limits, stage, stats, abort)
    finally:
        _put(q_in, _STOP, abort)


def _receive_safely(pull: zmq.Socket, q_in: queue.Queue, limits: Limits, stage: int, stats: AgentStats,
                    abort: threading.Event) -> None:
    try:
        _receive_one(pull, q_in, limits, stage, stats, abort)
    except _Abort:
        raise
    except Exception as exc:  # a validation gap must cost one message, never the daemon
        stats.unparseable += 1
        log.error("dropped message: unexpected %s while decoding: %s", type(exc).__name__, _one_line(exc))


def _receive_one(pull: zmq.Socket, q_in: queue.Queue, limits: Limits, stage: int, stats: AgentStats,
                 abort: threading.Event) -> None:
    frames = recv_frames(pull, limits.max_frames, zmq.NOBLOCK)
    now = time.time()
    try:
        header, arrays = decode(frames, limits)
    except ProtocolError as exc:
        if exc.client is None:
            stats.unparseable += 1
            log.warning("dropped message with no request id (%d frames): %s", len(frames), exc)
            return
        stats.rejected += 1
        log.warning("rejected %s/%s: %s", exc.client, exc.seq, exc)
        item = _Work(error_header(exc.client, exc.seq, stage, f"bad request: {exc}"),
                     recv=now, compute_start=now, compute_end=now)
        _put(q_in, item, abort)
        return
    if header.kind == "data":
        stats.received += 1
    log.debug("received %s kind=%s", header.request_id, header.kind)
    del frames  # the arrays keep their frames alive; nothing else should
    _put(q_in, _Work(header, arrays, now, now, now), abort)


# ---- compute ----------------------------------------------------------------------------------

def _compute_loop(session: Any, q_in: queue.Queue, q_out: queue.Queue, input_names: list[str],
                  output_names: list[str], stage: int, stats: AgentStats, abort: threading.Event) -> None:
    while True:
        item = _get(q_in, abort)
        if item is _STOP:
            _put(q_out, _STOP, abort)
            return
        assert isinstance(item, _Work)
        if item.header.kind == "data":
            item = _compute(session, item, input_names, output_names, stage, stats)
        else:
            stats.passed_errors += 1
        _put(q_out, item, abort)


def _compute(session: Any, item: _Work, input_names: list[str], output_names: list[str], stage: int,
             stats: AgentStats) -> _Work:
    header = item.header
    if all(t.name == "" for t in header.tensors):
        feed = dict(zip(input_names, item.arrays, strict=True))  # positional (validated against the manifest)
    else:
        feed = {t.name: arr for t, arr in zip(header.tensors, item.arrays, strict=True)}
    start = time.time()
    try:
        outputs = run_stage(session, feed)
        end = time.time()
        tensors = describe(dict(zip(output_names, outputs, strict=True)))
        out_header = Header("data", header.client, header.seq, tensors, trace=header.trace)
    except Exception as exc:  # ORT failure on this input (or an unsupported output dtype)
        end = time.time()
        stats.failed += 1
        reason = _one_line(exc)
        log.warning("failed %s: ONNX Runtime: %s", header.request_id, reason)
        err = error_header(header.client, header.seq, stage, f"ONNX Runtime failed: {reason}",
                           header.trace)
        return _Work(err, [], item.recv, start, end)
    stats.computed += 1
    log.debug("computed %s in %.1f ms", header.request_id, (end - start) * 1000)
    return _Work(out_header, outputs, item.recv, start, end)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ---- sender -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Held:
    deadline: float
    routing_id: bytes
    frames: list[Any]
    request_id: str


def _send_loop(sock: zmq.Socket, q_out: queue.Queue, is_last: bool, stage: int, stats: AgentStats,
               hold_s: float, abort: threading.Event) -> None:
    held: deque[_Held] = deque()
    retry_s = HOLD_RETRY_MIN_S
    try:
        while True:
            if held:
                before = len(held)
                _retry_held(sock, held, stats)
                retry_s = HOLD_RETRY_MIN_S if len(held) < before else min(2 * retry_s, HOLD_RETRY_MAX_S)
            if len(held) >= MAX_HELD:
                if abort.is_set():
                    raise _Abort
                time.sleep(retry_s)  # back-pressure: take no new work until a client reads
                continue
            item = _get(q_out, abort, retry_s if held else None)
            if item is None:
                continue
            if item is _STOP:
                break
            assert isinstance(item, _Work)
            frames, header = _frames(item, stage)
            if not is_last:
                _push(sock, frames, abort)
                stats.sent += 1
                log.debug("sent %s", header.request_id)
            elif _route(sock, header.client.encode(), frames):
                stats.sent += 1
                log.debug("sent %s", header.request_id)
            else:
                stats.held += 1
                retry_s = HOLD_RETRY_MIN_S
                deadline = time.monotonic() + hold_s
                held.append(_Held(deadline, header.client.encode(), frames, header.request_id))
        while held:  # stopping: give clients that are reconnecting their hold time
            _retry_held(sock, held, stats)
            if held:
                if abort.is_set():
                    raise _Abort
                time.sleep(HOLD_RETRY_MAX_S)
    except _Abort:
        stats.dropped_at_stop += len(held) + _queued_work(q_out)
        log.warning("dropped %d in-flight messages at stop", stats.dropped_at_stop)
        raise


def _frames(item: _Work, stage: int) -> tuple[list[Any], Header]:
    record = StageRecord(stage, item.recv, item.compute_start, item.compute_end, time.time())
    header = Header(item.header.kind, item.header.client, item.header.seq, item.header.tensors,
                    item.header.error, item.header.error_stage, (*item.header.trace, record))
    try:
        return encode(header, item.arrays), header
    except ProtocolError as exc:  # e.g. a trace too long for the header limit
        err = error_header(header.client, header.seq, stage, f"cannot encode result: {exc}")
        return encode(err, []), err


def _push(sock: zmq.Socket, frames: list[Any], abort: threading.Event) -> None:
    """Blocking send to the next stage (back-pressure), abandoned only when the drain deadline passes."""
    while True:
        try:
            send_frames(sock, frames, zmq.NOBLOCK)
            return
        except zmq.Again:
            if abort.is_set():
                raise _Abort from None
            sock.poll(int(POLL_S * 1000), zmq.POLLOUT)


def _route(sock: zmq.Socket, routing_id: bytes, frames: list[Any]) -> bool:
    """Try to hand a result to its client. False if the client is unknown (not connected yet, or
    gone) or its queue is full; ROUTER_MANDATORY reports both before any frame is queued."""
    try:
        send_frames(sock, [routing_id, *frames], zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH:
            return False
        raise


def _retry_held(sock: zmq.Socket, held: deque[_Held], stats: AgentStats) -> None:
    now = time.monotonic()
    for _ in range(len(held)):
        entry = held.popleft()
        if _route(sock, entry.routing_id, entry.frames):
            stats.sent += 1
        elif now >= entry.deadline:
            stats.undeliverable += 1
            log.warning("undeliverable %s: client not reachable at the results socket; dropped",
                        entry.request_id)
        else:
            held.append(entry)
