"""Python client for an EdgePipe pipeline, addressed by its entry (first stage's --listen) and exit
(last stage's --results).

    with Client("tcp://dev0:5550", "tcp://dev2:5551") as client:
        logits = client.run(images)["logits"]                   # one batch
        for out in client.map(batches):                          # many, in submission order
            ...

Requests go out on a PUSH socket; results come back on a DEALER whose routing id is the client id.
The client keeps at most ``window`` requests in flight, resends a request whose result has not
arrived within ``timeout_s`` (same request id; the late duplicate is dropped by its sequence number)
and gives up after ``retries`` resends. A failed request raises RemoteError with the message of the
stage that failed; requests after it are unaffected. The client is single-threaded, like a pyzmq
socket: use it from the thread that created it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zmq
from edgepipe.agent.formats.wire import Limits, ProtocolError, StageRecord, data_header, decode, encode
from edgepipe.agent.transport import (
    INSECURE,
    TransportError,
    close_context,
    connect_dealer,
    connect_push,
    new_context,
    recv_frames,
    send_frames,
)

Inputs = Mapping[str, np.ndarray] | np.ndarray


class ClientError(RuntimeError):
    """The pipeline could not be reached, or a request got no answer. Base of the client's errors."""


class RemoteError(ClientError):
    """A stage answered this request with an error (bad input, ONNX Runtime failure, ...)."""

    def __init__(self, client: str, seq: int, stage: int | None, message: str) -> None:
        where = f"stage {stage}" if stage is not None else "the pipeline"
        super().__init__(f"request {client}/{seq} failed at {where}: {message}")
        self.client, self.seq, self.stage, self.message = client, seq, stage, message


class RequestTimeout(ClientError):
    """No result after the first send and every resend, each waited for ``timeout_s``."""

    def __init__(self, client: str, seq: int, attempts: int, timeout_s: float) -> None:
        super().__init__(f"request {client}/{seq}: no result after {attempts} attempt(s) of {timeout_s:g} s "
                         "(are all agents running? is the batch far above the agents' --max-batch?)")
        self.client, self.seq, self.attempts = client, seq, attempts


@dataclass(frozen=True)
class Result:
    seq: int
    outputs: dict[str, np.ndarray]  # views over the received frames (no copy)
    trace: tuple[StageRecord, ...]  # one record per stage, in pipeline order
    latency_s: float  # first send to arrival, resends included
    attempts: int


@dataclass
class _Pending:
    frames: list[Any]  # kept for resends; they reference the caller's arrays (not copied)
    first_sent: float
    last_sent: float
    attempts: int


def default_client_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Client:
    """Submit batches to a running pipeline. See the module docstring.

    ``client_id`` must be unique among the clients of a pipeline, also across restarts (sequence
    numbers start at 0 again): results are routed and matched by it. The default is
    ``host-pid-random``."""

    def __init__(self, entry: str, exit: str, client_id: str | None = None, window: int = 8,
                 timeout_s: float = 30.0, retries: int = 2, context: zmq.Context | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if timeout_s <= 0 or retries < 0:
            raise ValueError("timeout_s must be > 0 and retries >= 0")
        self.client_id = client_id or default_client_id()
        routing_id = self.client_id.encode()
        if not 0 < len(routing_id) <= 255 or routing_id[0] == 0:
            raise ValueError(f"client id {self.client_id!r}: must be 1..255 bytes, not starting with NUL")
        self.entry, self.exit = entry, exit
        self.window, self.timeout_s, self.retries = window, timeout_s, retries
        self.duplicates = 0  # results that arrived again after a resend (dropped)
        self.resends = 0
        self._own_context = context is None
        self._ctx = context or new_context()
        try:
            # Results socket first, so the exit knows our routing id before our first result exists.
            self._results = connect_dealer(self._ctx, exit, auth=INSECURE, routing_id=routing_id, hwm=max(2, window))
            try:
                self._requests = connect_push(self._ctx, entry, auth=INSECURE, hwm=max(2, window))
            except TransportError:
                self._results.close(linger=0)
                raise
        except TransportError as exc:
            if self._own_context:
                close_context(self._ctx)
            raise ClientError(str(exc)) from None
        self._poller = zmq.Poller()  # waiting for results
        self._poller.register(self._results, zmq.POLLIN)
        self._send_poller = zmq.Poller()  # waiting to send, still reading results
        self._send_poller.register(self._requests, zmq.POLLOUT)
        self._send_poller.register(self._results, zmq.POLLIN)
        self._limits = Limits(max_tensors=256)
        self._next_seq = 0
        self._pending: dict[int, _Pending] = {}
        self._done: dict[int, Result | ClientError] = {}

    # ---- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the sockets. Requests still in flight are abandoned."""
        for sock in (self._requests, self._results):
            sock.close(linger=0)
        if self._own_context:
            close_context(self._ctx)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- API --------------------------------------------------------------------------------

    def submit(self, inputs: Inputs) -> int:
        """Send one batch and return its sequence number; blocks while ``window`` requests are in
        flight. A bare array is sent unnamed and is bound to the first stage's only input. The arrays
        are not copied: do not modify them until their result has been collected."""
        arrays = _named(inputs)
        while len(self._pending) >= self.window:
            self._pump(self._next_deadline())
        seq = self._next_seq
        self._next_seq += 1
        frames = encode(data_header(self.client_id, seq, arrays), list(arrays.values()))
        self._send(frames)
        now = time.monotonic()
        self._pending[seq] = _Pending(frames, now, now, 1)
        return seq

    def result(self, seq: int) -> Result:
        """Wait for request ``seq``; raise RemoteError or RequestTimeout if it failed."""
        while seq not in self._done:
            if seq not in self._pending:
                raise KeyError(f"request {seq} was never submitted or its result was already collected")
            self._pump(self._next_deadline())
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
        return len(self._pending)

    # ---- engine -----------------------------------------------------------------------------

    def _forget(self, seqs: Iterable[int]) -> None:
        for seq in seqs:
            self._pending.pop(seq, None)
            self._done.pop(seq, None)

    def _next_deadline(self) -> float:
        if not self._pending:
            return time.monotonic() + self.timeout_s
        return min(p.last_sent for p in self._pending.values()) + self.timeout_s

    def _pump(self, deadline: float) -> None:
        """Wait until a result arrives or ``deadline`` passes; then resend what is overdue."""
        wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
        if self._poller.poll(wait_ms):
            self._receive_available()
        self._resend_overdue()

    def _receive_available(self) -> None:
        while True:
            try:
                frames = recv_frames(self._results, self._limits.max_frames, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._accept(frames)

    def _accept(self, frames: list[zmq.Frame]) -> None:
        arrived = time.monotonic()
        try:
            header, arrays = decode(frames, self._limits)
        except ProtocolError as exc:
            if exc.client == self.client_id and exc.seq in self._pending:
                bad = ClientError(f"request {self.client_id}/{exc.seq}: malformed result: {exc}")
                self._finish(exc.seq, bad)
            return  # a malformed result for no request of ours: nothing to attach it to
        if header.client != self.client_id or header.seq not in self._pending:
            self.duplicates += 1
            return
        pending = self._pending[header.seq]
        if header.kind == "error":
            outcome: Result | ClientError = RemoteError(header.client, header.seq, header.error_stage,
                                                        header.error or "")
        else:
            outputs = {t.name: arr for t, arr in zip(header.tensors, arrays, strict=True)}
            latency = arrived - pending.first_sent
            outcome = Result(header.seq, outputs, header.trace, latency, pending.attempts)
        self._finish(header.seq, outcome)

    def _finish(self, seq: int, outcome: Result | ClientError) -> None:
        del self._pending[seq]
        self._done[seq] = outcome

    def _resend_overdue(self) -> None:
        now = time.monotonic()
        for seq, pending in list(self._pending.items()):
            if now - pending.last_sent < self.timeout_s:
                continue
            if pending.attempts > self.retries:
                self._finish(seq, RequestTimeout(self.client_id, seq, pending.attempts, self.timeout_s))
                continue
            self.resends += 1
            pending.attempts += 1
            pending.last_sent = time.monotonic()
            # If the entry is stuck or gone this attempt still counts; the next timeout decides.
            with contextlib.suppress(ClientError):
                self._send(pending.frames)

    def _send(self, frames: list[Any]) -> None:
        """Hand a request to the entry, receiving results meanwhile: the pipeline may be full and
        waiting for us to read, and blocking on the entry alone would deadlock."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                send_frames(self._requests, frames, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            wait_ms = int((deadline - time.monotonic()) * 1000)
            if wait_ms <= 0:
                raise ClientError(f"the entry {self.entry} accepted no request for {self.timeout_s:g} s "
                                  "(is the first agent running?)")
            events = dict(self._send_poller.poll(wait_ms))
            if self._results in events:
                self._receive_available()


def _named(inputs: Inputs) -> dict[str, np.ndarray]:
    if isinstance(inputs, np.ndarray):
        return {"": inputs}
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError("inputs must be a numpy array or a non-empty dict of name -> numpy array")
    for name, arr in inputs.items():
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"input {name!r} is a {type(arr).__name__}, not a numpy array")
    return dict(inputs)
