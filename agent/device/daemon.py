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

A bad or failing request gets an error reply; nothing a client sends stops the daemon. The
messages are defined in formats/control.py; the asking side is agent/control_client.py.
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
from edgepipe.agent.device.profiler import host_facts, profile_bundle
from edgepipe.agent.device.session import SessionError
from edgepipe.agent.formats.bundle import BundleError, load_bundle
from edgepipe.agent.formats.control import (
    COMMANDS,
    CONTROL_VERSION,
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_FILES,
    MAX_MICROBATCH,
    MAX_PROBE_BYTES,
    MAX_PROBE_COUNT,
    MAX_PROBE_SECONDS,
    MAX_REPEATS,
    TINY_BYTES,
    BadRequest,
    parse_request,
)
from edgepipe.agent.formats.profiles import (
    ProfileError,
    load_profile_bundle,
    profile_to_dict,
)
from edgepipe.agent.transport import (
    INSECURE,
    bind_control,
    bound_endpoint,
    close_context,
    connect_control,
    new_context,
    recv_frames,
)

log = logging.getLogger("edgepipe.agent.device.daemon")


@dataclass(frozen=True)
class ControlConfig:
    listen: str
    device: str
    threads: int = 1
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    ready_file: Path | None = None
    commands: tuple[str, ...] = COMMANDS  # a serving agent offers no "profile": it would steal its CPU
    stage_status: Callable[[], dict[str, Any]] | None = None  # a serving agent's counters (`stage` in status)


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
        sock = bind_control(ctx, config.listen, auth=INSECURE, max_frame_bytes=config.max_request_bytes)
    except BaseException:
        close_context(ctx)
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
        close_context(ctx)


def handle(config: ControlConfig, ctx: zmq.Context, frames: Sequence[Any]) -> list[bytes]:
    """One request in, one reply out; every failure becomes an error reply."""
    request_id = None
    try:
        header, raw = parse_request(frames)
        request_id = header.get("id")
        command = header["cmd"]
        if command not in config.commands:
            raise BadRequest(f"command {command!r} is not offered here (offered: {', '.join(config.commands)})")
        if command == "status":
            body = status_facts(config)
        elif command == "echo":
            body = {"bytes": sum(len(f) for f in raw)}
        elif command == "profile":
            body = _profile(config, header, raw)
        else:
            body = _probe(ctx, header)
        reply = {"v": CONTROL_VERSION, "ok": True, "id": request_id, **body}
    except BadRequest as exc:
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
        **({"stage": config.stage_status()} if config.stage_status is not None else {}),
    }


def _profile(config: ControlConfig, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
    total = sum(len(f) for f in raw)
    if total > config.max_request_bytes:
        raise BadRequest(f"request of {total} bytes is over this device's limit of "
                          f"{config.max_request_bytes} bytes (edgepipe-agent control --max-request-mb)")
    files = header.get("files")
    if not isinstance(files, list) or len(files) != len(raw):
        raise BadRequest(f"'files' must list one {{path, sha256}} per raw frame ({len(raw)} frames)")
    microbatches = _int_list(header.get("microbatches", [1, 8]), "microbatches", MAX_MICROBATCH)
    repeats = _int_in(header.get("repeats", 10), "repeats", 1, MAX_REPEATS)
    warmup = _int_in(header.get("warmup", 2), "warmup", 0, MAX_REPEATS)
    threads = _int_in(header.get("threads", config.threads), "threads", 1, 256)
    device = header.get("device", config.device)
    if not isinstance(device, str) or not device:
        raise BadRequest("'device' must be a non-empty name")
    with tempfile.TemporaryDirectory(prefix="edgepipe-profile-") as tmp:
        root = Path(tmp)
        for entry, data in zip(files, raw, strict=True):
            path = _safe_path(root, entry)
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                raise BadRequest(f"{entry.get('path')}: sha256 does not match its content")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        try:
            bundle = load_profile_bundle(root)
            for piece in range(bundle.piece_count):
                load_bundle(bundle.piece_dir(root, piece))
        except (ProfileError, BundleError) as exc:
            raise BadRequest(f"profiling bundle refused: {str(exc).replace(str(root) + os.sep, '')}") from None
        started = time.perf_counter()
        try:
            profile = profile_bundle(root, device, microbatches, threads, repeats, warmup)
        except (SessionError, BundleError, ProfileError) as exc:
            raise BadRequest(f"profiling failed: {exc}") from None
    log.info("profiled %d pieces for %r in %.1f s", bundle.piece_count, device, time.perf_counter() - started)
    return {"profile": profile_to_dict(profile)}


def _probe(ctx: zmq.Context, header: dict[str, Any]) -> dict[str, Any]:
    peer = header.get("peer")
    if not isinstance(peer, str) or not peer.startswith("tcp://"):
        raise BadRequest(f"'peer' must be a tcp:// control endpoint, got {peer!r}")
    size = _int_in(header.get("bytes", 2**20), "bytes", 1, MAX_PROBE_BYTES)
    count = _int_in(header.get("count", 5), "count", 1, MAX_PROBE_COUNT)
    seconds = float(header.get("seconds", 5.0)) if isinstance(header.get("seconds", 5.0), (int, float)) else -1
    if not 0 < seconds <= MAX_PROBE_SECONDS:
        raise BadRequest(f"'seconds' must be in (0, {MAX_PROBE_SECONDS}]")
    return measure_link(ctx, peer, size, count, seconds)


def measure_link(ctx: zmq.Context, peer: str, size: int, count: int, seconds: float) -> dict[str, Any]:
    """Round trips of ``size``-byte echoes to ``peer`` (bounded by ``count`` and ``seconds``).

    Latency is half the median tiny round trip; bandwidth counts the bytes one way over the median
    large round trip minus the tiny one (the echo's reply is a few bytes)."""
    sock = connect_control(ctx, peer, auth=INSECURE)
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
            raise BadRequest(f"peer {peer} did not answer an echo in time")
        sock.recv_multipart()
        if i or count == 1:  # the first round trip also sets up the connection
            times.append(time.perf_counter() - start)
    return times or [time.perf_counter() - start]


def _safe_path(root: Path, entry: Any) -> Path:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise BadRequest("each 'files' entry must be a map with a 'path' and a 'sha256'")
    rel = PurePosixPath(entry["path"])
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise BadRequest(f"file path {entry['path']!r} must be relative and stay inside the bundle")
    return root.joinpath(*rel.parts)


def _int_in(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _int_list(value: Any, name: str, hi: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"'{name}' must be a non-empty list of integers")
    return tuple(sorted({_int_in(v, name, 1, hi) for v in value}))


def _edgepipe_version() -> str:
    try:
        return version("edgepipe")
    except PackageNotFoundError:
        return "unknown"
