"""Every ZeroMQ socket EdgePipe opens is made here, so socket policy lives in one place.

Policy: small high-water marks (a few messages of up to a few MB each, so a slow peer causes
back-pressure, not memory growth), bounded LINGER (shutdown never hangs on a dead peer), IMMEDIATE on
connecting sockets (nothing queues for a peer that is not there), ZMTP heartbeats (half-open TCP
connections are noticed and re-dialled), and MAXMSGSIZE on every socket that receives (libzmq drops
the connection of a peer sending a bigger frame before allocating it). CurveZMQ keys will be applied
in ``_common`` so that every link is covered by construction.

Topology (see docs/formats/wire.md): data flows over PUSH -> PULL hops; the last stage binds a
ROUTER and each client connects a DEALER whose routing id is its client id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

DEFAULT_HWM = 2
LINGER_MS = 1000
HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 6000
CONTROL_MAX_BYTES = 4096  # what a ROUTER accepts from clients, which send it nothing today


class TransportError(RuntimeError):
    """A socket could not be bound or connected (bad endpoint, port in use)."""


def new_context() -> zmq.Context:
    return zmq.Context()


def bind_pull(ctx: zmq.Context, endpoint: str, *, max_frame_bytes: int | None,
              hwm: int = DEFAULT_HWM) -> zmq.Socket:
    """Data in: an agent's --listen socket."""
    sock = _common(ctx.socket(zmq.PULL), hwm)
    _max_frame(sock, max_frame_bytes)
    return _bind(sock, endpoint)


def connect_push(ctx: zmq.Context, endpoint: str, *, hwm: int = DEFAULT_HWM) -> zmq.Socket:
    """Data out to the next stage's --listen (or a client's to the entry). Blocks at the HWM."""
    sock = _common(ctx.socket(zmq.PUSH), hwm)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    _max_frame(sock, CONTROL_MAX_BYTES)  # a PUSH receives nothing
    return _connect(sock, endpoint)


def bind_router(ctx: zmq.Context, endpoint: str, *, hwm: int = DEFAULT_HWM) -> zmq.Socket:
    """Results out at the last stage. ROUTER_MANDATORY turns "no such client" and "client's queue is
    full" into errors (EHOSTUNREACH / EAGAIN) instead of silent drops; ROUTER_HANDOVER lets a client
    that reconnects under the same id take over its route."""
    sock = _common(ctx.socket(zmq.ROUTER), hwm)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    _max_frame(sock, CONTROL_MAX_BYTES)
    return _bind(sock, endpoint)


def connect_dealer(ctx: zmq.Context, endpoint: str, *, routing_id: bytes, hwm: int = DEFAULT_HWM,
                   max_frame_bytes: int | None = None) -> zmq.Socket:
    """A client's result socket, connected to the last stage's --results ROUTER."""
    sock = _common(ctx.socket(zmq.DEALER), hwm)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    _max_frame(sock, max_frame_bytes)
    return _connect(sock, endpoint)


def bind_control(ctx: zmq.Context, endpoint: str, *, max_frame_bytes: int) -> zmq.Socket:
    """A device's control endpoint (``edgepipe-agent control``): requests in, replies out. Replies go
    to whoever asked; one that has gone away is dropped rather than blocking the daemon."""
    sock = _common(ctx.socket(zmq.ROUTER), DEFAULT_HWM)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    _max_frame(sock, max_frame_bytes)
    return _bind(sock, endpoint)


def connect_control(ctx: zmq.Context, endpoint: str, *, max_frame_bytes: int | None = None) -> zmq.Socket:
    """The asking side of the control protocol (workstation, or a device probing a peer)."""
    sock = _common(ctx.socket(zmq.DEALER), DEFAULT_HWM)
    sock.setsockopt(zmq.LINGER, 0)  # an unanswered request to a dead device must not hold up exit
    _max_frame(sock, max_frame_bytes)
    return _connect(sock, endpoint)


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint actually bound (resolves port 0 or ``*`` to the port the OS picked)."""
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def send_frames(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """Send without copying tensor frames: ZeroMQ keeps a reference to each buffer until sent."""
    sock.send_multipart(frames, flags=flags, copy=False)


def recv_frames(sock: zmq.Socket, max_frames: int, flags: int = 0) -> list[zmq.Frame]:
    """Receive one multipart message as zmq.Frame objects. Frames beyond ``max_frames + 1`` are
    received and released at once, so a message with a million tiny frames cannot build a million
    Python objects; the caller sees ``max_frames + 1`` frames and rejects the message."""
    frames = [sock.recv(flags, copy=False)]
    more = frames[0].more
    while more:
        frame = sock.recv(0, copy=False)  # the rest of a multipart message has already arrived
        more = frame.more
        if len(frames) <= max_frames:
            frames.append(frame)
    return frames


def _common(sock: zmq.Socket, hwm: int) -> zmq.Socket:
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    return sock


def _max_frame(sock: zmq.Socket, max_frame_bytes: int | None) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, -1 if max_frame_bytes is None else int(max_frame_bytes))


def _bind(sock: zmq.Socket, endpoint: str) -> zmq.Socket:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise TransportError(f"cannot bind {endpoint}: {exc}") from None
    return sock


def _connect(sock: zmq.Socket, endpoint: str) -> zmq.Socket:
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise TransportError(f"cannot connect to {endpoint}: {exc}") from None
    return sock
