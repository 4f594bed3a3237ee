"""Activation codecs: how a float tensor may travel between stages in fewer bytes.

- ``raw``: the array's own bytes (every dtype);
- ``fp16``: float32 sent as IEEE half precision, 2 bytes a value;
- ``int8``: symmetric 8-bit with one float32 scale per row, about 1 byte a value. Rows are the
  leading axes while the trailing block still holds at least ``MIN_ROW`` values: a token of a
  transformer's (batch, tokens, width) activation, a channel of a CNN's (batch, C, H, W). The
  frame is the float32 scales, then the int8 values. Each row's scale is its largest magnitude
  / 127, so a value's error is at most half a step of its own row.

The sender picks a codec per tensor and names it in the tensor's descriptor (formats/wire.py); the
receiver decodes whatever it is told. Only float32 tensors are compressed; a tensor holding a NaN
or an infinity is always sent ``raw``, since a scale cannot represent it. The compiler measures each
codec's effect on the model's outputs with ``roundtrip`` (the exact values a receiver would see).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CODECS = ("raw", "fp16", "int8")
LOSSY = ("fp16", "int8")
MIN_ROW = 64
_F32 = np.dtype("<f4")


class CodecError(ValueError):
    """A frame does not match its codec, dtype and shape."""


def compressible(dtype: str) -> bool:
    return dtype == "float32"


def row_split(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, values per row) of the int8 codec for a tensor of ``shape``."""
    dims = [int(d) for d in shape]
    for k in range(len(dims) - 1, 0, -1):
        if math.prod(dims[k:]) >= MIN_ROW:
            return math.prod(dims[:k]), math.prod(dims[k:])
    return 1, math.prod(dims)  # a small tensor (or a scalar) is one row


def wire_nbytes(shape: Sequence[int], dtype: str, codec: str) -> int:
    """Bytes of the frame that carries a tensor of ``shape`` and ``dtype`` under ``codec``."""
    count = math.prod(int(d) for d in shape)
    if codec == "raw":
        return count * np.dtype(dtype).itemsize
    _check_lossy(codec, dtype)
    if codec == "fp16":
        return 2 * count
    rows, _ = row_split(shape)
    return 4 * rows + count if count else 0


def choose(arr: np.ndarray, codec: str) -> str:
    """The codec a tensor actually travels in: ``codec`` if it applies, else ``raw``."""
    if codec == "raw" or arr.dtype != np.float32 or arr.size == 0:
        return "raw"
    if codec not in LOSSY:
        raise CodecError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    return codec if bool(np.isfinite(arr).all()) else "raw"


def encode(arr: np.ndarray, codec: str) -> np.ndarray:
    """The frame (a C-contiguous array whose bytes are sent) for ``arr`` in ``codec``, which must be
    what ``choose`` returned for it."""
    if codec == "raw":
        return np.ascontiguousarray(arr)
    _check_lossy(codec, arr.dtype.name)
    if codec == "fp16":
        return np.ascontiguousarray(arr, dtype="<f2")
    rows, width = row_split(arr.shape)
    flat = np.ascontiguousarray(arr, dtype=_F32).reshape(rows, width)
    scale = np.abs(flat).max(axis=1) / 127.0
    scale[scale == 0] = 1.0  # an all-zero row: any scale decodes it exactly
    frame = np.empty(4 * rows + rows * width, dtype=np.uint8)
    frame[: 4 * rows].view(_F32)[:] = scale
    quantized = frame[4 * rows:].view(np.int8).reshape(rows, width)
    quantized[:] = np.clip(np.rint(flat / scale[:, None]), -127, 127)
    return frame


def decode(buffer: memoryview | bytes | np.ndarray, codec: str, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """The float32 array a frame carries. ``raw`` frames become a view (no copy); lossy ones a new
    array. Raises CodecError if the frame's length does not match."""
    shape = tuple(int(d) for d in shape)
    expected = wire_nbytes(shape, dtype, codec)
    data = np.frombuffer(buffer, dtype=np.uint8)
    if data.nbytes != expected:
        raise CodecError(f"{codec} frame of {dtype}{list(shape)} must be {expected} bytes, got {data.nbytes}")
    if codec == "raw":
        return data.view(np.dtype(dtype).newbyteorder("<")).reshape(shape)
    if codec == "fp16":
        return data.view("<f2").astype(np.float32).reshape(shape)
    rows, width = row_split(shape)
    scale = data[: 4 * rows].view(_F32)
    values = data[4 * rows:].view(np.int8).reshape(rows, width)
    return (values.astype(np.float32) * scale[:, None]).reshape(shape)


def roundtrip(arr: np.ndarray, codec: str) -> np.ndarray:
    """What the receiver gets when ``arr`` is sent in ``codec`` (``arr`` itself for raw)."""
    used = choose(arr, codec)
    if used == "raw":
        return arr
    return decode(encode(arr, used), used, "float32", arr.shape)


def _check_lossy(codec: str, dtype: str) -> None:
    if codec not in LOSSY:
        raise CodecError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    if not compressible(dtype):
        raise CodecError(f"codec {codec} applies to float32 tensors only, not {dtype}")
