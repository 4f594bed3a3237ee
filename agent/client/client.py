"""Python client for an EdgePipe pipeline, addressed by its entry (first stage's --listen) and exit
(last stage's --results), or by the endpoints file a deployment writes.

    with Client.from_endpoints("build/vitb/endpoints.json", load_keypair("client.key_secret")) as client:
        logits = client.run(images)["logits"]                   # one batch
        for out in client.map(batches):                          # many, in submission order
            ...

The client is the hop before stage 0 and after the last stage (docs/formats/wire.md, version 2):
a DEALER to each entry sends requests within the credit the entry grants and keeps each until the
entry says its result is one hop further (custody); a DEALER to each exit receives results and
acknowledges them. Heartbeats both ways tell it at once when the entry restarted or came back, and
it sends what the entry had not passed on again right then; stages de-duplicate, so nothing is
computed twice where it was already done, and a result that arrives twice is given to the caller
once (``duplicates`` counts the others). A last-resort timeout (by default a few times the slowest
latency measured recently) resends a request whose result never comes, as a new attempt, up to
``retries`` times, then reports RequestTimeout.

Secure by default: pass this client's keypair and the public keys of the entry and exit devices
(``Client.from_endpoints`` reads them from the endpoints file), or ``insecure=True`` for a pipeline
started with ``--insecure``. The stages deliver results only to a connection authenticated with the
key that submitted the request.

A failed request raises RemoteError with the message of the stage that failed; requests after it
are unaffected. The client is single-threaded, like a pyzmq socket: use it from the thread that
created it. It heartbeats while one of its methods runs; between calls the pipeline sees it as
silent, which costs nothing but a note in the stages' status.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zmq
from edgepipe.agent.formats.codecs import CODECS
from edgepipe.agent.formats.endpoints import Endpoints, EndpointsError, load_endpoints
from edgepipe.agent.formats.keys import KeyFileError, KeyPair, key_dir, load_keypair, load_public_key
from edgepipe.agent.formats.wire import (
    Ack,
    Header,
    Heartbeat,
    Limits,
    ProtocolError,
    RequestId,
    StageRecord,
    ack_messages,
    data_header,
    encode_heartbeat,
    encode_tensors,
    parse,
)
from edgepipe.agent.link import (
    DETECT_FACTOR,
    HELLO_S,
    READ_BATCH,
    Identity,
    Neighbour,
    Outbox,
    Parcel,
    RateLimitedLog,
    Replica,
    forgive_own_pause,
)
from edgepipe.agent.transport import (
    INSECURE,
    ClientAuth,
    TransportError,
    check_endpoint,
    close_context,
    connect_data,
    connect_results,
    new_context,
    recv_frames,
)

log = logging.getLogger("edgepipe.client")

Inputs = Mapping[str, np.ndarray] | np.ndarray
KeySource = str | bytes | Path

FIRST_TIMEOUT_S = 120.0  # last resort before any latency has been measured
MIN_TIMEOUT_S = 30.0
TIMEOUT_FACTOR = 5.0  # last resort = this x the slowest of the recent latencies
LATENCY_SAMPLES = 32
CONNECT_TIMEOUT_S = 10.0  # no answer at all from an entry or exit this long: say so
HEADER_ESTIMATE = 512


class ClientError(RuntimeError):
    """The pipeline could not be reached, or a request got no answer. Base of the client's errors."""


class RemoteError(ClientError):
    """A stage answered this request with an error (bad input, ONNX Runtime failure, ...)."""

    def __init__(self, client: str, seq: int, stage: int | None, message: str) -> None:
        where = f"stage {stage}" if stage is not None else "the pipeline"
        super().__init__(f"request {client}/{seq} failed at {where}: {message}")
        self.client, self.seq, self.stage, self.message = client, seq, stage, message


class RequestTimeout(ClientError):
    """No result after the first send and every last-resort resend, each waited for ``timeout_s``."""

    def __init__(self, client: str, seq: int, attempts: int, timeout_s: float) -> None:
        super().__init__(f"request {client}/{seq}: no result after {attempts} attempt(s) of {timeout_s:g} s "
                         "(are all agents running? is the batch far above the agents' --max-batch?)")
        self.client, self.seq, self.attempts = client, seq, attempts


@dataclass(frozen=True)
class Result:
    seq: int
    outputs: dict[str, np.ndarray]  # views over the received frames (raw codec) or decoded arrays
    trace: tuple[StageRecord, ...]  # one record per stage, in pipeline order
    latency_s: float  # first send to arrival, resends included
    attempts: int
    sent_at: float = 0.0  # time.time() of the first send
    received_at: float = 0.0  # time.time() of the arrival


@dataclass
class _Pending:
    parcel: Parcel  # the current attempt (it stays here after the outbox has let go of it)
    submitted: float  # time.time()
    first_sent: float = 0.0  # time.time() of the first send of the first attempt
    attempts: int = 1

    @property
    def last_try(self) -> float:
        """When the current attempt was first sent (0 while it waits for credit)."""
        return self.parcel.first_sent


@dataclass
class _Exit:
    """The connection to one exit (a replica of the last stage)."""

    sock: zmq.Socket
    peer: Neighbour
    txs: int = 0  # highest ``tx`` of its heartbeats, echoed so it can resend lost results
    next_hb: float = 0.0
    acks: list[RequestId] = field(default_factory=list)


def default_client_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def default_client_keypair() -> KeyPair:
    """This machine's client key: $EDGEPIPE_KEYS/client.key_secret (or ~/.config/edgepipe/keys/...)."""
    return load_keypair(key_dir() / "client.key_secret")


class Client:
    """Submit batches to a running pipeline. See the module docstring.

    ``entry``/``exit``: one endpoint each, or a list when that stage is replicated; ``entry_key``/
    ``exit_key``: the matching public keys (Z85 text, bytes or a .key file), by position.
    ``client_id`` names this client's requests (any string of 1..255 bytes; by default
    host-pid-random); it must not be reused by another client with the same key while requests
    are in flight. ``timeout_s`` is the last resort only (None: follows the measured latency).
    ``codec`` compresses the float32 inputs on the way to the entry (raw, fp16, int8)."""

    def __init__(self, entry: str | Sequence[str], exit: str | Sequence[str], *, keypair: KeyPair | None = None,
                 entry_key: KeySource | Sequence[KeySource] | None = None,
                 exit_key: KeySource | Sequence[KeySource] | None = None, insecure: bool = False,
                 client_id: str | None = None, window: int = 8, timeout_s: float | None = None, retries: int = 2,
                 codec: str = "raw", heartbeat_s: float = 0.5, context: zmq.Context | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if (timeout_s is not None and timeout_s <= 0) or retries < 0:
            raise ValueError("timeout_s must be > 0 (or None) and retries >= 0")
        if codec not in CODECS:
            raise ValueError(f"codec {codec!r}: choose one of {', '.join(CODECS)}")
        if not 0.01 <= heartbeat_s <= 60:
            raise ValueError(f"heartbeat_s {heartbeat_s:g}: must be in 0.01..60")
        self.client_id = client_id or default_client_id()
        if not 0 < len(self.client_id.encode()) <= 255:
            raise ValueError(f"client id {self.client_id!r}: must be 1..255 bytes")
        entries, exits = _endpoints(entry, "entry"), _endpoints(exit, "exit")
        entry_keys, exit_keys = _keys(entry_key, len(entries), "entry_key"), _keys(exit_key, len(exits), "exit_key")
        if not insecure and (keypair is None or None in entry_keys or None in exit_keys):
            raise ValueError("a secure pipeline needs this client's keypair and the entry's and exit's public keys "
                             "(entry_key=, exit_key=; Client.from_endpoints reads them); or insecure=True for a "
                             "pipeline started with --insecure")
        self.entry, self.exit = entries[0], exits[0]
        self.entries, self.exits = entries, exits
        self.window, self.retries, self.codec, self.heartbeat_s = window, retries, codec, heartbeat_s
        self._timeout_s = timeout_s
        self.insecure = insecure
        self.keypair = keypair
        self.owner = "" if insecure else keypair.public_text  # what the entry stamps on our requests
        self.duplicates = 0  # results that arrived again (given to the caller once)
        self.timeouts_resends = 0  # last-resort resends
        self.endpoints_path: Path | None = None
        self.generation = 0
        self._inc = secrets.token_hex(6)
        self._warn = RateLimitedLog(log)
        self._own_context = context is None
        self._ctx = context or new_context()
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._next_seq = 0
        self._pending: dict[int, _Pending] = {}
        self._done: dict[int, Result | ClientError] = {}
        self._limits = Limits(max_tensors=256)
        self._created = time.monotonic()
        self._suspended_since = 0.0
        self._last_pump = time.monotonic()
        self._entry_keys, self._exit_keys = entry_keys, exit_keys
        try:
            self._connect()
        except TransportError as exc:
            if self._own_context:
                close_context(self._ctx)
            raise ClientError(str(exc)) from None

    @classmethod
    def from_endpoints(cls, endpoints: Endpoints | str | Path, keypair: KeyPair | None = None,
                       **kwargs: Any) -> Client:
        """A client for the deployment an endpoints file describes (``edgepipe-fleet deploy`` writes
        it). ``keypair`` defaults to this machine's client key. Given a path, the client re-reads the
        file when its entry or exit stops answering, and follows a newer generation (a redeploy or a
        failover) by reconnecting and sending what is outstanding again."""
        path = None
        if not isinstance(endpoints, Endpoints):
            path = Path(endpoints)
            endpoints = load_endpoints(path)  # EndpointsError names what is wrong
        insecure = endpoints.insecure
        if not insecure and keypair is None:
            keypair = default_client_keypair()  # KeyFileError says where it looked
        client = cls([p.endpoint for p in endpoints.entry], [p.endpoint for p in endpoints.exit],
                     keypair=keypair, insecure=insecure,
                     entry_key=None if insecure else [p.public_key for p in endpoints.entry],
                     exit_key=None if insecure else [p.public_key for p in endpoints.exit], **kwargs)
        client.endpoints_path = path if path is not None and not path.is_dir() else (
            path / "endpoints.json" if path is not None else None)
        client.generation = endpoints.generation
        return client

    # ---- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the sockets. Requests still in flight are abandoned."""
        self._disconnect()
        if self._own_context:
            close_context(self._ctx)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- API --------------------------------------------------------------------------------

    def submit(self, inputs: Inputs) -> int:
        """Send one batch and return its sequence number; blocks while ``window`` requests are in
        flight, and until the entry has credit for it. A bare array is sent unnamed and is bound to
        the first stage's only input. Raw arrays are not copied: do not modify them until their
        result has been collected."""
        arrays = _named(inputs)
        while len(self._pending) >= self.window:
            self._pump()
        seq = self._next_seq
        header = data_header(self.client_id, seq, arrays, codec=self.codec)
        frames = encode_tensors(header, list(arrays.values()))
        self._next_seq += 1
        nbytes = HEADER_ESTIMATE + sum(int(getattr(f, "nbytes", 0)) for f in frames)
        parcel = Parcel(self._rid(seq), header, frames, nbytes)
        self._pending[seq] = _Pending(parcel, time.time())
        self._outbox.add(parcel)
        self._outbox.pump(time.monotonic())
        while not parcel.first_sent and seq in self._pending:
            self._pump()  # on the wire before we return (the caller may wait elsewhere); credit paces us
        return seq

    def result(self, seq: int) -> Result:
        """Wait for request ``seq``; raise RemoteError or RequestTimeout if it failed."""
        while seq not in self._done:
            if seq not in self._pending:
                raise KeyError(f"request {seq} was never submitted or its result was already collected")
            self._pump()
        outcome = self._done.pop(seq)
        if isinstance(outcome, ClientError):
            raise outcome
        return outcome

    def run(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """One batch through the pipeline: its outputs by name."""
        return self.result(self.submit(inputs)).outputs

    def results(self, batches: Iterable[Inputs], errors: Literal["raise", "return"] = "raise",
                ) -> Iterator[Result | ClientError]:
        """Like ``map`` but yields Result objects (outputs plus per-stage trace and latency)."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        order: deque[int] = deque()
        source = iter(batches)
        exhausted = False
        try:
            while True:
                while not exhausted and len(order) < self.window:
                    batch = next(source, None)
                    if batch is None:
                        exhausted = True
                    else:
                        order.append(self.submit(batch))
                if not order:
                    return
                seq = order.popleft()
                try:
                    outcome: Result | ClientError = self.result(seq)
                except ClientError as exc:
                    if errors == "raise":
                        raise
                    outcome = exc
                yield outcome
        finally:
            self._forget(order)  # stopped early or failed: free the window; late results become duplicates

    def map(self, batches: Iterable[Inputs], errors: Literal["raise", "return"] = "raise",
            ) -> Iterator[dict[str, np.ndarray] | ClientError]:
        """Outputs for each batch, in submission order, with at most ``window`` in flight. With
        errors="return" a failed request yields its RemoteError/RequestTimeout instead of raising."""
        for outcome in self.results(batches, errors):
            yield outcome.outputs if isinstance(outcome, Result) else outcome

    @property
    def in_flight(self) -> int:
        """Requests submitted whose outcome has not arrived yet."""
        return len(self._pending)

    @property
    def resends(self) -> int:
        """Requests sent again: custody resends (an entry restarted or lost them) and last-resort ones."""
        return self._outbox.resends + self.timeouts_resends

    @property
    def timeout_s(self) -> float:
        """The last-resort timeout in force: as given, or a few times the slowest recent latency."""
        if self._timeout_s is not None:
            return self._timeout_s
        if not self._latencies:
            return FIRST_TIMEOUT_S
        return max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * max(self._latencies))

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"client_id": self.client_id, "in_flight": self.in_flight, "resends": self.resends,
                "last_resort_resends": self.timeouts_resends, "duplicates": self.duplicates,
                "timeout_s": self.timeout_s, "generation": self.generation,
                "unsent": len(self._outbox.queue),
                "neighbours": self._outbox.status(now) + [x.peer.status(now) for x in self._exits]}

    # ---- engine -----------------------------------------------------------------------------

    def _rid(self, seq: int) -> RequestId:
        return (self.owner, self.client_id, seq)

    def _connect(self) -> None:
        me = Identity(self._inc, "client", None, socket.gethostname()[:64], self.client_id)
        replicas, exits = [], []
        self._socks: list[zmq.Socket] = []
        try:
            for endpoint, key in zip(self.entries, self._entry_keys, strict=True):
                auth = INSECURE if self.insecure else ClientAuth(self.keypair, key)
                sock = connect_data(self._ctx, check_endpoint(endpoint, "entry"), auth=auth)
                self._socks.append(sock)
                replicas.append(Replica(sock, Neighbour("entry", endpoint, key.decode() if key else None)))
            for endpoint, key in zip(self.exits, self._exit_keys, strict=True):
                auth = INSECURE if self.insecure else ClientAuth(self.keypair, key)
                sock = connect_results(self._ctx, check_endpoint(endpoint, "exit"), auth=auth)
                self._socks.append(sock)
                exits.append(_Exit(sock, Neighbour("exit", endpoint, key.decode() if key else None)))
        except TransportError:
            self._disconnect()
            raise
        self._outbox = Outbox(replicas, me, self.heartbeat_s, self._warn)
        self._exits = exits
        self._poller = zmq.Poller()
        for sock in self._socks:
            self._poller.register(sock, zmq.POLLIN)
        self._connected_at = time.monotonic()

    def _disconnect(self) -> None:
        for sock in getattr(self, "_socks", []):
            sock.close(linger=0)
        self._socks = []

    def _forget(self, seqs: Iterable[int]) -> None:
        for seq in seqs:
            if self._pending.pop(seq, None) is not None:
                self._outbox.drop(self._rid(seq))
            self._done.pop(seq, None)

    def _pump(self) -> None:
        """Wait for something to happen (at most a heartbeat tick), handle it, run the timers."""
        tick = min(HELLO_S, self.heartbeat_s / 4)
        events = dict(self._poller.poll(int(tick * 1000)))
        now = time.monotonic()
        idle = now - self._last_pump
        if idle > DETECT_FACTOR * self.heartbeat_s:
            # The caller was busy elsewhere: nobody heard from us, and we heard nobody; that silence
            # says nothing about the pipeline.
            forgive_own_pause([*(r.peer for r in self._outbox.replicas), *(x.peer for x in self._exits)], idle)
            self._connected_at += idle  # nor does it count against reaching the pipeline at all
        self._last_pump = now
        for index, replica in enumerate(self._outbox.replicas):
            if replica.sock in events:
                answers: list[Header] = []
                self._outbox.read(index, now, answers)
                for header in answers:
                    self._answered(header)
        for link in self._exits:
            if link.sock in events:
                self._read_exit(link, now)
        self._timers(now)
        self._outbox.pump(now)

    def _read_exit(self, link: _Exit, now: float) -> None:
        for _ in range(READ_BATCH):
            try:
                frames = recv_frames(link.sock, self._limits.max_frames, zmq.NOBLOCK)
            except zmq.Again:
                return
            arrived = time.time()
            try:
                message = parse(frames, self._limits)
            except ProtocolError as exc:
                self._malformed(exc)
                continue
            if isinstance(message, Heartbeat):
                event = link.peer.heartbeat(message, now)
                link.txs = max(link.txs, message.tx)
                if event == "restarted":
                    self._warn(logging.WARNING, "exit-restart", f"exit {link.peer.name} restarted")
                if event is not None or message.tx:
                    link.next_hb = min(link.next_hb, now)  # echo its tx now so it learns of losses at once
                continue
            link.peer.heard(now)
            if isinstance(message, Ack):
                continue
            header, arrays = message
            link.txs = max(link.txs, header.ls)
            link.acks.append(header.request_id)  # acknowledge even a duplicate, so the exit stops sending it
            self._arrived(header, arrays, arrived)

    def _arrived(self, header: Header, arrays: list[np.ndarray], arrived: float) -> None:
        if header.client != self.client_id or header.owner != self.owner:
            self.duplicates += 1  # not ours (cannot happen on a secure pipeline); ignore it
            return
        pending = self._pending.get(header.seq)
        if pending is None:
            self.duplicates += 1
            return
        if header.kind == "error":
            outcome: Result | ClientError = RemoteError(header.client, header.seq, header.error_stage,
                                                        header.error or "")
        else:
            outputs = {t.name: arr for t, arr in zip(header.tensors, arrays, strict=True)}
            sent = pending.first_sent or pending.last_try or pending.submitted
            outcome = Result(header.seq, outputs, header.trace, arrived - sent, pending.attempts, sent, arrived)
            self._latencies.append(arrived - (pending.last_try or sent))
        self._finish(header.seq, outcome)

    def _answered(self, header: Header) -> None:
        """The entry refused one of our requests (bad input, over credit): its outcome."""
        if header.client != self.client_id or header.seq not in self._pending:
            return
        self._finish(header.seq, RemoteError(header.client, header.seq, header.error_stage, header.error or ""))

    def _malformed(self, exc: ProtocolError) -> None:
        if exc.client == self.client_id and exc.seq in self._pending:
            self._finish(exc.seq, ClientError(f"request {self.client_id}/{exc.seq}: malformed result: {exc}"))

    def _finish(self, seq: int, outcome: Result | ClientError) -> None:
        del self._pending[seq]
        self._outbox.settle(self._rid(seq))  # its credit at the entry is free once the entry says so
        self._done[seq] = outcome

    def _timers(self, now: float) -> None:
        self._outbox.tick(now)
        timeout = DETECT_FACTOR * self.heartbeat_s
        for link in self._exits:
            if link.peer.check_silence(now, timeout):
                self._warn(logging.WARNING, f"exit-down-{link.peer.where}",
                           f"exit {link.peer.name} silent for {now - link.peer.last_seen:.1f} s")
            if link.acks:
                for message in ack_messages(link.acks, []):
                    with contextlib.suppress(zmq.Again):  # a lost ack: the exit sends the result again
                        link.sock.send(message, zmq.NOBLOCK)
                link.acks.clear()
            if now >= link.next_hb:
                hb = Heartbeat(self._inc, "client", None, "", self.client_id, "", self.generation, None, 0, link.txs)
                with contextlib.suppress(zmq.Again):
                    link.sock.send(encode_heartbeat(hb), zmq.NOBLOCK)
                link.next_hb = now + (self.heartbeat_s if link.peer.up else HELLO_S)
        if self._pending:
            self._check_reachable(now)
            down = not all(r.peer.up for r in self._outbox.replicas) or not all(x.peer.up for x in self._exits)
            if down:  # the custody chain resumes on its own when they are back: the last resort waits
                self._suspended_since = self._suspended_since or time.time()
            else:
                if self._suspended_since:
                    self._shift_clocks(time.time() - self._suspended_since)
                    self._suspended_since = 0.0
                self._last_resort(time.time())

    def _shift_clocks(self, seconds: float) -> None:
        for pending in self._pending.values():
            if pending.parcel.first_sent:
                pending.parcel.first_sent += seconds

    def _check_reachable(self, now: float) -> None:
        waited = now - self._connected_at
        limit = min(CONNECT_TIMEOUT_S, self._timeout_s) if self._timeout_s is not None else CONNECT_TIMEOUT_S
        if waited < limit:
            return
        if not any(r.peer.heard_once for r in self._outbox.replicas):
            if self._follow_endpoints():
                return
            raise ClientError(f"no answer from the entry {', '.join(self.entries)} for {waited:.1f} s (is the first "
                              "agent running? is the entry key its public key, and this client's key in its --allow?)")
        if not any(x.peer.heard_once for x in self._exits):
            if self._follow_endpoints():
                return
            raise ClientError(f"no answer from the exit {', '.join(self.exits)} for {waited:.1f} s (is the last "
                              "agent running? is the exit key its public key, and this client's key in its "
                              "--allow-client?)")
        if not all(r.peer.up for r in self._outbox.replicas) or not all(x.peer.up for x in self._exits):
            self._follow_endpoints()

    def _last_resort(self, now: float) -> None:
        timeout = self.timeout_s
        for seq, pending in list(self._pending.items()):
            if not pending.first_sent:
                pending.first_sent = pending.last_try
            if not pending.last_try or now - pending.last_try < timeout:
                continue
            if pending.attempts > self.retries:
                self._finish(seq, RequestTimeout(self.client_id, seq, pending.attempts, timeout))
                continue
            # A new attempt: stages that completed the old one compute it again (the result was lost).
            self._outbox.drop(self._rid(seq))
            self._retry(pending, replace(pending.parcel.header, attempt=pending.attempts))
            pending.attempts += 1
            self._warn(logging.WARNING, "last-resort", f"no result for {self.client_id}/{seq} after {timeout:.1f} s: "
                       f"sending it again (attempt {pending.attempts})")

    def _follow_endpoints(self) -> bool:
        """If our endpoints file now names a newer generation, move to it: reconnect, send everything
        outstanding again. Checked at most once a second."""
        if self.endpoints_path is None:
            return False
        now = time.monotonic()
        if now - getattr(self, "_followed_at", 0.0) < 1.0:
            return False
        self._followed_at = now
        try:
            endpoints = load_endpoints(self.endpoints_path)
        except EndpointsError:
            return False
        if endpoints.generation <= self.generation:
            return False
        log.warning("endpoints generation %d -> %d: reconnecting and sending %d requests again",
                    self.generation, endpoints.generation, len(self._pending))
        self._disconnect()
        self.entries = [p.endpoint for p in endpoints.entry]
        self.exits = [p.endpoint for p in endpoints.exit]
        self.entry, self.exit = self.entries[0], self.exits[0]
        self.insecure = endpoints.insecure
        self._entry_keys = [None if self.insecure else load_public_key(p.public_key) for p in endpoints.entry]
        self._exit_keys = [None if self.insecure else load_public_key(p.public_key) for p in endpoints.exit]
        self.generation = endpoints.generation
        resends = self._outbox.resends
        self._connect()
        self._outbox.resends = resends
        for _, pending in sorted(self._pending.items()):
            self._retry(pending, pending.parcel.header)
        return True

    def _retry(self, pending: _Pending, header: Header) -> None:
        old = pending.parcel
        pending.first_sent = pending.first_sent or old.first_sent
        pending.parcel = Parcel(old.rid, header, old.frames, old.nbytes)
        self._outbox.add(pending.parcel)
        self.timeouts_resends += 1


def _endpoints(value: str | Sequence[str], what: str) -> list[str]:
    endpoints = [value] if isinstance(value, str) else list(value)
    if not endpoints:
        raise ValueError(f"{what}: at least one endpoint")
    return endpoints


def _keys(value: KeySource | Sequence[KeySource] | None, count: int, what: str) -> list[bytes | None]:
    if value is None:
        return [None] * count
    values = [value] if isinstance(value, (str, bytes, Path)) else list(value)
    if len(values) != count:
        raise ValueError(f"{what}: {len(values)} keys for {count} endpoints (one per endpoint, in order)")
    out: list[bytes | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        try:
            out.append(load_public_key(v.decode() if isinstance(v, bytes) else v))
        except KeyFileError as exc:
            raise ValueError(f"{what}: {exc}") from None
    return out


def _named(inputs: Inputs) -> dict[str, np.ndarray]:
    if isinstance(inputs, np.ndarray):
        return {"": inputs}
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError("inputs must be a numpy array or a non-empty dict of name -> numpy array")
    for name, arr in inputs.items():
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"input {name!r} is a {type(arr).__name__}, not a numpy array")
    return dict(inputs)
