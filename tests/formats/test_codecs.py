"""Activation codecs: exact sizes, bounded error, raw fallback, refusal of mismatched frames."""

from __future__ import annotations

import numpy as np
import pytest
from edgepipe.agent.formats import codecs


@pytest.mark.parametrize("shape", [(2, 197, 768), (2, 64, 14, 14), (3, 1000), (5,), (1, 3, 7)])
@pytest.mark.parametrize("codec", codecs.CODECS)
def test_roundtrip_size_and_error(shape: tuple[int, ...], codec: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 50, size=shape[-1:])).astype(np.float32)
    frame = codecs.encode(x, codecs.choose(x, codec))
    assert frame.nbytes == codecs.wire_nbytes(x.shape, "float32", codec)
    y = codecs.decode(frame, codec, "float32", x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape
    if codec == "raw":
        assert np.array_equal(x, y)
    elif codec == "fp16":
        assert np.allclose(x, y, rtol=1e-3, atol=1e-4)
        assert frame.nbytes == x.nbytes // 2
    else:
        rows, width = codecs.row_split(x.shape)
        step = np.abs(x.reshape(rows, width)).max(axis=1, keepdims=True) / 127
        assert (np.abs((x - y).reshape(rows, width)) <= step / 2 + 1e-6).all()  # half a step of its row
        assert frame.nbytes <= x.nbytes // 4 + 4 * rows


def test_int8_rows_keep_small_rows_exact_in_scale() -> None:
    # one huge token must not wipe out the resolution of the others
    x = np.ones((1, 4, 128), dtype=np.float32) * 0.01
    x[0, 0] = 1000.0
    y = codecs.roundtrip(x, "int8")
    assert np.allclose(y[0, 1:], 0.01, rtol=1e-2)


def test_non_finite_and_non_float_travel_raw() -> None:
    x = np.ones((2, 128), dtype=np.float32)
    x[1, 3] = np.inf
    assert codecs.choose(x, "int8") == "raw"
    assert codecs.choose(np.ones((2, 3), dtype=np.int64), "fp16") == "raw"
    assert np.array_equal(codecs.roundtrip(x, "fp16"), x)


def test_bad_frames_and_codecs_refused() -> None:
    x = np.ones((2, 128), dtype=np.float32)
    frame = codecs.encode(x, "int8")
    with pytest.raises(codecs.CodecError, match="must be"):
        codecs.decode(frame[:-1], "int8", "float32", x.shape)
    with pytest.raises(codecs.CodecError, match="unknown codec"):
        codecs.choose(x, "zip")
    with pytest.raises(codecs.CodecError, match="float32 tensors only"):
        codecs.wire_nbytes((2,), "int64", "fp16")
