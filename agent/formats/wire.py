"""The EdgePipe wire protocol: one msgpack header frame plus one raw frame per tensor.

A message travels client -> stage 0 -> ... -> last stage -> client. The header names the request
(client id + sequence number), describes every tensor frame (name, dtype, shape), carries an error
message instead of tensors when something failed upstream, and collects one timing record per stage.
Tensor frames are the arrays' own bytes (C order, little-endian): ``encode`` hands numpy arrays to
ZeroMQ as they are and ``decode`` returns numpy views over the received frames, so no tensor is
copied in Python. This module is the one definition of the format; docs/formats/wire.md describes it.

Everything a peer sends is checked here before it is used: header size, msgpack structure, frame
count, dtype and shape against the stage's manifest, and each frame's length against its shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import numpy as np
from edgepipe.agent.formats.bundle import SUPPORTED_DTYPES, TensorSpec

PROTOCOL_VERSION = 1
KINDS = ("data", "error")
MAX_HEADER_BYTES = 64 * 1024
MAX_ERROR_CHARS = 2000  # keeps an error header far below MAX_HEADER_BYTES
MAX_CLIENT_ID_BYTES = 255  # a ZeroMQ routing id is at most 255 bytes
MAX_RANK = 16
MAX_TRACE = 256  # stages a message can pass through
MAX_SEQ = 2**63 - 1

# Wire dtypes are always little-endian; every device we target (x86-64, aarch64, armv7) is too.
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in SUPPORTED_DTYPES}


class ProtocolError(ValueError):
    """A message breaks the protocol. ``client``/``seq`` are set when the request id could be read,
    so the error can be answered to that client; otherwise the message can only be logged."""

    def __init__(self, message: str, client: str | None = None, seq: int | None = None) -> None:
        super().__init__(message)
        self.client = client
        self.seq = seq


@dataclass(frozen=True)
class TensorDesc:
    """One tensor frame: name (a stage input/output name, or "" for positional), dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _WIRE_DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class StageRecord:
    """When one stage handled a message (``time.time()`` on that stage's clock). Only differences
    between fields of one record are meaningful across devices; clocks are not synchronised.
    For a message passed through without compute (an error), compute_start == compute_end."""

    stage: int
    recv: float
    compute_start: float
    compute_end: float
    send: float

    @property
    def compute_s(self) -> float:
        return self.compute_end - self.compute_start

    @property
    def overhead_s(self) -> float:
        """Time inside the agent but outside ONNX Runtime: decode, queues, encode, send."""
        return (self.send - self.recv) - self.compute_s


@dataclass(frozen=True)
class Header:
    kind: str  # "data" or "error"
    client: str  # the submitting client's id; the last stage routes the result to it
    seq: int  # the client's sequence number; (client, seq) identifies the request
    tensors: tuple[TensorDesc, ...] = ()
    error: str | None = None  # set iff kind == "error"
    error_stage: int | None = None  # index of the stage that produced the error
    trace: tuple[StageRecord, ...] = ()
    version: int = PROTOCOL_VERSION

    @property
    def request_id(self) -> str:
        return f"{self.client}/{self.seq}"


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. ``inputs`` (a stage's manifest inputs) makes data messages match
    those tensors by name, dtype and shape, with axis 0 free in 1..max_batch."""

    max_header_bytes: int = MAX_HEADER_BYTES
    max_tensors: int = 64
    max_tensor_bytes: int | None = None
    inputs: tuple[TensorSpec, ...] | None = None
    max_batch: int = 256

    @property
    def max_frames(self) -> int:
        return 1 + self.max_tensors


def stage_limits(inputs: Sequence[TensorSpec], max_batch: int, max_tensor_bytes: int | None = None) -> Limits:
    """Limits for an agent whose stage takes ``inputs``. The per-tensor byte limit follows from
    the manifest when every non-batch axis is fixed; otherwise ``max_tensor_bytes`` must be given."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if max_tensor_bytes is None:
        per_sample = [spec.bytes_per_sample() for spec in inputs]
        if any(b is None for b in per_sample):
            raise ValueError("a stage input has a symbolic non-batch axis; give max_tensor_bytes explicitly")
        max_tensor_bytes = max(per_sample, default=0) * max_batch
    return Limits(max_tensors=len(inputs), max_tensor_bytes=max_tensor_bytes, inputs=tuple(inputs),
                  max_batch=max_batch)


def describe(arrays: Mapping[str, np.ndarray]) -> tuple[TensorDesc, ...]:
    """Tensor descriptors for named arrays (dtype names as in the manifest, e.g. "float32")."""
    return tuple(TensorDesc(name, _dtype_name(arr.dtype), tuple(int(d) for d in arr.shape))
                 for name, arr in arrays.items())


def data_header(client: str, seq: int, arrays: Mapping[str, np.ndarray],
                trace: tuple[StageRecord, ...] = ()) -> Header:
    return Header("data", client, seq, describe(arrays), trace=trace)


def error_header(client: str, seq: int, stage: int, message: str,
                 trace: tuple[StageRecord, ...] = ()) -> Header:
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    return Header("error", client, seq, (), message, stage, trace)


def with_record(header: Header, record: StageRecord) -> Header:
    return replace(header, trace=(*header.trace, record))


def encode(header: Header, arrays: Sequence[np.ndarray]) -> list[Any]:
    """Frames for ``send_multipart(frames, copy=False)``: the packed header, then each array itself
    (C-contiguous little-endian arrays are passed through untouched, so ZeroMQ reads their memory).

    The caller must not modify the arrays until ZeroMQ has sent them."""
    if len(arrays) != len(header.tensors):
        raise ProtocolError(f"header describes {len(header.tensors)} tensors but {len(arrays)} arrays given",
                            header.client, header.seq)
    frames: list[Any] = [msgpack.packb(_header_to_raw(header), use_bin_type=True)]
    for desc, arr in zip(header.tensors, arrays, strict=True):
        wire = _WIRE_DTYPES.get(desc.dtype)
        if wire is None or arr.dtype.name != desc.dtype or tuple(arr.shape) != desc.shape:
            raise ProtocolError(f"tensor {desc.name!r}: array is {arr.dtype}{list(arr.shape)}, "
                                f"header says {desc.dtype}{list(desc.shape)}", header.client, header.seq)
        if arr.dtype != wire or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=wire)  # the only copy encode ever makes
        frames.append(arr)
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(frames[0])} bytes, limit {MAX_HEADER_BYTES}",
                            header.client, header.seq)
    return frames


def decode(frames: Sequence[Any], limits: Limits) -> tuple[Header, list[np.ndarray]]:
    """Parse and check a received message; return its header and numpy views over the tensor frames.

    ``frames`` are zmq.Frame objects (from ``recv_multipart(copy=False)``) or bytes-like objects.
    Raises ProtocolError; its client/seq are set once the header has named the request."""
    if not frames:
        raise ProtocolError("empty message")
    head = _buffer(frames[0])
    if len(head) > limits.max_header_bytes:
        raise ProtocolError(f"header frame is {len(head)} bytes, limit {limits.max_header_bytes}")
    try:
        raw = msgpack.unpackb(head, raw=False, strict_map_key=True, use_list=True,
                              max_str_len=limits.max_header_bytes, max_bin_len=0, max_ext_len=0,
                              max_array_len=4096, max_map_len=32)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"header is a msgpack {type(raw).__name__}, expected a map")
    client, seq = _request_id(raw)
    try:
        header = _header_from_raw(raw, client, seq)
        if len(frames) > limits.max_frames:
            raise ValueError(f"message has more than {limits.max_frames} frames (1 header + "
                             f"{limits.max_tensors} tensors at most)")
        if len(frames) != 1 + len(header.tensors):
            raise ValueError(f"header describes {len(header.tensors)} tensors but the message has "
                             f"{len(frames) - 1} tensor frames")
        if header.kind == "data" and limits.inputs is not None:
            check_against_inputs(header.tensors, limits.inputs, limits.max_batch)
        arrays = [_view(frame, desc, limits) for frame, desc in zip(frames[1:], header.tensors, strict=True)]
    except ValueError as exc:
        raise ProtocolError(str(exc), client, seq) from None
    return header, arrays


def check_against_inputs(tensors: Sequence[TensorDesc], inputs: Sequence[TensorSpec], max_batch: int) -> None:
    """Tensors must be the stage's inputs: same names (any order; or all unnamed, in manifest order),
    same dtypes, same rank, fixed axes equal, one batch size on axis 0 in 1..max_batch."""
    if len(tensors) != len(inputs):
        raise ValueError(f"stage takes {len(inputs)} input tensors ({_names(inputs)}), "
                         f"message has {len(tensors)}")
    if all(t.name == "" for t in tensors):
        pairs = list(zip(tensors, inputs, strict=True))
    else:
        by_name = {spec.name: spec for spec in inputs}
        given = [t.name for t in tensors]
        if sorted(given) != sorted(by_name):
            raise ValueError(f"message tensors {given} do not match stage inputs {_names(inputs)}")
        pairs = [(t, by_name[t.name]) for t in tensors]
    batch = None
    for desc, spec in pairs:
        label = spec.name
        if desc.dtype != spec.dtype:
            raise ValueError(f"input {label!r}: dtype {desc.dtype}, stage expects {spec.dtype}")
        if len(desc.shape) != len(spec.shape):
            raise ValueError(f"input {label!r}: shape {list(desc.shape)} has rank {len(desc.shape)}, "
                             f"stage expects rank {len(spec.shape)} {list(spec.shape)}")
        n = desc.shape[0]
        if not 1 <= n <= max_batch:
            raise ValueError(f"input {label!r}: batch {n} outside 1..{max_batch} (agent --max-batch)")
        if isinstance(spec.shape[0], int) and n != spec.shape[0]:  # a model exported with a fixed batch size
            raise ValueError(f"input {label!r}: batch {n}, but the stage takes only batch {spec.shape[0]} "
                             "(its model has a fixed batch size)")
        if batch is not None and n != batch:
            raise ValueError(f"input {label!r}: batch {n} differs from batch {batch} of another input")
        batch = n
        for axis, (got, want) in enumerate(zip(desc.shape[1:], spec.shape[1:], strict=True), start=1):
            if isinstance(want, int) and got != want:
                raise ValueError(f"input {label!r}: shape {list(desc.shape)}, stage expects "
                                 f"{list(spec.shape)} (axis {axis} is {got}, must be {want})")


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(spec.name for spec in specs)


def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _WIRE_DTYPES:
        raise ProtocolError(f"dtype {name} is not supported on the wire "
                            f"(supported: {', '.join(SUPPORTED_DTYPES)})")
    return name


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    return buf if buf is not None else memoryview(frame)


def _view(frame: Any, desc: TensorDesc, limits: Limits) -> np.ndarray:
    expected = desc.nbytes
    if limits.max_tensor_bytes is not None and expected > limits.max_tensor_bytes:
        raise ValueError(f"tensor {desc.name!r} {desc.dtype}{list(desc.shape)} is {expected} bytes, "
                         f"limit {limits.max_tensor_bytes}")
    buf = _buffer(frame)
    if buf.nbytes != expected:
        raise ValueError(f"tensor {desc.name!r} frame is {buf.nbytes} bytes, "
                         f"{desc.dtype}{list(desc.shape)} needs {expected}")
    return np.frombuffer(buf, dtype=_WIRE_DTYPES[desc.dtype]).reshape(desc.shape)


def _header_to_raw(header: Header) -> dict[str, Any]:
    return {
        "v": header.version,
        "kind": header.kind,
        "client": header.client,
        "seq": header.seq,
        "tensors": [[t.name, t.dtype, list(t.shape)] for t in header.tensors],
        "error": header.error,
        "error_stage": header.error_stage,
        "trace": [[r.stage, r.recv, r.compute_start, r.compute_end, r.send] for r in header.trace],
    }


def _request_id(raw: dict[str, Any]) -> tuple[str | None, int | None]:
    """The request id if it is well formed, so even a broken header can be answered."""
    client, seq = raw.get("client"), raw.get("seq")
    if not (isinstance(client, str) and 0 < len(client.encode()) <= MAX_CLIENT_ID_BYTES):
        return None, None
    if not (type(seq) is int and 0 <= seq <= MAX_SEQ):
        return None, None
    return client, seq


def _header_from_raw(raw: dict[str, Any], client: str | None, seq: int | None) -> Header:
    version = raw.get("v")
    if version != PROTOCOL_VERSION:
        raise ValueError(f"protocol version {version!r} not supported (this agent speaks {PROTOCOL_VERSION})")
    if client is None or seq is None:
        raise ValueError("header has no valid request id (client: non-empty str <= 255 bytes, seq: int >= 0)")
    unknown = set(raw) - {"v", "kind", "client", "seq", "tensors", "error", "error_stage", "trace"}
    if unknown:
        raise ValueError(f"header has unknown fields {sorted(unknown)}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ValueError(f"header kind {kind!r} is not one of {KINDS}")
    tensors = tuple(_tensor_desc(t) for t in _list(raw.get("tensors", []), "tensors"))
    error, error_stage = raw.get("error"), raw.get("error_stage")
    if kind == "error":
        if not isinstance(error, str) or tensors:
            raise ValueError("an error header needs an error message and no tensors")
        if not (error_stage is None or (type(error_stage) is int and error_stage >= 0)):
            raise ValueError(f"error_stage {error_stage!r} is not a stage index")
    elif error is not None or error_stage is not None:
        raise ValueError("a data header must not carry an error")
    trace = tuple(_record(r) for r in _list(raw.get("trace", []), "trace"))
    if len(trace) > MAX_TRACE:
        raise ValueError(f"trace has {len(trace)} records, limit {MAX_TRACE}")
    return Header(kind, client, seq, tensors, error, error_stage, trace, version)


def _list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"header field {field!r} must be a list, got {type(value).__name__}")
    return value


def _tensor_desc(raw: Any) -> TensorDesc:
    if not (isinstance(raw, list) and len(raw) == 3):
        raise ValueError(f"tensor descriptor {raw!r} is not [name, dtype, shape]")
    name, dtype, shape = raw
    if not isinstance(name, str):
        raise ValueError(f"tensor name {name!r} is not a string")
    if dtype not in _WIRE_DTYPES:
        raise ValueError(f"tensor {name!r}: dtype {dtype!r} not supported "
                         f"(supported: {', '.join(SUPPORTED_DTYPES)})")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK
            and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of at most {MAX_RANK} sizes")
    return TensorDesc(name, dtype, tuple(shape))


def _record(raw: Any) -> StageRecord:
    if not (isinstance(raw, list) and len(raw) == 5 and type(raw[0]) is int
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw[1:])):
        raise ValueError(f"trace record {raw!r} is not [stage, recv, compute_start, compute_end, send]")
    return StageRecord(raw[0], float(raw[1]), float(raw[2]), float(raw[3]), float(raw[4]))
