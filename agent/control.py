"""The control endpoint: an idle device daemon the workstation asks to profile itself and its links.

``edgepipe-agent control --listen tcp://*:5560`` binds a ROUTER socket owned by one thread and
answers one request at a time (protocol in docs/formats/wire.md, "Control protocol"):

- ``status``: device name, ONNX Runtime version, cores, host facts, edgepipe version, limits;
- ``profile``: the request carries a profiling bundle's files as raw frames (relative path and
  sha256 of each in the header); the daemon writes them to a temporary directory, verifies them
  and replies with the DeviceProfile measured by ``profile_bundle``;
- ``probe``: time ``echo`` round trips from this device to a peer's control endpoint; replies
  with bandwidth (one direction) and latency;
- ``echo``: a tiny acknowledgement, whatever the size of the request.

A bad or failing request gets an error reply; nothing a client sends stops the daemon.
The asking side is here too (``control_request``, ``request_status``, ``request_profile``,
``request_probe``), so the workstation and probing devices speak through the same code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import Any

import msgpack
import onnxruntime as ort
import zmq
from edgepipe.agent.bundle import BundleError, load_bundle
from edgepipe.agent.profiler import host_facts, profile_bundle
from edgepipe.agent.profiles import (
    DeviceProfile,
    ProfileError,
    load_profile_bundle,
    profile_from_dict,
    profile_to_dict,
)
from edgepipe.agent.session import SessionError
from edgepipe.agent.transport import bind_control, bound_endpoint, connect_control, new_context, recv_frames

CONTROL_VERSION = 1
COMMANDS = ("status", "profile", "probe", "echo")
DEFAULT_MAX_REQUEST_BYTES = 512 * 2**20  # a ViT-Large profiling bundle is ~300 MiB
MAX_HEADER_BYTES = 256 * 1024
MAX_FILES = 256
MAX_MICROBATCH = 1024
MAX_REPEATS = 1000
MAX_PROBE_BYTES = 64 * 2**20
MAX_PROBE_COUNT = 100
MAX_PROBE_SECONDS = 30.0
TINY_BYTES = 64  # latency is timed with round trips this small

log = logging.getLogger("edgepipe.agent.control")


class ControlError(RuntimeError):
    """A control request failed: the device said why, or did not answer in time."""


@dataclass(frozen=True)
class ControlConfig:
    listen: str
    device: str
    threads: int = 1
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    ready_file: Path | None = None
    commands: tuple[str, ...] = COMMANDS  # a serving agent offers no "profile": it would steal its CPU


class _BadRequest(ValueError):
    """The request is malformed or not allowed; its message goes back in the error reply."""


# -- the daemon -------------------------------------------------------------------------------------

def run_control(config: ControlConfig, stop: threading.Event,
                on_ready: Callable[[str], None] | None = None) -> None:
    """Answer control requests on ``config.listen`` until ``stop`` is set."""
    ctx, sock = _open(config, on_ready)
    _answer(config, ctx, sock, stop)


def start_control_thread(config: ControlConfig, stop: threading.Event) -> threading.Thread:
    """Bind now (a bad address raises TransportError here) and answer in a daemon thread until
    ``stop`` is set: how ``edgepipe-agent serve --control`` is probed while it serves."""
    ctx, sock = _open(config, None)
    thread = threading.Thread(target=_answer, args=(config, ctx, sock, stop), name="control", daemon=True)
    thread.start()
    return thread


def _open(config: ControlConfig, on_ready: Callable[[str], None] | None) -> tuple[zmq.Context, zmq.Socket]:
    ctx = new_context()
    try:
        sock = bind_control(ctx, config.listen, max_frame_bytes=config.max_request_bytes)
    except BaseException:
        ctx.term()
        raise
    endpoint = bound_endpoint(sock)
    if config.ready_file is not None:
        config.ready_file.write_text(json.dumps({"pid": os.getpid(), "listen": endpoint}))
    if on_ready is not None:
        on_ready(endpoint)
    log.info("control endpoint %s for device %r", endpoint, config.device)
    return ctx, sock


def _answer(config: ControlConfig, ctx: zmq.Context, sock: zmq.Socket, stop: threading.Event) -> None:
    """The loop; the only code that touches ``sock``."""
    try:
        while not stop.is_set():
            if not sock.poll(200, zmq.POLLIN):
                continue
            # [routing id, empty delimiter, header, raw frames...]: the envelope REQ and DEALER agree on
            frames = recv_frames(sock, MAX_FILES + 3)
            route = frames[0]
            if len(frames) < 3 or len(frames[1].bytes) != 0:
                reply = [msgpack.packb({"v": CONTROL_VERSION, "ok": False, "id": None,
                                        "error": "expected an empty delimiter frame, then the header"})]
            else:
                reply = handle(config, ctx, frames[2:])
            try:
                sock.send_multipart([route, b"", *reply], flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:  # the asker left or its queue is full; it will time out
                log.warning("reply dropped: %s", exc)
    finally:
        sock.close()
        ctx.term()


def handle(config: ControlConfig, ctx: zmq.Context, frames: Sequence[Any]) -> list[bytes]:
    """One request in, one reply out; every failure becomes an error reply."""
    request_id = None
    try:
        header, raw = _parse(frames)
        request_id = header.get("id")
        command = header["cmd"]
        if command not in config.commands:
            raise _BadRequest(f"command {command!r} is not offered here (offered: {', '.join(config.commands)})")
        if command == "status":
            body = status_facts(config)
        elif command == "echo":
            body = {"bytes": sum(len(f) for f in raw)}
        elif command == "profile":
            body = _profile(config, header, raw)
        else:
            body = _probe(ctx, header)
        reply = {"v": CONTROL_VERSION, "ok": True, "id": request_id, **body}
    except _BadRequest as exc:
        reply = {"v": CONTROL_VERSION, "ok": False, "id": request_id, "error": str(exc)[:2000]}
    except Exception as exc:  # a failing request never takes the daemon down
        log.exception("control request failed")
        reply = {"v": CONTROL_VERSION, "ok": False, "id": request_id,
                 "error": f"{type(exc).__name__}: {exc}"[:2000]}
    if not reply["ok"]:
        log.warning("error reply: %s", reply["error"])
    return [msgpack.packb(reply)]


def status_facts(config: ControlConfig) -> dict[str, Any]:
    return {
        "device": config.device,
        "ort_version": ort.__version__,
        "cores": os.cpu_count(),
        "threads": config.threads,
        "host": host_facts(),
        "python": platform.python_version(),
        "edgepipe_version": _edgepipe_version(),
        "max_request_bytes": config.max_request_bytes,
        "commands": list(config.commands),
    }


def _parse(frames: Sequence[Any]) -> tuple[dict[str, Any], list[bytes]]:
    if not frames:
        raise _BadRequest("empty request")
    if len(frames) > MAX_FILES + 1:
        raise _BadRequest(f"too many frames (at most {MAX_FILES + 1})")
    head = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise _BadRequest(f"header of {len(head)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = msgpack.unpackb(head, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise _BadRequest(f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise _BadRequest("header must be a msgpack map")
    if header.get("v") != CONTROL_VERSION:
        raise _BadRequest(f"control protocol version {header.get('v')!r} is not supported "
                          f"(supports {CONTROL_VERSION})")
    if header.get("cmd") not in COMMANDS:
        raise _BadRequest(f"unknown command {header.get('cmd')!r} (known: {', '.join(COMMANDS)})")
    raw = [f.bytes if hasattr(f, "bytes") else bytes(f) for f in frames[1:]]
    return header, raw


def _profile(config: ControlConfig, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
    total = sum(len(f) for f in raw)
    if total > config.max_request_bytes:
        raise _BadRequest(f"request of {total} bytes is over this device's limit of "
                          f"{config.max_request_bytes} bytes (edgepipe-agent control --max-request-mb)")
    files = header.get("files")
    if not isinstance(files, list) or len(files) != len(raw):
        raise _BadRequest(f"'files' must list one {{path, sha256}} per raw frame ({len(raw)} frames)")
    microbatches = _int_list(header.get("microbatches", [1, 8]), "microbatches", MAX_MICROBATCH)
    repeats = _int_in(header.get("repeats", 10), "repeats", 1, MAX_REPEATS)
    warmup = _int_in(header.get("warmup", 2), "warmup", 0, MAX_REPEATS)
    threads = _int_in(header.get("threads", config.threads), "threads", 1, 256)
    device = header.get("device", config.device)
    if not isinstance(device, str) or not device:
        raise _BadRequest("'device' must be a non-empty name")
    with tempfile.TemporaryDirectory(prefix="edgepipe-profile-") as tmp:
        root = Path(tmp)
        for entry, data in zip(files, raw, strict=True):
            path = _safe_path(root, entry)
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                raise _BadRequest(f"{entry.get('path')}: sha256 does not match its content")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        try:
            bundle = load_profile_bundle(root)
            for piece in range(bundle.piece_count):
                load_bundle(bundle.piece_dir(root, piece))
        except (ProfileError, BundleError) as exc:
            raise _BadRequest(f"profiling bundle refused: {str(exc).replace(str(root) + os.sep, '')}") from None
        started = time.perf_counter()
        try:
            profile = profile_bundle(root, device, microbatches, threads, repeats, warmup)
        except (SessionError, BundleError, ProfileError) as exc:
            raise _BadRequest(f"profiling failed: {exc}") from None
    log.info("profiled %d pieces for %r in %.1f s", bundle.piece_count, device, time.perf_counter() - started)
    return {"profile": profile_to_dict(profile)}


def _probe(ctx: zmq.Context, header: dict[str, Any]) -> dict[str, Any]:
    peer = header.get("peer")
    if not isinstance(peer, str) or not peer.startswith("tcp://"):
        raise _BadRequest(f"'peer' must be a tcp:// control endpoint, got {peer!r}")
    size = _int_in(header.get("bytes", 2**20), "bytes", 1, MAX_PROBE_BYTES)
    count = _int_in(header.get("count", 5), "count", 1, MAX_PROBE_COUNT)
    seconds = float(header.get("seconds", 5.0)) if isinstance(header.get("seconds", 5.0), (int, float)) else -1
    if not 0 < seconds <= MAX_PROBE_SECONDS:
        raise _BadRequest(f"'seconds' must be in (0, {MAX_PROBE_SECONDS}]")
    return measure_link(ctx, peer, size, count, seconds)


def measure_link(ctx: zmq.Context, peer: str, size: int, count: int, seconds: float) -> dict[str, Any]:
    """Round trips of ``size``-byte echoes to ``peer`` (bounded by ``count`` and ``seconds``).

    Latency is half the median tiny round trip; bandwidth counts the bytes one way over the median
    large round trip minus the tiny one (the echo's reply is a few bytes)."""
    sock = connect_control(ctx, peer)
    try:
        deadline = time.monotonic() + seconds
        tiny = _echo_times(sock, TINY_BYTES, count, deadline, peer)
        large = _echo_times(sock, size, count, deadline, peer)
    finally:
        sock.close(0)
    rtt_tiny, rtt_large = statistics.median(tiny), statistics.median(large)
    transfer = max(rtt_large - rtt_tiny, 1e-9)
    return {"peer": peer, "bandwidth_mbps": size * 8 / transfer / 1e6, "latency_s": rtt_tiny / 2,
            "bytes": size, "samples": len(large)}


def _echo_times(sock: zmq.Socket, size: int, count: int, deadline: float, peer: str) -> list[float]:
    payload = os.urandom(size)
    header = msgpack.packb({"v": CONTROL_VERSION, "cmd": "echo", "files": []})
    times = []
    for i in range(count):
        remaining = deadline - time.monotonic()
        if remaining <= 0 and times:
            break
        start = time.perf_counter()
        sock.send_multipart([b"", header, payload], copy=False)
        if not sock.poll(max(int(remaining * 1000), 1000), zmq.POLLIN):
            raise _BadRequest(f"peer {peer} did not answer an echo in time")
        sock.recv_multipart()
        if i or count == 1:  # the first round trip also sets up the connection
            times.append(time.perf_counter() - start)
    return times or [time.perf_counter() - start]


def _safe_path(root: Path, entry: Any) -> Path:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise _BadRequest("each 'files' entry must be a map with a 'path' and a 'sha256'")
    rel = PurePosixPath(entry["path"])
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise _BadRequest(f"file path {entry['path']!r} must be relative and stay inside the bundle")
    return root.joinpath(*rel.parts)


def _int_in(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _BadRequest(f"'{name}' must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _int_list(value: Any, name: str, hi: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _BadRequest(f"'{name}' must be a non-empty list of integers")
    return tuple(sorted({_int_in(v, name, 1, hi) for v in value}))


def _edgepipe_version() -> str:
    try:
        return version("edgepipe")
    except PackageNotFoundError:
        return "unknown"


# -- the asking side ----------------------------------------------------------------------------------

def control_request(endpoint: str, header: dict[str, Any], frames: Sequence[bytes] = (),
                    timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one request and wait for its reply; raise ControlError on an error reply or timeout."""
    ctx = new_context()
    sock = connect_control(ctx, endpoint)
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
        ctx.term()
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
