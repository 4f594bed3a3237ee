"""Wire protocol: round trips, zero-copy views, and every validation rule (in-process, no agents)."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import numpy as np
import pytest
import zmq
from edgepipe.agent.formats import codecs
from edgepipe.agent.formats.bundle import SUPPORTED_DTYPES, TensorSpec
from edgepipe.agent.formats.wire import (
    MAX_ERROR_CHARS,
    PROTOCOL_VERSION,
    Ack,
    Header,
    Heartbeat,
    Limits,
    ProtocolError,
    StageRecord,
    ack_messages,
    data_header,
    decode,
    encode,
    encode_ack,
    encode_heartbeat,
    error_header,
    parse,
    stage_limits,
)
from edgepipe.agent.transport import recv_frames
from hypothesis import given, settings
from hypothesis import strategies as st

SPECS = (TensorSpec("x", "float32", ("batch", 4, 3)), TensorSpec("ids", "int64", ("batch",)))
LIMITS = stage_limits(SPECS, max_batch=8)


def _arrays(batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.arange(batch * 12, dtype=np.float32).reshape(batch, 4, 3), "ids": np.arange(batch)}


def _raw(**overrides: object) -> dict:
    raw = {"v": PROTOCOL_VERSION, "kind": "data", "client": "c1", "seq": 5,
           "tensors": [["x", "float32", [2, 4, 3]], ["ids", "int64", [2]]], "error": None,
           "error_stage": None, "trace": []}
    raw.update(overrides)
    return raw


def _frames(raw: dict, arrays: dict[str, np.ndarray] | None = None) -> list:
    arrays = _arrays() if arrays is None else arrays
    return [msgpack.packb(raw), *[a.tobytes() for a in arrays.values()]]


def test_round_trip_keeps_header_and_values() -> None:
    arrays = _arrays(3)
    trace = (StageRecord(0, 1.0, 1.5, 2.5, 3.0),)
    header = data_header("client-a", 42, arrays, trace)
    got_header, got = decode([bytes(memoryview(f)) for f in encode(header, list(arrays.values()))], LIMITS)
    assert got_header == header
    assert got_header.trace[0].compute_s == 1.0 and got_header.trace[0].overhead_s == 1.0
    for want, have in zip(arrays.values(), got, strict=True):
        np.testing.assert_array_equal(want, have)
        assert have.dtype == want.dtype


def test_encode_passes_arrays_through_and_decode_views_zmq_frames() -> None:
    """No copy in Python on either side: encode hands over the array itself, decode returns a view
    of the received zmq.Frame's memory."""
    x = np.random.default_rng(0).random((8, 4, 3), dtype=np.float32)
    ids = np.arange(8)
    frames = encode(data_header("c", 1, {"x": x, "ids": ids}), [x, ids])
    assert frames[1] is x and frames[2] is ids
    ctx = zmq.Context()
    try:
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        a.bind("inproc://zero-copy")
        b.connect("inproc://zero-copy")
        big = np.ones((8, 4, 3000), np.float32)  # above pyzmq's 64 KiB copy threshold
        a.send_multipart(encode(data_header("c", 2, {"x": big}), [big]), copy=False)
        received = recv_frames(b, 4)
        _, (view,) = decode(received, Limits())
        assert np.shares_memory(view, np.frombuffer(received[1].buffer, np.uint8))
        np.testing.assert_array_equal(view, big)
        a.close(0)
        b.close(0)
    finally:
        ctx.term()


def test_encode_makes_strided_arrays_contiguous() -> None:
    x = np.arange(48, dtype=np.float32).reshape(4, 4, 3)[::2]
    frames = encode(data_header("c", 1, {"x": x}), [x])
    _, (got,) = decode([bytes(memoryview(f)) for f in frames], Limits())
    np.testing.assert_array_equal(got, x)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(SUPPORTED_DTYPES),
       shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
       seq=st.integers(0, 2**63 - 1), client=st.text(min_size=1, max_size=30))
def test_round_trip_any_supported_dtype_and_shape(dtype: str, shape: list[int], seq: int,
                                                  client: str) -> None:
    arr = (np.arange(int(np.prod(shape)), dtype=np.int64) % 7).astype(dtype).reshape(shape)
    header = data_header(client, seq, {"t": arr})
    got_header, (got,) = decode([bytes(memoryview(f)) for f in encode(header, [arr])], Limits())
    assert got_header == header
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)


def test_error_header_round_trips_and_is_truncated() -> None:
    header = error_header("c", 9, 2, "x" * (MAX_ERROR_CHARS * 2))
    got, arrays = decode(encode(header, []), Limits())
    assert got.kind == "error" and got.error_stage == 2 and arrays == []
    assert len(got.error) == MAX_ERROR_CHARS and got.error.endswith("...")


@pytest.mark.parametrize(("frames", "match"), [
    ([], "empty message"),
    ([b"\xc1garbage"], "not valid msgpack"),
    ([msgpack.packb([1, 2, 3])], "expected a map"),
    ([b"\x00" * (64 * 1024 + 1)], "header frame is 65537 bytes"),
    ([msgpack.packb(_raw(client=""))], "no valid request id"),
    ([msgpack.packb(_raw(seq=-1))], "no valid request id"),
    ([msgpack.packb(_raw(seq="5"))], "no valid request id"),
])
def test_unanswerable_messages_carry_no_request_id(frames: list, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        decode(frames, LIMITS)
    assert info.value.client is None and info.value.seq is None


@pytest.mark.parametrize(("raw", "arrays", "match"), [
    (_raw(v=99), None, "protocol version 99 not supported"),
    (_raw(kind="ping"), None, "kind 'ping'"),
    (_raw(extra=1), None, "unknown fields"),
    (_raw(tensors=[["x", "complex64", [2, 4, 3]], ["ids", "int64", [2]]]), None, "'complex64' not supported"),
    (_raw(tensors=[["x", "float32", [2, 4, -3]], ["ids", "int64", [2]]]), None, "axis 2 is -3; sizes are integers"),
    (_raw(tensors=[["x", "float32", [2, 4, 2**40]], ["ids", "int64", [2]]]), None, "axis 2 is 1099511627776"),
    (_raw(tensors=[["x", "float32", [2, 4, 3.0]], ["ids", "int64", [2]]]), None, "axis 2 is 3.0"),
    (_raw(tensors=[["x", "float32", [1] * 17], ["ids", "int64", [2]]]), None, "rank 17, at most 16"),
    (_raw(tensors=[["x", "float32", "2x4x3"], ["ids", "int64", [2]]]), None, "shape '2x4x3' is not a list"),
    (_raw(v=1.0), None, "protocol version 1.0 not supported"),
    (_raw(v=True), None, "protocol version True not supported"),
    (_raw(v=1), None, r"protocol version 1 not supported \(this agent speaks 2\)"),
    (_raw(tensors=[["x", "float32", [2, 4, 3], "zip"], ["ids", "int64", [2]]]), None, "codec 'zip' not supported"),
    (_raw(tensors=[["x", "float32", [2, 4, 3]], ["ids", "int64", [2], "fp16"]]), None,
     "codec fp16 applies to float32 tensors only, not int64"),
    (_raw(ls=-1), None, "ls -1 is not a link sequence number"),
    (_raw(attempt="1"), None, "attempt '1' is not an attempt number"),
    (_raw(tensors=[["x", "float32", [2, 4, 3]]]), {"x": _arrays()["x"]}, "stage takes 2 input tensors"),
    (_raw(tensors=[["x", "float64", [2, 4, 3]], ["ids", "int64", [2]]]), None, "float64, stage expects"),
    (_raw(tensors=[["x", "float32", [2, 4, 4]], ["ids", "int64", [2]]]), None, "axis 2 is 4, must be 3"),
    (_raw(tensors=[["x", "float32", [2, 12]], ["ids", "int64", [2]]]), None, "has rank 2"),
    (_raw(tensors=[["x", "float32", [9, 4, 3]], ["ids", "int64", [9]]]), _arrays(9), "batch 9 outside 1..8"),
    (_raw(tensors=[["x", "float32", [0, 4, 3]], ["ids", "int64", [0]]]), _arrays(0), "batch 0 outside"),
    (_raw(tensors=[["x", "float32", [2, 4, 3]], ["ids", "int64", [3]]]), None, "batch 3 differs"),
    (_raw(tensors=[["y", "float32", [2, 4, 3]], ["ids", "int64", [2]]]), None, "do not match stage inputs"),
    (_raw(kind="error"), None, "needs an error message and no tensors"),
    (_raw(error="oops"), None, "must not carry an error"),
    (_raw(trace=[[0, 1.0, 2.0]]), None, "trace record"),
    (_raw(tensors=[["x", "float32", [1, 4, 3]], ["ids", "int64", [1]]]), None, "frame is 96 bytes"),
])
def test_answerable_violations_name_the_request(raw: dict, arrays: dict | None, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        decode(_frames(raw, arrays), LIMITS)
    assert (info.value.client, info.value.seq) == ("c1", 5)


def test_frame_count_must_match_header_and_limit() -> None:
    frames = _frames(_raw())
    with pytest.raises(ProtocolError, match="describes 2 tensors but the message has 1"):
        decode(frames[:2], LIMITS)
    with pytest.raises(ProtocolError, match="more than 3 frames"):
        decode([*frames, b"x"], LIMITS)


def test_tensor_byte_limit_applies_before_any_view() -> None:
    limits = Limits(max_tensor_bytes=100)
    frames = encode(data_header("c1", 5, {"t": np.zeros(26, np.float32)}), [np.zeros(26, np.float32)])
    with pytest.raises(ProtocolError, match="is 104 bytes, limit 100"):
        decode(frames, limits)


def test_unnamed_tensors_bind_by_position() -> None:
    arrays = _arrays(2)
    header = Header("data", "c", 1, tuple(
        t.__class__("", t.dtype, t.shape) for t in data_header("c", 1, arrays).tensors))
    got, _ = decode(encode(header, list(arrays.values())), LIMITS)
    assert [t.name for t in got.tensors] == ["", ""]


def test_named_tensors_in_any_order() -> None:
    arrays = dict(reversed(list(_arrays(2).items())))
    got, values = decode(encode(data_header("c", 1, arrays), list(arrays.values())), LIMITS)
    assert [t.name for t in got.tensors] == ["ids", "x"]
    np.testing.assert_array_equal(values[0], np.arange(2))


def test_encode_rejects_arrays_that_disagree_with_header() -> None:
    header = data_header("c", 1, {"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(ProtocolError, match="header says float32"):
        encode(header, [np.zeros((2, 3), np.float64)])
    with pytest.raises(ProtocolError, match="not supported on the wire"):
        data_header("c", 1, {"x": np.zeros(2, np.complex64)})


def test_stage_limits_follow_the_manifest() -> None:
    limits = stage_limits(SPECS, max_batch=16)
    assert limits.max_tensor_bytes == 16 * 4 * 3 * 4 and limits.max_frames == 3
    with pytest.raises(ValueError, match="symbolic non-batch axis"):
        stage_limits((TensorSpec("x", "float32", ("batch", "seq")),), max_batch=4)
    symbolic = stage_limits((TensorSpec("x", "float32", ("batch", "seq")),), 4, max_tensor_bytes=10)
    assert symbolic.max_tensor_bytes == 10


def test_recv_frames_caps_frames_kept() -> None:
    ctx = zmq.Context()
    try:
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        a.bind("inproc://many")
        b.connect("inproc://many")
        a.send_multipart([b"h"] + [b"x"] * 1000)
        a.send_multipart([b"next"])
        assert len(recv_frames(b, max_frames=3)) == 4
        assert [f.bytes for f in recv_frames(b, max_frames=3)] == [b"next"]  # the rest was consumed
        a.close(0)
        b.close(0)
    finally:
        ctx.term()


def test_largest_axis_is_accepted() -> None:
    raw = _raw(tensors=[["x", "float32", [0, 4, 2**40 - 1]], ["ids", "int64", [0]]])
    got, _ = decode([msgpack.packb(raw), b"", b""], Limits())
    assert got.tensors[0].shape == (0, 4, 2**40 - 1)


def test_compressed_tensors_round_trip_through_their_codec() -> None:
    x = np.random.default_rng(1).standard_normal((3, 4, 64)).astype(np.float32)
    for codec in ("fp16", "int8"):
        header = data_header("c", 1, {"x": x}, codec=codec)
        assert header.tensors[0].codec == codec
        frames = encode(header, [x])
        assert memoryview(frames[1]).nbytes == header.tensors[0].wire_nbytes < x.nbytes
        got, (y,) = decode([bytes(memoryview(f)) for f in frames], Limits())
        assert got == header and y.dtype == np.float32
        np.testing.assert_array_equal(y, codecs.roundtrip(x, codec))
    ints = np.arange(6).reshape(2, 3)
    assert data_header("c", 1, {"i": ints}, codec="int8").tensors[0].codec == "raw"  # only float32 compresses
    nan = x.copy()
    nan[0, 0, 0] = np.nan
    assert data_header("c", 1, {"x": nan}, codec="fp16").tensors[0].codec == "raw"  # a scale cannot carry NaN


def test_heartbeats_and_acks_round_trip_and_are_checked() -> None:
    hb = Heartbeat("abc123", "stage", 2, "dev2", "", "dep", 3, (4, 2**26), 17, 9)
    assert parse([encode_heartbeat(hb)], Limits()) == hb
    ack = Ack((("K", "c", 1), ("", "c", 2)), (("K", "c", 1),))
    assert parse([encode_ack(ack)], Limits()) == ack
    for bad, match in [({"v": 2, "kind": "hb", "inc": "", "role": "stage"}, "'inc' must not be empty"),
                       ({"v": 2, "kind": "hb", "inc": "a", "role": "boss"}, "'role' must be"),
                       ({"v": 2, "kind": "hb", "inc": "a", "role": "stage", "credit": [1]}, "'credit'"),
                       ({"v": 2, "kind": "ack", "recv": [["K", "c"]]}, "is not \\[owner, client, seq\\]"),
                       ({"v": 2, "kind": "ack", "recv": [["K", "c", -1]]}, "not a valid request id"),
                       ({"v": 3, "kind": "ack"}, "protocol version 3"),
                       ({"v": 2, "kind": "hb", "inc": "a", "role": "stage", "x": 1}, "unknown fields")]:
        with pytest.raises(ProtocolError, match=match):
            parse([msgpack.packb(bad)], Limits())
    with pytest.raises(ProtocolError, match="one frame"):
        parse([encode_heartbeat(hb), b"extra"], Limits())
    with pytest.raises(ProtocolError, match="expected a data or error message"):
        decode([encode_heartbeat(hb)], Limits())
    ids = [("K", "c", s) for s in range(2500)]
    messages = ack_messages(ids, ids[:10])
    assert len(messages) == 3
    assert sum(len(parse([m], Limits()).recv) for m in messages) == 2500


def test_owner_and_link_sequence_travel_in_the_header_and_default_when_omitted() -> None:
    x = np.zeros((1, 4, 3), np.float32)
    header = replace(data_header("c", 5, {"x": x, "ids": np.arange(1)}), owner="KEY", ls=12, attempt=2)
    got, _ = decode(encode(header, [x, np.arange(1)]), LIMITS)
    assert (got.owner, got.ls, got.attempt, got.request_id) == ("KEY", 12, 2, ("KEY", "c", 5))
    minimal = msgpack.packb({"v": 2, "kind": "data", "client": "c", "seq": 5,
                             "tensors": [["x", "float32", [1, 4, 3]], ["ids", "int64", [1]]]})
    got, _ = decode([minimal, x.tobytes(), np.arange(1).tobytes()], LIMITS)
    assert (got.owner, got.ls, got.attempt, got.trace, got.error) == ("", 0, 0, (), None)
