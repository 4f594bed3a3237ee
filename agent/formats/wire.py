"""The EdgePipe wire protocol, version 2: data messages (one msgpack header frame plus one frame per
tensor) and the hop's own control messages (heartbeats and acknowledgements, one frame each).

A request travels client -> stage 0 -> ... -> last stage -> client over reliable hops (DEALER ->
ROUTER; docs/formats/wire.md). A data header names the request (``owner`` = the client's
authenticated key, stamped by the entry; ``client`` = the client's session id; ``seq``), describes
every tensor frame (name, dtype, shape, codec), carries an error message instead of tensors when
something failed upstream, and collects one timing record per stage. Raw tensor frames are the
arrays' own bytes (C order, little-endian): ``encode`` hands numpy arrays to ZeroMQ as they are and
``decode`` returns numpy views over the received frames; a compressed frame (fp16, int8; see
formats/codecs.py) is decoded into a new float32 array.

Every hop also carries ``hb`` (heartbeat: incarnation, generation, credit, loss detection) and
``ack`` (custody: ``recv`` = "I have it", ``done`` = "my output for it is in my downstream's
hands, you may forget it") messages in the opposite direction of the data, or both ways for
heartbeats. This module is the one definition of every message; docs/formats/wire.md describes it.

Everything a peer sends is checked here before it is used: header size, msgpack structure, frame
count, dtype, shape and codec against the stage's manifest, and each frame's length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import numpy as np
from edgepipe.agent.formats import codecs
from edgepipe.agent.formats.bundle import SUPPORTED_DTYPES, TensorSpec

PROTOCOL_VERSION = 2
DATA_KINDS = ("data", "error")
CONTROL_KINDS = ("hb", "ack")
KINDS = DATA_KINDS + CONTROL_KINDS
MAX_HEADER_BYTES = 64 * 1024
MAX_ERROR_CHARS = 2000  # keeps an error header far below MAX_HEADER_BYTES
MAX_CLIENT_ID_BYTES = 255
MAX_OWNER_CHARS = 64  # a Z85 public key is 40 characters
MAX_RANK = 16
MAX_AXIS = 2**40 - 1  # far above any real tensor; keeps prod(shape) * itemsize exact in a float64
MAX_TRACE = 256  # stages a message can pass through
MAX_SEQ = 2**63 - 1
MAX_ACK_IDS = 1024  # request ids in one ack message
MAX_NAME_CHARS = 255  # device names, incarnations, deployment ids in heartbeats

# Wire dtypes are always little-endian; every device we target (x86-64, aarch64, armv7) is too.
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in SUPPORTED_DTYPES}
_DATA_FIELDS = {"v", "kind", "client", "seq", "owner", "ls", "attempt", "tensors", "error", "error_stage", "trace"}
_HB_FIELDS = {"v", "kind", "inc", "role", "stage", "device", "client", "dep", "gen", "credit", "tx", "txs"}
_ACK_FIELDS = {"v", "kind", "recv", "done"}

RequestId = tuple[str, str, int]  # (owner, client, seq): unique per request across all clients


class ProtocolError(ValueError):
    """A message breaks the protocol. ``client``/``seq`` (and ``owner``) are set when the request
    id could be read, so the error can be answered; otherwise the message can only be counted."""

    def __init__(self, message: str, client: str | None = None, seq: int | None = None,
                 owner: str = "") -> None:
        super().__init__(message)
        self.client = client
        self.seq = seq
        self.owner = owner


@dataclass(frozen=True)
class TensorDesc:
    """One tensor frame: name (a stage input/output name, or "" for positional), dtype and shape of
    the array it carries, and the codec its frame is in ("raw", "fp16", "int8")."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: str = "raw"

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded array."""
        return math.prod(self.shape) * _WIRE_DTYPES[self.dtype].itemsize

    @property
    def wire_nbytes(self) -> int:
        """Bytes of the frame on the wire."""
        return codecs.wire_nbytes(self.shape, self.dtype, self.codec)


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
    client: str  # the submitting client's session id (any string; not used for routing)
    seq: int  # the client's sequence number
    tensors: tuple[TensorDesc, ...] = ()
    error: str | None = None  # set iff kind == "error"
    error_stage: int | None = None  # index of the stage that produced the error
    trace: tuple[StageRecord, ...] = ()
    owner: str = ""  # the client's authenticated public key (Z85), stamped by the entry; "" if insecure
    ls: int = 0  # link sequence number on the hop it travels (loss detection), set by the sender
    attempt: int = 0  # the client's end-to-end attempt: a higher one is computed again even where done
    version: int = PROTOCOL_VERSION

    @property
    def request_id(self) -> RequestId:
        return (self.owner, self.client, self.seq)

    @property
    def label(self) -> str:
        """For logs: client/seq (the owner key is long and the same for a client's requests)."""
        return f"{self.client}/{self.seq}"


@dataclass(frozen=True)
class Heartbeat:
    """Sent every heartbeat interval on every hop, both ways. ``credit`` (messages, bytes) is what
    the receiving side of a hop lets this peer have in flight; a sender sends nothing before it has
    heard one. ``tx`` is the highest link sequence number the sender has sent to this peer; ``txs``
    echoes the highest ``tx`` this side has seen from the peer, after reading every message sent
    before it: a message the peer sent with ``ls <= txs`` and never got ``recv`` for was lost."""

    inc: str  # incarnation: random per process start; a new value means the peer restarted
    role: str  # "stage" or "client"
    stage: int | None = None
    device: str = ""
    client: str = ""  # a client's session id (the header's ``client``): the exit routes results by it
    dep: str = ""  # deployment id
    gen: int = 0  # deployment generation
    credit: tuple[int, int] | None = None
    tx: int = 0
    txs: int = 0


@dataclass(frozen=True)
class Ack:
    """Custody acknowledgements, sent against the data direction. ``recv``: these requests arrived
    here. ``done``: this side's output for them is in its downstream's custody (for the last stage:
    the client has the result), so the sender may forget them and count their credit free."""

    recv: tuple[RequestId, ...] = ()
    done: tuple[RequestId, ...] = ()


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


def describe(arrays: Mapping[str, np.ndarray], codec: str = "raw") -> tuple[TensorDesc, ...]:
    """Tensor descriptors for named arrays. ``codec`` is what the sender would like; each tensor
    travels in it only where it applies (float32, finite values; codecs.choose), else raw."""
    return tuple(TensorDesc(name, _dtype_name(arr.dtype), tuple(int(d) for d in arr.shape),
                            codecs.choose(arr, codec))
                 for name, arr in arrays.items())


def data_header(client: str, seq: int, arrays: Mapping[str, np.ndarray],
                trace: tuple[StageRecord, ...] = (), codec: str = "raw", owner: str = "") -> Header:
    return Header("data", client, seq, describe(arrays, codec), trace=trace, owner=owner)


def error_header(client: str, seq: int, stage: int, message: str,
                 trace: tuple[StageRecord, ...] = (), owner: str = "") -> Header:
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    return Header("error", client, seq, (), message, stage, trace, owner=owner)


def with_record(header: Header, record: StageRecord) -> Header:
    return replace(header, trace=(*header.trace, record))


def encode_tensors(header: Header, arrays: Sequence[np.ndarray]) -> list[Any]:
    """The tensor frames of a message, each in its descriptor's codec. Raw C-contiguous
    little-endian arrays are passed through untouched (ZeroMQ reads their memory); the caller must
    not modify them until they have been sent."""
    if len(arrays) != len(header.tensors):
        raise ProtocolError(f"header describes {len(header.tensors)} tensors but {len(arrays)} arrays given",
                            header.client, header.seq, header.owner)
    frames: list[Any] = []
    for desc, arr in zip(header.tensors, arrays, strict=True):
        wire = _WIRE_DTYPES.get(desc.dtype)
        if wire is None or arr.dtype.name != desc.dtype or tuple(arr.shape) != desc.shape:
            raise ProtocolError(f"tensor {desc.name!r}: array is {arr.dtype}{list(arr.shape)}, "
                                f"header says {desc.dtype}{list(desc.shape)}", header.client, header.seq,
                                header.owner)
        if desc.codec != "raw":
            frames.append(codecs.encode(arr, desc.codec))
        elif arr.dtype != wire or not arr.flags.c_contiguous:
            frames.append(np.ascontiguousarray(arr, dtype=wire))  # the only copy a raw tensor gets
        else:
            frames.append(arr)
    return frames


def pack_header(header: Header) -> bytes:
    packed = msgpack.packb(_header_to_raw(header), use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(packed)} bytes, limit {MAX_HEADER_BYTES}",
                            header.client, header.seq, header.owner)
    return packed


def encode(header: Header, arrays: Sequence[np.ndarray]) -> list[Any]:
    """Frames for ``send_multipart(frames, copy=False)``: the packed header, then each tensor frame."""
    tensors = encode_tensors(header, arrays)
    return [pack_header(header), *tensors]


def encode_heartbeat(hb: Heartbeat) -> bytes:
    raw = {"v": PROTOCOL_VERSION, "kind": "hb", "inc": hb.inc, "role": hb.role, "stage": hb.stage,
           "device": hb.device, "client": hb.client, "dep": hb.dep, "gen": hb.gen,
           "credit": list(hb.credit) if hb.credit is not None else None, "tx": hb.tx, "txs": hb.txs}
    return msgpack.packb(raw, use_bin_type=True)


def encode_ack(ack: Ack) -> bytes:
    raw = {"v": PROTOCOL_VERSION, "kind": "ack", "recv": [list(r) for r in ack.recv],
           "done": [list(r) for r in ack.done]}
    return msgpack.packb(raw, use_bin_type=True)


def ack_messages(recv: Sequence[RequestId], done: Sequence[RequestId]) -> list[bytes]:
    """``recv`` and ``done`` split into as few ack messages as MAX_ACK_IDS allows."""
    out = []
    recv, done = list(recv), list(done)
    while recv or done:
        r, recv = recv[:MAX_ACK_IDS], recv[MAX_ACK_IDS:]
        d, done = done[:MAX_ACK_IDS], done[MAX_ACK_IDS:]
        out.append(encode_ack(Ack(tuple(r), tuple(d))))
    return out


Message = tuple[Header, list[np.ndarray]] | Heartbeat | Ack


def parse(frames: Sequence[Any], limits: Limits) -> Message:
    """Any message of a hop: (Header, arrays) for data and error messages, or a Heartbeat or Ack.
    Raises ProtocolError (with the request id when the header named one)."""
    raw = _raw_header(frames, limits)
    kind = raw.get("kind")
    if kind in CONTROL_KINDS:
        if len(frames) != 1:
            raise ProtocolError(f"a {kind} message is one frame, got {len(frames)}")
        try:
            _check_version(raw.get("v"))
            return _heartbeat(raw) if kind == "hb" else _ack(raw)
        except ValueError as exc:
            raise ProtocolError(f"bad {kind} message: {exc}") from None
    return _data(frames, raw, limits)


def decode(frames: Sequence[Any], limits: Limits) -> tuple[Header, list[np.ndarray]]:
    """Parse and check a data or error message; return its header and its arrays (numpy views over
    the received frames for raw tensors, new float32 arrays for compressed ones).

    ``frames`` are zmq.Frame objects (from ``recv_multipart(copy=False)``) or bytes-like objects.
    Raises ProtocolError; its client/seq are set once the header has named the request."""
    raw = _raw_header(frames, limits)
    if raw.get("kind") in CONTROL_KINDS:
        raise ProtocolError(f"expected a data or error message, got {raw.get('kind')!r}")
    return _data(frames, raw, limits)


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


def _raw_header(frames: Sequence[Any], limits: Limits) -> dict[str, Any]:
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
    return raw


def _check_version(version: Any) -> None:
    # type() is int, not isinstance: True and 1.0 compare equal to 1 but are not a version number.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ValueError(f"protocol version {version!r} not supported (this agent speaks {PROTOCOL_VERSION})")


def _data(frames: Sequence[Any], raw: dict[str, Any], limits: Limits) -> tuple[Header, list[np.ndarray]]:
    client, seq, owner = _request_id(raw)
    try:
        _check_version(raw.get("v"))
        header = _header_from_raw(raw, client, seq, owner)
        if len(frames) > limits.max_frames:
            raise ValueError(f"message has more than {limits.max_frames} frames (1 header + "
                             f"{limits.max_tensors} tensors at most)")
        if len(frames) != 1 + len(header.tensors):
            raise ValueError(f"header describes {len(header.tensors)} tensors but the message has "
                             f"{len(frames) - 1} tensor frames")
        if header.kind == "data" and limits.inputs is not None:
            check_against_inputs(header.tensors, limits.inputs, limits.max_batch)
        arrays = [_array(frame, desc, limits) for frame, desc in zip(frames[1:], header.tensors, strict=True)]
    except ValueError as exc:
        raise ProtocolError(str(exc), client, seq, owner or "") from None
    return header, arrays


def _array(frame: Any, desc: TensorDesc, limits: Limits) -> np.ndarray:
    expected = desc.nbytes
    if limits.max_tensor_bytes is not None and expected > limits.max_tensor_bytes:
        raise ValueError(f"tensor {desc.name!r} {desc.dtype}{list(desc.shape)} is {expected} bytes, "
                         f"limit {limits.max_tensor_bytes}")
    buf = _buffer(frame)
    wire = desc.wire_nbytes
    if buf.nbytes != wire:
        codec = "" if desc.codec == "raw" else f" in {desc.codec}"
        raise ValueError(f"tensor {desc.name!r} frame is {buf.nbytes} bytes, "
                         f"{desc.dtype}{list(desc.shape)}{codec} needs {wire}")
    if desc.codec == "raw":
        return np.frombuffer(buf, dtype=_WIRE_DTYPES[desc.dtype]).reshape(desc.shape)
    return codecs.decode(buf, desc.codec, desc.dtype, desc.shape)


def _header_to_raw(header: Header) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "v": header.version,
        "kind": header.kind,
        "client": header.client,
        "seq": header.seq,
        "tensors": [[t.name, t.dtype, list(t.shape)] + ([t.codec] if t.codec != "raw" else [])
                    for t in header.tensors],
        "trace": [[r.stage, r.recv, r.compute_start, r.compute_end, r.send] for r in header.trace],
    }
    if header.kind == "error":
        raw["error"], raw["error_stage"] = header.error, header.error_stage
    if header.owner:
        raw["owner"] = header.owner
    if header.ls:
        raw["ls"] = header.ls
    if header.attempt:
        raw["attempt"] = header.attempt
    return raw


def _request_id(raw: dict[str, Any]) -> tuple[str | None, int | None, str | None]:
    """The request id if it is well formed, so even a broken header can be answered."""
    client, seq, owner = raw.get("client"), raw.get("seq"), raw.get("owner", "")
    if not (isinstance(client, str) and 0 < len(client.encode()) <= MAX_CLIENT_ID_BYTES):
        return None, None, None
    if not (type(seq) is int and 0 <= seq <= MAX_SEQ):
        return None, None, None
    if not (isinstance(owner, str) and len(owner) <= MAX_OWNER_CHARS):
        return None, None, None
    return client, seq, owner


def _header_from_raw(raw: dict[str, Any], client: str | None, seq: int | None, owner: str | None) -> Header:
    if client is None or seq is None or owner is None:
        raise ValueError("header has no valid request id (client: non-empty str <= 255 bytes, seq: int >= 0, "
                         f"owner: str <= {MAX_OWNER_CHARS} chars)")
    unknown = set(raw) - _DATA_FIELDS
    if unknown:
        raise ValueError(f"header has unknown fields {sorted(unknown)}")
    kind = raw.get("kind")
    if kind not in DATA_KINDS:
        raise ValueError(f"header kind {kind!r} is not one of {KINDS}")
    ls, attempt = raw.get("ls", 0), raw.get("attempt", 0)
    if not (type(ls) is int and 0 <= ls <= MAX_SEQ):
        raise ValueError(f"ls {ls!r} is not a link sequence number")
    if not (type(attempt) is int and 0 <= attempt < 2**31):
        raise ValueError(f"attempt {attempt!r} is not an attempt number")
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
    return Header(kind, client, seq, tensors, error, error_stage, trace, owner, ls, attempt, PROTOCOL_VERSION)


def _list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"header field {field!r} must be a list, got {type(value).__name__}")
    return value


def _tensor_desc(raw: Any) -> TensorDesc:
    if not (isinstance(raw, list) and len(raw) in (3, 4)):
        raise ValueError(f"tensor descriptor {raw!r} is not [name, dtype, shape] or [name, dtype, shape, codec]")
    name, dtype, shape = raw[:3]
    codec = raw[3] if len(raw) == 4 else "raw"
    if not isinstance(name, str):
        raise ValueError(f"tensor name {name!r} is not a string")
    if dtype not in _WIRE_DTYPES:
        raise ValueError(f"tensor {name!r}: dtype {dtype!r} not supported "
                         f"(supported: {', '.join(SUPPORTED_DTYPES)})")
    if not isinstance(shape, list):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list")
    if len(shape) > MAX_RANK:
        raise ValueError(f"tensor {name!r}: shape has rank {len(shape)}, at most {MAX_RANK}")
    for axis, size in enumerate(shape):
        if type(size) is not int or not 0 <= size <= MAX_AXIS:
            raise ValueError(f"tensor {name!r}: axis {axis} is {size!r}; sizes are integers 0..2^40-1")
    if codec not in codecs.CODECS:
        raise ValueError(f"tensor {name!r}: codec {codec!r} not supported (supported: {', '.join(codecs.CODECS)})")
    if codec != "raw" and not codecs.compressible(dtype):
        raise ValueError(f"tensor {name!r}: codec {codec} applies to float32 tensors only, not {dtype}")
    return TensorDesc(name, dtype, tuple(shape), codec)


def _record(raw: Any) -> StageRecord:
    if not (isinstance(raw, list) and len(raw) == 5 and type(raw[0]) is int
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw[1:])):
        raise ValueError(f"trace record {raw!r} is not [stage, recv, compute_start, compute_end, send]")
    return StageRecord(raw[0], float(raw[1]), float(raw[2]), float(raw[3]), float(raw[4]))


def _short_str(value: Any, field: str, limit: int = MAX_NAME_CHARS) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{field!r} must be a string of at most {limit} characters")
    return value


def _count(value: Any, field: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise ValueError(f"{field!r} must be an integer >= 0")
    return value


def _heartbeat(raw: dict[str, Any]) -> Heartbeat:
    unknown = set(raw) - _HB_FIELDS
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    inc = _short_str(raw.get("inc"), "inc")
    if not inc:
        raise ValueError("'inc' must not be empty")
    role = raw.get("role")
    if role not in ("stage", "client"):
        raise ValueError(f"'role' must be 'stage' or 'client', got {role!r}")
    stage = raw.get("stage")
    if stage is not None and (type(stage) is not int or not 0 <= stage < 2**31):
        raise ValueError(f"'stage' {stage!r} is not a stage index")
    credit = raw.get("credit")
    if credit is not None:
        if not (isinstance(credit, list) and len(credit) == 2):
            raise ValueError("'credit' must be [messages, bytes]")
        credit = (_count(credit[0], "credit"), _count(credit[1], "credit"))
    client = raw.get("client", "")
    if not (isinstance(client, str) and len(client.encode()) <= MAX_CLIENT_ID_BYTES):
        raise ValueError("'client' must be a string of at most 255 bytes")
    return Heartbeat(inc, role, stage, _short_str(raw.get("device", ""), "device"), client,
                     _short_str(raw.get("dep", ""), "dep"), _count(raw.get("gen", 0), "gen"), credit,
                     _count(raw.get("tx", 0), "tx"), _count(raw.get("txs", 0), "txs"))


def _ack(raw: dict[str, Any]) -> Ack:
    unknown = set(raw) - _ACK_FIELDS
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    return Ack(_ids(raw.get("recv", []), "recv"), _ids(raw.get("done", []), "done"))


def _ids(value: Any, field: str) -> tuple[RequestId, ...]:
    if not isinstance(value, list) or len(value) > MAX_ACK_IDS:
        raise ValueError(f"{field!r} must be a list of at most {MAX_ACK_IDS} request ids")
    ids = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 3):
            raise ValueError(f"{field!r}: {item!r} is not [owner, client, seq]")
        client, seq, owner = _request_id({"owner": item[0], "client": item[1], "seq": item[2]})
        if client is None or seq is None or owner is None:
            raise ValueError(f"{field!r}: {item!r} is not a valid request id")
        ids.append((owner, client, seq))
    return tuple(ids)
