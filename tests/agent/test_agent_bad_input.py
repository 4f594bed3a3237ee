"""Every class of bad input gets an error answer for its request id (or, without a readable id, a
log line), and the agents keep serving good requests, including ones in flight at the same time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import zmq
from agent_testlib import (
    POISON,
    F,
    decode_reply,
    raw_header_frames,
    toy_frames,
    toy_input,
    toy_reference,
    wait_for,
)
from edgepipe.agent.client import RemoteError, RequestTimeout
from edgepipe.agent.formats.wire import PROTOCOL_VERSION
from edgepipe.agent.local import LocalPipeline
from edgepipe.agent.transport import INSECURE, connect_dealer, connect_push


def _header(client: str, **overrides: object) -> dict:
    raw = {"v": PROTOCOL_VERSION, "kind": "data", "client": client, "seq": 7,
           "tensors": [["x", "float32", [2, F]]], "error": None, "error_stage": None, "trace": []}
    raw.update(overrides)
    return raw


X2 = toy_input(2, 0)


def _with(arrays: list, **overrides: object) -> Callable[[str], list]:
    return lambda client: raw_header_frames(_header(client, **overrides), arrays)


def _poisoned(client: str) -> list:
    x = X2.copy()
    x[0, 0] = POISON
    return toy_frames(client, 7, x)


# name -> (frames builder taking the client id, stage that refuses it, expected message fragment)
BAD_REQUESTS: dict[str, tuple[Callable[[str], list], int, str]] = {
    "wrong_version": (_with([X2], v=2), 0, "protocol version 2"),
    "unknown_kind": (_with([X2], kind="ping"), 0, "kind 'ping'"),
    "wrong_dtype": (_with([X2.astype(np.float64)], tensors=[["x", "float64", [2, F]]]), 0,
                    "dtype float64, stage expects float32"),
    "wrong_shape": (_with([X2], tensors=[["x", "float32", [4, 8]]]), 0, "axis 1 is 8, must be 16"),
    "wrong_rank": (_with([X2], tensors=[["x", "float32", [32]]]), 0, "rank 1"),
    "wrong_name": (_with([X2], tensors=[["pixels", "float32", [2, F]]]), 0, "do not match stage inputs"),
    "batch_too_large": (_with([toy_input(9, 1)], tensors=[["x", "float32", [9, F]]]), 0,
                        "batch 9 outside 1..8"),
    "frame_shorter_than_shape": (_with([X2[:1]]), 0, "frame is 64 bytes, float32[2, 16] needs 128"),
    "missing_frame": (_with([]), 0, "has 0 tensor frames"),
    "too_many_frames": (_with([X2] * 40), 0, "more than 2 frames"),
    "unsupported_dtype": (_with([X2], tensors=[["x", "complex64", [2, F]]]), 0, "'complex64' not supported"),
    "onnx_runtime_failure": (_poisoned, 1, "ONNX Runtime failed"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_answered_with_its_id_and_the_stage_that_refused_it(
        case: str, raw_exchange: Callable, toy_pipeline: LocalPipeline) -> None:
    build, stage, fragment = BAD_REQUESTS[case]
    client = f"bad-{case}"
    reply = raw_exchange(build(client), client)
    assert reply is not None, f"no answer to {case}"
    header, arrays = decode_reply(reply)
    assert (header.kind, header.client, header.seq) == ("error", client, 7)
    assert header.error_stage == stage and arrays == []
    assert fragment in header.error, header.error
    assert [r.stage for r in header.trace] == [0, 1, 2]  # passed on, without compute, to the exit
    with toy_pipeline.client() as good:  # the pipeline still serves
        out = good.run({"x": X2})
    np.testing.assert_allclose(out["out"], toy_reference(X2)["out"], atol=1e-5)


def test_onnx_runtime_error_reaches_the_client_as_remote_error(toy_pipeline: LocalPipeline) -> None:
    poison = toy_input(3, 5)
    poison[1, 0] = POISON
    with toy_pipeline.client() as client:
        with pytest.raises(RemoteError, match=r"failed at stage 1: ONNX Runtime failed: .*indices") as info:
            client.run(poison)
        assert info.value.stage == 1 and info.value.client == client.client_id
        outcomes = list(client.map([toy_input(2, 1), poison, toy_input(2, 2)], errors="return"))
    assert isinstance(outcomes[1], RemoteError)
    np.testing.assert_allclose(outcomes[2]["out"], toy_reference(toy_input(2, 2))["out"], atol=1e-5)


@pytest.mark.parametrize("frames", [[b"\xc1not msgpack"], [msgpack.packb({"v": 1, "kind": "data"})],
                                    [msgpack.packb("a string")], [b"x" * (70 * 1024)]],
                         ids=["garbage", "no_request_id", "not_a_map", "header_too_large"])
def test_message_without_request_id_is_logged_and_counted(frames: list, raw_exchange: Callable,
                                                          toy_pipeline: LocalPipeline) -> None:
    before = toy_pipeline.log_text(0).count("dropped message with no request id")
    assert raw_exchange(frames, "nobody", timeout_s=0.5) is None  # nobody to answer
    assert wait_for(lambda: toy_pipeline.log_text(0).count("dropped message with no request id") > before)
    line = [ln for ln in toy_pipeline.log_text(0).splitlines() if "no request id" in ln][-1]
    assert "WARNING" in line
    with toy_pipeline.client() as good:
        good.run(X2)


def test_frame_above_maxmsgsize_is_cut_off_and_the_agent_keeps_serving(toy_pipeline: LocalPipeline) -> None:
    """A frame beyond ZMQ_MAXMSGSIZE (2 x the largest legal tensor + 64 KiB) never reaches Python:
    libzmq drops the connection. The client gets a timeout, not a silent loss, and reconnects."""
    huge = toy_input(4000, 0)  # 256 KB for an agent whose largest legal tensor is 8 x 64 B
    with toy_pipeline.client(timeout_s=1.0, retries=0) as client:
        with pytest.raises(RequestTimeout):
            client.run(huge)
        x = toy_input(8, 1)
        deadline = time.monotonic() + 10
        while True:  # the client's PUSH reconnects on its own
            try:
                out = client.run(x)
                break
            except RequestTimeout:
                assert time.monotonic() < deadline
        np.testing.assert_allclose(out["out"], toy_reference(x)["out"], atol=1e-5)


def test_result_for_an_absent_client_is_held_then_dropped_with_a_log(toy_pipeline: LocalPipeline) -> None:
    ctx = zmq.Context()
    push = connect_push(ctx, toy_pipeline.entry, auth=INSECURE)
    try:
        push.send_multipart(toy_frames("ghost", 3, X2), copy=False)
        assert wait_for(lambda: "undeliverable ghost/3" in toy_pipeline.log_text(2))
    finally:
        push.close(0)
        ctx.term()
    with toy_pipeline.client() as good:
        good.run(X2)


def test_result_is_held_for_a_client_that_connects_late(toy_pipeline: LocalPipeline) -> None:
    ctx = zmq.Context()
    push = connect_push(ctx, toy_pipeline.entry, auth=INSECURE)
    try:
        push.send_multipart(toy_frames("latecomer", 11, X2), copy=False)
        time.sleep(0.3)  # the result reaches the exit before the client's results socket exists
        dealer = connect_dealer(ctx, toy_pipeline.exit, auth=INSECURE, routing_id=b"latecomer")
        assert dealer.poll(5000), "held result never delivered"
        header, (out, _label) = decode_reply(dealer.recv_multipart(copy=False))
        assert (header.client, header.seq) == ("latecomer", 11)
        np.testing.assert_allclose(out, toy_reference(X2)["out"], atol=1e-5)
        dealer.close(0)
    finally:
        push.close(0)
        ctx.term()


def test_bad_input_storm_while_good_requests_are_in_flight(raw_exchange: Callable,
                                                          toy_pipeline: LocalPipeline) -> None:
    """All bad classes fired from another thread while a client streams 200 good requests."""
    inputs = [toy_input(1 + i % 8, 1000 + i) for i in range(200)]
    answers: dict[str, object] = {}

    def storm() -> None:
        for case, (build, _, _) in sorted(BAD_REQUESTS.items()):
            answers[case] = raw_exchange(build(f"storm-{case}"), f"storm-{case}")

    attacker = threading.Thread(target=storm)
    with toy_pipeline.client(window=16) as client:
        attacker.start()
        outputs = list(client.map(inputs))
    attacker.join(60)
    for x, out in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(out["out"], toy_reference(x)["out"], atol=1e-5)
    assert sorted(answers) == sorted(BAD_REQUESTS)
    for case, reply in answers.items():
        assert reply is not None and decode_reply(reply)[0].kind == "error", case
