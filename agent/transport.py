"""Every ZeroMQ socket EdgePipe opens is made here, so socket policy lives in one place.

Policy: small high-water marks (a few messages of up to a few MB each, so a slow peer causes
back-pressure, not memory growth), bounded LINGER (shutdown never hangs on a dead peer), IMMEDIATE on
connecting sockets (nothing queues for a peer that is not there), ZMTP heartbeats (half-open TCP
connections are noticed and re-dialled), and MAXMSGSIZE on every socket that receives (libzmq drops
the connection of a peer sending a bigger frame before allocating it).

Security is a required argument of every bind and connect, so no socket is made without a decision:
``ServerAuth`` (a binding socket: our keypair and the public keys allowed to connect, checked by a
ZAP handler on the socket's context), ``ClientAuth`` (a connecting socket: our keypair and the
server's public key), or ``INSECURE`` (plaintext, accepting anyone), which callers only pass when the
user asked for insecure mode by name. A peer whose key is not on the list never completes the
handshake, so none of its messages reach the socket; the key of an accepted peer is on every frame
it sends (``peer_key``). Contexts that may hold a ZAP handler are closed with ``close_context``.

Topology (docs/formats/wire.md, version 2): every hop is a DEALER (the sender, connects) to a ROUTER
(the receiver, binds), so acknowledgements, credits and heartbeats flow back on the same connection:
``connect_data`` -> ``bind_data`` between stages and from a client to the entry, and the client's
``connect_results`` -> the last stage's ``bind_results``. A connecting socket's routing id is 16
random bytes: under CurveZMQ it travels encrypted, so nobody can take over another peer's route by
naming it. The v1 PUSH/PULL helpers (``bind_pull``, ``connect_push``, ``bind_router``,
``connect_dealer``) remain for tools that measure plain sockets.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
from edgepipe.agent.formats.keys import KeyPair
from zmq.auth.thread import ThreadAuthenticator

DEFAULT_HWM = 2
LINGER_MS = 1000
HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 6000
CONTROL_MAX_BYTES = 4096  # what a ROUTER accepts from clients, which send it nothing today
HOP_CONTROL_MAX_BYTES = 66 * 1024  # acks and heartbeats: one frame, a header of at most 64 KiB
HOP_CONTROL_HWM = 10_000  # acks and heartbeats are small; a full pipe would drop them (ROUTER)
DATA_RCVHWM = 64  # per connection: a peer keeps at most its credit (a few messages) in flight
RESULTS_SNDHWM = 64  # per client: results beyond this are held by the exit, not queued in libzmq


class TransportError(RuntimeError):
    """A socket could not be bound or connected (bad endpoint, port in use)."""


@dataclass(frozen=True)
class Insecure:
    """Plaintext, any peer accepted. Only ever passed when the user asked for insecure mode."""

    def __repr__(self) -> str:
        return "INSECURE"


INSECURE = Insecure()


@dataclass(frozen=True)
class ServerAuth:
    """A binding socket's security: our keypair, and the public keys (Z85) allowed to connect."""

    keypair: KeyPair
    allowed: frozenset[bytes]


@dataclass(frozen=True)
class ClientAuth:
    """A connecting socket's security: our keypair, and the public key of the server we expect."""

    keypair: KeyPair
    server_key: bytes


BindAuth = ServerAuth | Insecure
ConnectAuth = ClientAuth | Insecure


def new_context() -> zmq.Context:
    return zmq.Context()


def close_context(ctx: zmq.Context) -> None:
    """Stop the context's ZAP handler (if a secure socket started one), then terminate it. All other
    sockets must be closed first, as for ``Context.term``."""
    with _ZAP_LOCK:
        handler = _ZAP.pop(ctx, None)
    if handler is not None:
        handler[0].stop()
    ctx.term()


def allow_keys(sock: zmq.Socket, keys: Iterable[bytes]) -> None:
    """Replace the keys a secure binding socket accepts; connections made later are checked
    against the new list (existing ones stay up until they drop)."""
    domain = sock.getsockopt(zmq.ZAP_DOMAIN).decode()
    with _ZAP_LOCK:
        handler = _ZAP.get(sock.context)
        if handler is None or domain not in handler[1].allowed:
            raise TransportError("allow_keys: socket was not bound with ServerAuth")
        handler[1].allowed[domain] = frozenset(keys)


def peer_key(frame: zmq.Frame) -> str | None:
    """The Z85 public key the sender authenticated with (the ZAP User-Id), or None on an
    insecure socket."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user or None


def _no_zmtp_heartbeats(sock: zmq.Socket) -> zmq.Socket:
    """Data-plane sockets heartbeat in the protocol itself (wire.Heartbeat, every 0.5 s), which
    also carries incarnations and credit. ZMTP heartbeats are off there: besides being redundant,
    in libzmq 4.3.x a ZMTP heartbeat timeout on a connection whose receive queue is full aborts the
    process (zeromq/libzmq#4364, #3937) -- which is what a stage paused for longer than the timeout
    runs into when it resumes."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, 0)
    return sock


def check_endpoint(endpoint: str, option: str) -> str:
    """A ZeroMQ endpoint needs its transport; ``host:port`` alone is the commonest typo."""
    if "://" not in endpoint:
        raise TransportError(f"{option} {endpoint!r} has no transport; did you mean tcp://{endpoint}?")
    return endpoint


def random_routing_id() -> bytes:
    """16 random bytes, never starting with 0 (ZeroMQ reserves that for ids it makes itself)."""
    rid = os.urandom(16)
    return bytes([rid[0] | 1]) + rid[1:]


def bind_data(ctx: zmq.Context, endpoint: str, *, auth: BindAuth, max_frame_bytes: int | None) -> zmq.Socket:
    """A hop's receiving side (a stage's --listen): data in, acks and heartbeats out to each peer.
    ROUTER_MANDATORY makes a send to a gone peer an error instead of a silent drop."""
    sock = _server(_no_zmtp_heartbeats(_common(ctx.socket(zmq.ROUTER), DATA_RCVHWM)), auth)
    sock.setsockopt(zmq.SNDHWM, HOP_CONTROL_HWM)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a peer reconnecting with its (secret) id takes its route back
    _max_frame(sock, max_frame_bytes)
    return _bind(sock, endpoint)


def connect_data(ctx: zmq.Context, endpoint: str, *, auth: ConnectAuth) -> zmq.Socket:
    """A hop's sending side (to the next stage, or a client's to the entry). Sending is gated by
    the receiver's credit, so the high-water mark is never what limits it. IMMEDIATE: nothing is
    queued for a peer that is not connected (we resend what a gone peer never acknowledged)."""
    sock = _client(_no_zmtp_heartbeats(_common(ctx.socket(zmq.DEALER), HOP_CONTROL_HWM)), auth)
    sock.setsockopt(zmq.ROUTING_ID, random_routing_id())
    sock.setsockopt(zmq.IMMEDIATE, 1)
    _max_frame(sock, HOP_CONTROL_MAX_BYTES)
    return _connect(sock, endpoint)


def bind_results(ctx: zmq.Context, endpoint: str, *, auth: BindAuth) -> zmq.Socket:
    """The last stage's --results: results out to clients (held by the exit when a client's pipe is
    full: ROUTER_MANDATORY reports EAGAIN instead of dropping), acks and heartbeats in."""
    sock = _server(_no_zmtp_heartbeats(_common(ctx.socket(zmq.ROUTER), HOP_CONTROL_HWM)), auth)
    sock.setsockopt(zmq.SNDHWM, RESULTS_SNDHWM)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    _max_frame(sock, HOP_CONTROL_MAX_BYTES)
    return _bind(sock, endpoint)


def connect_results(ctx: zmq.Context, endpoint: str, *, auth: ConnectAuth,
                    max_frame_bytes: int | None = None) -> zmq.Socket:
    """A client's results socket, connected to the last stage's --results. Not IMMEDIATE: with it,
    libzmq drops the messages a connecting socket has received but not yet read when the connection
    goes (the pipe is terminated without waiting), so results waiting for a busy client would be
    lost when the exit stops. It only sends acks and heartbeats, which may wait for a reconnect."""
    sock = _client(_no_zmtp_heartbeats(_common(ctx.socket(zmq.DEALER), HOP_CONTROL_HWM)), auth)
    sock.setsockopt(zmq.ROUTING_ID, random_routing_id())
    _max_frame(sock, max_frame_bytes)
    return _connect(sock, endpoint)


def doorbell(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket]:
    """An inproc pair (ring side, listen side) that wakes a thread polling its sockets when another
    thread has put work in a queue for it. Each side belongs to one thread."""
    listen = ctx.socket(zmq.PULL)
    listen.setsockopt(zmq.LINGER, 0)
    listen.bind(f"inproc://{name}")
    ring = ctx.socket(zmq.PUSH)
    ring.setsockopt(zmq.LINGER, 0)
    ring.setsockopt(zmq.SNDHWM, 16)  # a bell rung many times wakes the listener once; extra rings are dropped
    ring.connect(f"inproc://{name}")
    return ring, listen


def bind_pull(ctx: zmq.Context, endpoint: str, *, auth: BindAuth, max_frame_bytes: int | None,
              hwm: int = DEFAULT_HWM) -> zmq.Socket:
    """Data in: an agent's --listen socket."""
    sock = _server(_common(ctx.socket(zmq.PULL), hwm), auth)
    _max_frame(sock, max_frame_bytes)
    return _bind(sock, endpoint)


def connect_push(ctx: zmq.Context, endpoint: str, *, auth: ConnectAuth, hwm: int = DEFAULT_HWM) -> zmq.Socket:
    """Data out to the next stage's --listen (or a client's to the entry). Blocks at the HWM."""
    sock = _client(_common(ctx.socket(zmq.PUSH), hwm), auth)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    _max_frame(sock, CONTROL_MAX_BYTES)  # a PUSH receives nothing
    return _connect(sock, endpoint)


def bind_router(ctx: zmq.Context, endpoint: str, *, auth: BindAuth, hwm: int = DEFAULT_HWM) -> zmq.Socket:
    """Results out at the last stage. ROUTER_MANDATORY turns "no such client" and "client's queue is
    full" into errors (EHOSTUNREACH / EAGAIN) instead of silent drops; ROUTER_HANDOVER lets a client
    that reconnects under the same id take over its route."""
    sock = _server(_common(ctx.socket(zmq.ROUTER), hwm), auth)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    _max_frame(sock, CONTROL_MAX_BYTES)
    return _bind(sock, endpoint)


def connect_dealer(ctx: zmq.Context, endpoint: str, *, auth: ConnectAuth, routing_id: bytes,
                   hwm: int = DEFAULT_HWM, max_frame_bytes: int | None = None) -> zmq.Socket:
    """A client's result socket, connected to the last stage's --results ROUTER."""
    sock = _client(_common(ctx.socket(zmq.DEALER), hwm), auth)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    _max_frame(sock, max_frame_bytes)
    return _connect(sock, endpoint)


def bind_control(ctx: zmq.Context, endpoint: str, *, auth: BindAuth, max_frame_bytes: int) -> zmq.Socket:
    """A device's control endpoint (``edgepipe-agent control``): requests in, replies out. Replies go
    to whoever asked; one that has gone away is dropped rather than blocking the daemon."""
    sock = _server(_common(ctx.socket(zmq.ROUTER), DEFAULT_HWM), auth)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    _max_frame(sock, max_frame_bytes)
    return _bind(sock, endpoint)


def connect_control(ctx: zmq.Context, endpoint: str, *, auth: ConnectAuth,
                    max_frame_bytes: int | None = None) -> zmq.Socket:
    """The asking side of the control protocol (workstation, or a device probing a peer)."""
    sock = _client(_common(ctx.socket(zmq.DEALER), DEFAULT_HWM), auth)
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


class _KeyLists:
    """The ZAP credentials provider of one context: the allowed keys of each secure socket, by the
    socket's ZAP domain. Called on the authenticator's thread; entries are replaced, never mutated."""

    def __init__(self) -> None:
        self.allowed: dict[str, frozenset[bytes]] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed.get(domain, frozenset())


_ZAP: dict[zmq.Context, tuple[ThreadAuthenticator, _KeyLists]] = {}
_ZAP_LOCK = threading.Lock()
_DOMAINS = itertools.count()


def _server(sock: zmq.Socket, auth: BindAuth) -> zmq.Socket:
    if isinstance(auth, Insecure):
        return sock
    if not isinstance(auth, ServerAuth):
        sock.close(0)
        raise TypeError(f"a binding socket needs ServerAuth or INSECURE, got {type(auth).__name__}")
    domain = f"edgepipe-{next(_DOMAINS)}"
    with _ZAP_LOCK:
        handler = _ZAP.get(sock.context)
        if handler is None:
            authenticator = ThreadAuthenticator(sock.context)
            authenticator.start()
            handler = _ZAP[sock.context] = (authenticator, _KeyLists())
        handler[1].allowed[domain] = frozenset(auth.allowed)
    handler[0].configure_curve_callback(domain, credentials_provider=handler[1])
    sock.zap_domain = domain.encode()
    sock.curve_secretkey = auth.keypair.secret
    sock.curve_publickey = auth.keypair.public
    sock.curve_server = True
    return sock


def _client(sock: zmq.Socket, auth: ConnectAuth) -> zmq.Socket:
    if isinstance(auth, Insecure):
        return sock
    if not isinstance(auth, ClientAuth):
        sock.close(0)
        raise TypeError(f"a connecting socket needs ClientAuth or INSECURE, got {type(auth).__name__}")
    sock.curve_secretkey = auth.keypair.secret
    sock.curve_publickey = auth.keypair.public
    sock.curve_serverkey = auth.server_key
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
