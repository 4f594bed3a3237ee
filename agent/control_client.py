"""The asking side of the control protocol: one request to a device daemon, one reply. Used by the
workstation (profiling, deploy), by clients looking for a deployment's current endpoints, and by
devices probing their peers."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import zmq
from edgepipe.agent.formats.control import CONTROL_VERSION, ControlError
from edgepipe.agent.formats.profiles import DeviceProfile, ProfileError, profile_from_dict
from edgepipe.agent.transport import INSECURE, close_context, connect_control, new_context


def control_request(endpoint: str, header: dict[str, Any], frames: Sequence[bytes] = (),
                    timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one request and wait for its reply; raise ControlError on an error reply or timeout."""
    ctx = new_context()
    sock = connect_control(ctx, endpoint, auth=INSECURE)
    try:
        request_id = os.urandom(4).hex()
        sock.send_multipart([b"", msgpack.packb({"v": CONTROL_VERSION, "id": request_id, **header}),
                             *frames], copy=False)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                raise ControlError(f"{endpoint}: no answer to {header.get('cmd')!r} within {timeout_s:g} s")
            parts = sock.recv_multipart()
            try:
                reply = msgpack.unpackb(parts[-1], raw=False)
            except Exception:  # msgpack raises several unrelated types
                raise ControlError(f"{endpoint}: reply is not msgpack") from None
            if isinstance(reply, dict) and reply.get("id") == request_id:
                break  # replies to earlier, timed-out requests on this socket are skipped
    finally:
        sock.close(0)
        close_context(ctx)
    if not reply.get("ok"):
        raise ControlError(f"{endpoint}: {reply.get('error', 'error reply without a message')}")
    return reply


def request_status(endpoint: str, timeout_s: float = 5.0) -> dict[str, Any]:
    return control_request(endpoint, {"cmd": "status"}, timeout_s=timeout_s)


def bundle_files(root: Path) -> tuple[list[dict[str, str]], list[bytes]]:
    """Every file under a profiling bundle: header entries (relative path, sha256) and contents."""
    entries, frames = [], []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        data = path.read_bytes()
        entries.append({"path": path.relative_to(root).as_posix(), "sha256": hashlib.sha256(data).hexdigest()})
        frames.append(data)
    return entries, frames


def request_profile(endpoint: str, bundle_dir: Path, device: str, microbatches: Sequence[int] = (1, 8),
                    threads: int = 1, repeats: int = 10, warmup: int = 2,
                    timeout_s: float = 600.0) -> DeviceProfile:
    """Have the device at ``endpoint`` profile the bundle at ``bundle_dir``; its DeviceProfile."""
    entries, frames = bundle_files(bundle_dir)
    header = {"cmd": "profile", "files": entries, "microbatches": sorted(set(microbatches)),
              "threads": threads, "repeats": repeats, "warmup": warmup, "device": device}
    reply = control_request(endpoint, header, frames, timeout_s=timeout_s)
    try:
        return profile_from_dict(reply.get("profile"), f"{endpoint} profile reply")
    except ProfileError as exc:
        raise ControlError(str(exc)) from None


def request_probe(endpoint: str, peer: str, tensor_bytes: int, count: int = 5, seconds: float = 5.0,
                  timeout_s: float = 30.0) -> dict[str, Any]:
    """Have the device at ``endpoint`` measure its link to the control endpoint ``peer``."""
    header = {"cmd": "probe", "peer": peer, "bytes": tensor_bytes, "count": count, "seconds": seconds}
    return control_request(endpoint, header, timeout_s=timeout_s)
