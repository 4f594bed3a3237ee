"""The asking side of the control protocol (docs/formats/control.md): requests to device daemons.

Used by the workstation (``edgepipe-fleet``: deploy, status, stop, supervision; ``edgepipe-compile
--profile``), by clients that lost their entry or exit and ask a daemon for the deployment's
current endpoints (``find_route``), and by devices probing their peers.

Every connection is authenticated unless the caller passes ``INSECURE`` on purpose:
``auth_for(keypair, server_key)`` makes the CurveZMQ client side from our keypair and the daemon's
public key (a daemon that does not hold the matching secret key cannot answer), and the daemon
answers only keys it was told to trust.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq
from edgepipe.agent.formats.bundle import sha256_file
from edgepipe.agent.formats.control import CHUNK_BYTES, CONTROL_VERSION, ControlError
from edgepipe.agent.formats.endpoints import DaemonRef, Endpoints, EndpointsError
from edgepipe.agent.formats.keys import KeyPair, load_public_key
from edgepipe.agent.formats.profiles import DeviceProfile, ProfileError, profile_from_dict
from edgepipe.agent.transport import (
    INSECURE,
    ClientAuth,
    ConnectAuth,
    TransportError,
    close_context,
    connect_control,
    new_context,
)


def auth_for(keypair: KeyPair | None, server_key: bytes | str | None) -> ConnectAuth:
    """CurveZMQ client security towards a daemon whose public key is ``server_key``; INSECURE when
    ``keypair`` is None (the caller's insecure mode, asked for by name)."""
    if keypair is None:
        return INSECURE
    if server_key is None:
        raise ControlError("the daemon's public key is needed for a secure connection (or use insecure mode)")
    key = server_key if isinstance(server_key, bytes) else load_public_key(server_key)
    return ClientAuth(keypair, key)


class ControlConnection:
    """A lasting connection to one daemon: requests and their replies, matched by id. One thread only
    (like its socket). A request that times out leaves the connection usable: late replies to it are
    skipped by id."""

    def __init__(self, endpoint: str, auth: ConnectAuth, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self._own = context is None
        self._ctx = context or new_context()
        try:
            self._sock = connect_control(self._ctx, endpoint, auth=auth)
        except TransportError as exc:
            if self._own:
                close_context(self._ctx)
            raise ControlError(str(exc)) from None
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    @property
    def socket(self) -> zmq.Socket:
        """For a caller's own poller (a supervisor watching many daemons); do not send on it."""
        return self._sock

    def close(self) -> None:
        self._sock.close(0)
        if self._own:
            close_context(self._ctx)

    def __enter__(self) -> ControlConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, header: dict[str, Any], frames: Sequence[bytes] = (), timeout_s: float = 10.0) -> str:
        """Send a request without waiting for its reply; returns its id."""
        request_id = os.urandom(6).hex()
        if not self._sock.poll(int(timeout_s * 1000), zmq.POLLOUT):
            raise ControlError(f"{self.endpoint}: cannot send {header.get('cmd')!r}: not connected within "
                               f"{timeout_s:g} s")
        self._sock.send_multipart([b"", msgpack.packb({"v": CONTROL_VERSION, "id": request_id, **header}),
                                   *frames], copy=False)
        return request_id

    def receive(self, timeout_s: float, what: str = "reply") -> dict[str, Any]:
        """The next reply (any id), or ControlError after ``timeout_s``."""
        if not self._poller.poll(max(1, int(timeout_s * 1000))):
            raise ControlError(f"{self.endpoint}: no answer to {what} within {timeout_s:g} s")
        parts = self._sock.recv_multipart()
        try:
            reply = msgpack.unpackb(parts[-1], raw=False)
        except Exception:  # msgpack raises several unrelated types
            raise ControlError(f"{self.endpoint}: reply is not msgpack") from None
        if not isinstance(reply, dict):
            raise ControlError(f"{self.endpoint}: reply is not a map")
        return reply

    def request(self, header: dict[str, Any], frames: Sequence[bytes] = (), timeout_s: float = 10.0,
                check: bool = True) -> dict[str, Any]:
        """Send one request and wait for its reply; ControlError on an error reply (``check``) or
        timeout."""
        request_id = self.send(header, frames, timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControlError(f"{self.endpoint}: no answer to {header.get('cmd')!r} within {timeout_s:g} s")
            reply = self.receive(remaining, repr(header.get("cmd")))
            if reply.get("id") == request_id:
                break  # replies to earlier, timed-out requests are skipped
        if check and not reply.get("ok"):
            raise ControlError(f"{self.endpoint}: {reply.get('error', 'error reply without a message')}")
        return reply


def control_request(endpoint: str, header: dict[str, Any], frames: Sequence[bytes] = (), *,
                    auth: ConnectAuth, timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one request and wait for its reply; raise ControlError on an error reply or timeout."""
    with ControlConnection(endpoint, auth) as conn:
        return conn.request(header, frames, timeout_s)


def request_status(endpoint: str, *, auth: ConnectAuth, timeout_s: float = 5.0) -> dict[str, Any]:
    return control_request(endpoint, {"cmd": "status"}, auth=auth, timeout_s=timeout_s)


def bundle_files(root: Path) -> tuple[list[dict[str, str]], list[bytes]]:
    """Every file under a profiling bundle: header entries (relative path, sha256) and contents."""
    entries, frames = [], []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        data = path.read_bytes()
        entries.append({"path": path.relative_to(root).as_posix(), "sha256": hashlib.sha256(data).hexdigest()})
        frames.append(data)
    return entries, frames


def request_profile(endpoint: str, bundle_dir: Path, device: str, microbatches: Sequence[int] = (1, 8),
                    threads: int = 1, repeats: int = 10, warmup: int = 2, *, auth: ConnectAuth,
                    timeout_s: float = 600.0, on_bytes: Callable[[int], None] | None = None) -> DeviceProfile:
    """Have the device at ``endpoint`` profile the bundle at ``bundle_dir``; its DeviceProfile.

    The files go to the device's store first, in chunks (what it already has is not sent again),
    so a large bundle over a slow link never becomes one frame that outlives the connection."""
    files = [FileToSend(sha256_file(p), p, p.stat().st_size)
             for p in sorted(q for q in Path(bundle_dir).rglob("*") if q.is_file())]
    entries = [{"path": f.path.relative_to(bundle_dir).as_posix(), "sha256": f.sha256} for f in files]
    header = {"cmd": "profile", "files": entries, "stored": True, "microbatches": sorted(set(microbatches)),
              "threads": threads, "repeats": repeats, "warmup": warmup, "device": device}
    with ControlConnection(endpoint, auth) as conn:
        upload(conn, files, on_bytes=on_bytes)
        reply = conn.request(header, timeout_s=timeout_s)
    try:
        return profile_from_dict(reply.get("profile"), f"{endpoint} profile reply")
    except ProfileError as exc:
        raise ControlError(str(exc)) from None


def request_probe(endpoint: str, peer: str, tensor_bytes: int, count: int = 5, seconds: float = 5.0, *,
                  auth: ConnectAuth, peer_key: str | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
    """Have the device at ``endpoint`` measure its link to the control endpoint ``peer`` (whose
    public key is ``peer_key``; a secure daemon connects only to peers it can authenticate)."""
    header = {"cmd": "probe", "peer": peer, "bytes": tensor_bytes, "count": count, "seconds": seconds}
    if peer_key is not None:
        header["peer_key"] = peer_key
    return control_request(endpoint, header, auth=auth, timeout_s=timeout_s)


# -- uploads --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileToSend:
    sha256: str
    path: Path
    size: int


def upload(conn: ControlConnection, files: Sequence[FileToSend], *, window: int = 3,
           chunk_bytes: int = CHUNK_BYTES, stall_s: float = 60.0,
           on_bytes: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Send what the daemon lacks of ``files`` in chunks, ``window`` chunks in flight; an upload the
    daemon had begun continues where it stopped. Returns (bytes sent, bytes it already had).
    ``on_bytes(n)`` is called as chunks are acknowledged. ControlError names the refusal (full disk,
    hash mismatch on arrival) or the silence."""
    unique = {f.sha256: f for f in files}
    have = conn.request({"cmd": "have", "files": list(unique)}, timeout_s=30.0)
    missing, partial = set(have.get("missing", [])), dict(have.get("partial", {}))
    cached = sum(f.size for sha, f in unique.items() if sha not in missing)
    sent = 0
    for sha in [s for s in unique if s in missing]:
        f = unique[sha]
        resume = int(partial.get(sha, 0))
        cached += resume
        todo = deque(range(resume, f.size, chunk_bytes)) if f.size else deque([0])
        inflight: dict[str, int] = {}
        with open(f.path, "rb") as fh:
            while todo or inflight:
                while todo and len(inflight) < window:
                    offset = todo.popleft()
                    fh.seek(offset)
                    data = fh.read(min(chunk_bytes, f.size - offset))
                    rid = conn.send({"cmd": "put", "sha256": sha, "size": f.size, "offset": offset}, [data],
                                    timeout_s=stall_s)
                    inflight[rid] = len(data)
                reply = conn.receive(stall_s, f"put of {f.path.name}")
                n = inflight.pop(reply.get("id"), None)
                if n is None:
                    continue  # a late reply to an earlier request
                if not reply.get("ok"):
                    _drain_replies(conn, inflight, stall_s)
                    raise ControlError(f"{conn.endpoint}: {f.path.name}: {reply.get('error')}")
                sent += n
                if on_bytes is not None:
                    on_bytes(n)
    return sent, cached


def _drain_replies(conn: ControlConnection, inflight: dict[str, int], timeout_s: float) -> None:
    """After a refused chunk, collect the replies to the chunks still in flight (errors too), so the
    connection carries no stale replies into the next request."""
    deadline = time.monotonic() + timeout_s
    while inflight and time.monotonic() < deadline:
        try:
            inflight.pop(conn.receive(deadline - time.monotonic()).get("id"), None)
        except ControlError:
            return


# -- routes: how a client finds a deployment's current endpoints -----------------------------------

def request_route(daemon: DaemonRef, keypair: KeyPair | None, timeout_s: float = 2.0) -> Endpoints | None:
    """The endpoints the daemon's deployment published last (None if none yet)."""
    reply = control_request(daemon.control, {"cmd": "route"}, auth=auth_for(keypair, daemon.public_key),
                            timeout_s=timeout_s)
    raw = reply.get("endpoints")
    if raw is None:
        return None
    try:
        return Endpoints.from_dict(raw, f"route from {daemon.device}")
    except EndpointsError as exc:
        raise ControlError(str(exc)) from None


def find_route(endpoints: Endpoints, keypair: KeyPair | None, *, newer_than: int | None = None,
               timeout_s: float = 1.0) -> Endpoints | None:
    """Ask the deployment's daemons, in order, for its current endpoints; the first answer of the same
    deployment with a generation above ``newer_than`` (default: the given endpoints' generation), or
    None if no daemon knows a newer one. Unreachable daemons are skipped: one of them is usually the
    device that was lost."""
    floor = endpoints.generation if newer_than is None else newer_than
    for daemon in endpoints.daemons:
        try:
            found = request_route(daemon, keypair, timeout_s)
        except ControlError:
            continue
        if found is not None and found.deployment == endpoints.deployment and found.generation > floor:
            return found
    return None
