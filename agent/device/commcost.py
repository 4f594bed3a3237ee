"""What the runtime's own communication costs on this device, measured with the real code paths.

An agent's receive and send threads decode, encode and copy megabytes per microbatch on the same
CPU as its compute; the planner needs those costs per device to predict a stage's time. This module
measures them over loopback, with a helper *peer* process standing in for the neighbouring stages:

- per codec (raw, fp16, int8) and with and without CURVE, the CPU seconds this process spends
  per message and per byte to encode+send (``codecs.encode``, ``wire.encode``, ``send_frames``)
  and to receive+decode (``recv_frames``, ``wire.decode``, ``codecs.decode``). CPU time is the
  whole process's (``time.process_time``), so libzmq's I/O thread and CURVE's encryption, which run
  outside the Python thread, are counted; the peer's CPU is not. Each cost is a line through two
  message sizes: ``per_message + per_byte * bytes`` (bytes of the uncompressed tensor).
- ``share``: how much of that CPU lengthens compute when both run at once. A compute piece is
  timed alone and while this process relays messages through the peer (as an agent does while it
  computes); share = extra wall time per compute / CPU seconds of communication per compute (this
  process's and the peer's: on the device both take from the same cores). About 1 when everything
  shares one core (or a CPU quota), about 0 with a spare core.

The peer (``python -m edgepipe.agent.device.commcost``) binds a *sink* (counts and drops messages;
answers a one-frame ``flush`` with its CPU time once everything before it arrived) and an *echo*
(returns each message unchanged), plain and CURVE, and pushes to this process's listening socket.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
from edgepipe.agent.formats import codecs
from edgepipe.agent.formats.keys import KeyPair, new_keypair
from edgepipe.agent.formats.profiles import CommCost, CommProfile
from edgepipe.agent.formats.wire import Limits, data_header, decode, encode
from edgepipe.agent.transport import (
    INSECURE,
    ClientAuth,
    ServerAuth,
    bind_pull,
    bound_endpoint,
    close_context,
    connect_push,
    new_context,
    recv_frames,
    send_frames,
)

SMALL_VALUES = 256  # the small message: one row of 256 float32 values (1 KiB)
HWM = 2  # as the agents' sockets
WINDOW = 2  # round trips in flight
FLUSH = b"flush"
PEER_TIMEOUT_S = 60.0
SHARE_BLOCK_S = 0.3  # wall seconds of compute per block of the share measurement


class CommError(RuntimeError):
    """The loopback measurement could not run (peer did not start, a socket failed)."""


@dataclass(frozen=True)
class _Channel:
    """Our side of one security setting: a PUSH to the peer's sink, one to its echo, and the PULL
    the peer pushes to (echoes and flush answers)."""

    sink: zmq.Socket
    echo: zmq.Socket
    pull: zmq.Socket


# ---- the message path, as an agent runs it ---------------------------------------------------------

def encode_message(arr: np.ndarray, codec: str, seq: int) -> list[Any]:
    """Frames for one tensor: codec, then the wire format (what an agent's sender thread does)."""
    used = codecs.choose(arr, codec)
    frame = codecs.encode(arr, used)
    if used != "raw":
        frame = frame.view(np.uint8).reshape(-1)  # today's wire has no codec field: bytes as uint8
    return encode(data_header("commcost", seq, {"x": frame}), [frame])


def decode_message(frames: Sequence[Any], codec: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor a message carries (what an agent's receiver thread does)."""
    _header, arrays = decode(frames, Limits(max_tensors=1))
    if codec == "raw":
        return arrays[0]
    return codecs.decode(arrays[0], codec, "float32", shape)


# ---- measurement -------------------------------------------------------------------------------------

def sample_tensor(nbytes: int, width: int = SMALL_VALUES, seed: int = 0) -> np.ndarray:
    """A float32 activation-like tensor of about ``nbytes``: rows of ``width`` values."""
    rows = max(1, nbytes // (4 * width))
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def measure_comm(large_bytes: int, compute: Callable[[], None] | None = None,
                 codec_names: Sequence[str] = codecs.CODECS, secure_modes: Sequence[bool] = (False, True),
                 messages: int = 8, width: int = SMALL_VALUES) -> CommProfile:
    """Costs of every (codec, security) pair and, if ``compute`` is given (one run of a compute
    piece), the share of communication CPU that lengthens it."""
    small = sample_tensor(width * 4, width)
    large = sample_tensor(max(large_bytes, 8 * width * 4), width, seed=1)
    with _Peer() as peer:
        costs = []
        for secure in secure_modes:
            channel = peer.channel(secure)
            for codec in codec_names:
                costs.append(_cost(channel, codec, secure, small, large, messages))
        share = _share(peer.channel(False), compute, large, costs) if compute is not None else None
    alone, with_comm, comm_cpu = share if share is not None else (math.nan, math.nan, math.nan)
    return CommProfile(costs=tuple(costs), message_bytes=(small.nbytes, large.nbytes),
                       share=_share_value(alone, with_comm, comm_cpu), compute_alone_s=alone,
                       compute_with_comm_s=with_comm, comm_cpu_s=comm_cpu)


def _share_value(alone: float, with_comm: float, comm_cpu: float) -> float:
    """(with - alone) / comm CPU, clamped to [0, 1.5]: the fraction of communication CPU that
    delays compute. 1.0 (the cautious value: comm fully on the compute's cores) if not measured."""
    if not all(math.isfinite(x) for x in (alone, with_comm, comm_cpu)) or comm_cpu <= 0:
        return 1.0
    return min(max((with_comm - alone) / comm_cpu, 0.0), 1.5)


def _cost(channel: _Channel, codec: str, secure: bool, small: np.ndarray, large: np.ndarray,
          messages: int) -> CommCost:
    """Lines through the small and the large message: send alone, and send + receive (round trips
    through the echo); receive = round trip - send. Medians of three interleaved blocks."""
    sends: dict[int, list[float]] = {small.nbytes: [], large.nbytes: []}
    trips: dict[int, list[float]] = {small.nbytes: [], large.nbytes: []}
    for _ in range(3):
        for arr, count in ((small, 4 * messages), (large, messages)):
            sends[arr.nbytes].append(_send_cpu(channel, arr, codec, count))
            trips[arr.nbytes].append(_round_trip_cpu(channel, arr, codec, count))
    s_small, s_large = (statistics.median(sends[a.nbytes]) for a in (small, large))
    r_small = max(statistics.median(trips[small.nbytes]) - s_small, 0.0)
    r_large = max(statistics.median(trips[large.nbytes]) - s_large, 0.0)
    send_byte, send_msg = _line(small.nbytes, s_small, large.nbytes, s_large)
    recv_byte, recv_msg = _line(small.nbytes, r_small, large.nbytes, r_large)
    return CommCost(codec=codec, secure=secure, recv_per_message_s=recv_msg, recv_per_byte_s=recv_byte,
                    send_per_message_s=send_msg, send_per_byte_s=send_byte)


def _line(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float]:
    """(slope, intercept) through two points; neither is negative (noise on a tiny cost)."""
    slope = max((y1 - y0) / (x1 - x0), 0.0) if x1 > x0 else 0.0
    return slope, max(y0 - slope * x0, 0.0)


def _send_cpu(channel: _Channel, arr: np.ndarray, codec: str, count: int) -> float:
    """CPU seconds per message to encode and send ``count`` messages, until the peer has them all."""
    started = time.process_time()
    for seq in range(count):
        send_frames(channel.sink, encode_message(arr, codec, seq))
    _flush(channel)
    return (time.process_time() - started) / count


def _round_trip_cpu(channel: _Channel, arr: np.ndarray, codec: str, count: int) -> float:
    """CPU seconds per message to send one and receive+decode it back, ``WINDOW`` in flight."""
    started = time.process_time()
    _relay(channel, arr, codec, count)
    return (time.process_time() - started) / count


def _relay(channel: _Channel, arr: np.ndarray, codec: str, count: int) -> None:
    sent = received = 0
    while received < count:
        while sent < count and sent - received < WINDOW:
            send_frames(channel.echo, encode_message(arr, codec, sent))
            sent += 1
        frames = _recv(channel.pull)
        decode_message(frames, codec, arr.shape)
        received += 1


def _flush(channel: _Channel) -> float:
    """Wait until the peer has taken everything sent to its sink; return the peer's CPU seconds."""
    send_frames(channel.sink, [FLUSH])
    frames = _recv(channel.pull)
    return float(bytes(frames[0].buffer).split()[1])


def _recv(sock: zmq.Socket) -> list[zmq.Frame]:
    """The next message, waiting at most PEER_TIMEOUT_S; polls then takes it without blocking,
    since a socket can be reported readable before anything can be read (seen with CURVE)."""
    deadline = time.monotonic() + PEER_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            try:
                return recv_frames(sock, 4, zmq.NOBLOCK)
            except zmq.Again:
                continue
    raise CommError(f"the loopback peer sent nothing for {PEER_TIMEOUT_S:.0f} s")


def _share(channel: _Channel, compute: Callable[[], None], large: np.ndarray,
           costs: Sequence[CommCost]) -> tuple[float, float, float]:
    """(compute alone, compute beside communication, communication CPU per compute run), wall and
    CPU seconds, medians of interleaved blocks."""
    import threading

    compute()  # warm
    started = time.perf_counter()
    compute()
    one = max(time.perf_counter() - started, 1e-4)
    runs = max(2, min(20, math.ceil(SHARE_BLOCK_S / one)))
    raw = next(c for c in costs if c.codec == "raw" and not c.secure)
    trip = raw.send_s(large.nbytes) + raw.recv_s(large.nbytes)
    # enough round trips per compute run that communication is a clear part of it (~40%)
    per_run = max(1, min(200, math.ceil(0.4 * one / max(trip, 1e-6))))
    alone, beside, cpu = [], [], []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(runs):
            compute()
        alone.append((time.perf_counter() - started) / runs)

        peer_before = _flush(channel)
        ours_before = time.process_time()
        compute_cpu: list[float] = []
        worker = threading.Thread(target=_compute_runs, args=(compute, runs, compute_cpu), name="compute")
        started = time.perf_counter()
        worker.start()
        _relay(channel, large, "raw", runs * per_run)
        worker.join()
        wall = time.perf_counter() - started
        ours = time.process_time() - ours_before - sum(compute_cpu)
        peer = _flush(channel) - peer_before
        beside.append(wall / runs)
        cpu.append(max(ours + peer, 0.0) / runs)
    return statistics.median(alone), statistics.median(beside), statistics.median(cpu)


def _compute_runs(compute: Callable[[], None], runs: int, cpu_out: list[float]) -> None:
    """``runs`` computes on this thread; appends their CPU seconds (ONNX Runtime with one intra-op
    thread computes on the calling thread, so this is the compute's own CPU)."""
    begun = time.thread_time()
    for _ in range(runs):
        compute()
    cpu_out.append(time.thread_time() - begun)


# ---- the peer process ----------------------------------------------------------------------------------

class _Peer:
    """The helper process and our sockets to it, plain and CURVE."""

    def __init__(self) -> None:
        self._ctx = new_context()
        self._ours = new_keypair()
        self._proc: subprocess.Popen | None = None
        self._sockets: list[zmq.Socket] = []
        self._channels: dict[bool, _Channel] = {}

    def __enter__(self) -> _Peer:
        try:
            plain = bind_pull(self._ctx, "tcp://127.0.0.1:0", auth=INSECURE, max_frame_bytes=None, hwm=HWM)
            self._sockets.append(plain)
            peer_keys = new_keypair()
            allowed = ServerAuth(self._ours, frozenset({peer_keys.public}))
            curve = bind_pull(self._ctx, "tcp://127.0.0.1:0", auth=allowed, max_frame_bytes=None, hwm=HWM)
            self._sockets.append(curve)
            config = {"plain": bound_endpoint(plain), "curve": bound_endpoint(curve),
                      "server_key": self._ours.public.decode(), "public": peer_keys.public.decode(),
                      "secret": peer_keys.secret.decode()}
            self._proc = subprocess.Popen([sys.executable, "-m", "edgepipe.agent.device.commcost"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.write(json.dumps(config) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
            if not line:
                raise CommError(f"the loopback peer exited with {self._proc.wait()} before it was ready")
            ends = json.loads(line)
            for secure, pull in ((False, plain), (True, curve)):
                auth = ClientAuth(self._ours, peer_keys.public) if secure else INSECURE
                sink = connect_push(self._ctx, ends["curve_sink" if secure else "plain_sink"], auth=auth, hwm=HWM)
                echo = connect_push(self._ctx, ends["curve_echo" if secure else "plain_echo"], auth=auth, hwm=HWM)
                self._sockets += [sink, echo]
                self._channels[secure] = _Channel(sink, echo, pull)
        except BaseException:
            self.__exit__()
            raise
        return self

    def channel(self, secure: bool) -> _Channel:
        return self._channels[secure]

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            try:
                if self._proc.stdin:
                    self._proc.stdin.close()  # the peer stops when its stdin closes
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for sock in self._sockets:
            sock.close(0)
        close_context(self._ctx)


def _peer_main() -> None:
    """Run the peer: read the config line, bind sinks and echoes, serve until stdin closes."""
    import os
    import select

    config = json.loads(sys.stdin.readline())
    ctx = new_context()
    ours = KeyPair(config["public"].encode(), config["secret"].encode())
    server = ServerAuth(ours, frozenset({config["server_key"].encode()}))
    socks: dict[str, zmq.Socket] = {}
    for name, auth in (("plain", INSECURE), ("curve", server)):
        socks[f"{name}_sink"] = bind_pull(ctx, "tcp://127.0.0.1:0", auth=auth, max_frame_bytes=None, hwm=HWM)
        socks[f"{name}_echo"] = bind_pull(ctx, "tcp://127.0.0.1:0", auth=auth, max_frame_bytes=None, hwm=HWM)
    back = {"plain": connect_push(ctx, config["plain"], auth=INSECURE, hwm=HWM),
            "curve": connect_push(ctx, config["curve"], auth=ClientAuth(ours, config["server_key"].encode()),
                                  hwm=HWM)}
    print(json.dumps({k: bound_endpoint(s) for k, s in socks.items()}), flush=True)
    poller = zmq.Poller()
    for sock in socks.values():
        poller.register(sock, zmq.POLLIN)
    try:
        while True:
            if select.select([sys.stdin], [], [], 0)[0] and not os.read(sys.stdin.fileno(), 4096):
                return  # stdin closed: the measuring process is done
            for sock, _ in poller.poll(200):
                name = next(k for k, s in socks.items() if s is sock)
                try:  # never block: a socket can be reported readable with nothing to read yet
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)  # (seen on CURVE sockets)
                except zmq.Again:
                    continue
                out = back[name.split("_")[0]]
                if name.endswith("_echo"):
                    out.send_multipart(frames, copy=False)
                elif len(frames) == 1 and frames[0].bytes == FLUSH:
                    out.send(f"flushed {time.process_time():.9f}".encode())
    finally:
        for sock in (*socks.values(), *back.values()):
            sock.close(0)
        close_context(ctx)


if __name__ == "__main__":
    _peer_main()
