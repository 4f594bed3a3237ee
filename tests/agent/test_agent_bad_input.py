"""Every class of bad input gets an error answer for its request id (or, without a readable id, is
counted), and the agents keep serving good requests, including ones in flight at the same time.

The entry answers a refused request straight back on the client's own connection (error_stage 0,
no trace): nothing bad travels down the pipeline. A request that only a later stage can find
wrong (here: ONNX Runtime failing in stage 1) reaches the client from the exit like a result."""

from __future__ import annotations

import threading
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
from agent_testlib import (
    POISON,
    F,
    RawPeer,
    toy_input,
    toy_reference,
    v2_frames,
    wait_for,
)
from edgepipe.agent.client import RemoteError, RequestTimeout
from edgepipe.agent.local import LocalPipeline

X2 = toy_input(2, 0)


def _with(arrays: list, **overrides: object) -> Callable[[str], list]:
    def build(client: str) -> list:
        frames = v2_frames(client, 7, X2, **overrides)
        return [frames[0], *arrays]
    return build


def _poisoned(client: str) -> list:
    x = X2.copy()
    x[0, 0] = POISON
    return v2_frames(client, 7, x)


# name -> (frames builder taking the client id, stage that refuses it, expected message fragment)
BAD_REQUESTS: dict[str, tuple[Callable[[str], list], int, str]] = {
    "wrong_version": (_with([X2], v=1), 0, "protocol version 1 not supported"),
    "version_as_float": (_with([X2], v=2.0), 0, "protocol version 2.0 not supported"),
    "version_as_bool": (_with([X2], v=True), 0, "protocol version True not supported"),
    "unknown_kind": (_with([X2], kind="ping"), 0, "kind 'ping'"),
    "wrong_dtype": (_with([X2.astype(np.float64)], tensors=[["x", "float64", [2, F]]]), 0,
                    "dtype float64, stage expects float32"),
    "wrong_shape": (_with([X2], tensors=[["x", "float32", [4, 8]]]), 0, "axis 1 is 8, must be 16"),
    "negative_axis": (_with([X2], tensors=[["x", "float32", [2, -16]]]), 0, "axis 1 is -16"),
    "huge_axis": (_with([X2], tensors=[["x", "float32", [2, 2**40]]]), 0, "axis 1 is 1099511627776"),
    "wrong_rank": (_with([X2], tensors=[["x", "float32", [32]]]), 0, "rank 1"),
    "wrong_name": (_with([X2], tensors=[["pixels", "float32", [2, F]]]), 0, "do not match stage inputs"),
    "batch_too_large": (_with([toy_input(9, 1)], tensors=[["x", "float32", [9, F]]]), 0,
                        "batch 9 outside 1..8"),
    "frame_shorter_than_shape": (_with([X2[:1]]), 0, "frame is 64 bytes, float32[2, 16] needs 128"),
    "missing_frame": (_with([]), 0, "has 0 tensor frames"),
    "too_many_frames": (_with([X2] * 40), 0, "more than 2 frames"),
    "unsupported_dtype": (_with([X2], tensors=[["x", "complex64", [2, F]]]), 0, "'complex64' not supported"),
    "unknown_codec": (_with([X2], tensors=[["x", "float32", [2, F], "zip"]]), 0, "codec 'zip' not supported"),
    "int8_frame_of_wrong_size": (_with([X2], tensors=[["x", "float32", [2, F], "int8"]]), 0,
                                 "float32[2, 16] in int8 needs 36"),
    "forged_error": (_with([], kind="error", tensors=[], error="stage 5 says no", error_stage=5), 0,
                     "clients may not send error messages"),
    "forged_trace": (_with([X2], trace=[[1, 1.0, 2.0, 3.0, 4.0]]), 0, "clients may not send trace records"),
    "forged_owner": (_with([X2], owner="somebody-else"), 0, "clients may not set 'owner'"),
    "onnx_runtime_failure": (_poisoned, 1, "ONNX Runtime failed"),
}


def _refusal(raw_peers: Callable[..., RawPeer], case: str) -> tuple:
    build, stage, fragment = BAD_REQUESTS[case]
    client = f"bad-{case}"
    entry, exit_ = raw_peers("entry", client), raw_peers("exit", client)
    assert entry.hello() and exit_.hello()
    entry.send(build(client))
    source = entry if stage == 0 else exit_
    replies = source.data(10.0)
    return replies, stage, fragment, client, entry


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_answered_with_its_id_and_the_stage_that_refused_it(
        case: str, raw_peers: Callable[..., RawPeer], toy_pipeline: LocalPipeline) -> None:
    replies, stage, fragment, client, _ = _refusal(raw_peers, case)
    assert replies, f"no answer to {case}"
    header, arrays = replies[0]
    assert (header.kind, header.client, header.seq) == ("error", client, 7)
    assert header.owner == toy_pipeline.client_keypair.public_text  # stamped by the entry, not by us
    assert header.error_stage == stage and arrays == []
    assert fragment in header.error, header.error
    if stage == 0:
        assert header.trace == ()  # refused at the door: it never went down the pipeline
    else:
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


def test_bad_input_through_the_client_is_a_remote_error_from_stage_0(toy_pipeline: LocalPipeline) -> None:
    with toy_pipeline.client() as client, pytest.raises(RemoteError, match=r"stage 0: bad request: .*batch 9"):
        client.run(toy_input(9, 0))


@pytest.mark.parametrize("frames", [[b"\xc1not msgpack"], [msgpack.packb({"v": 2, "kind": "data"})],
                                    [msgpack.packb("a string")], [b"x" * (70 * 1024)],
                                    [msgpack.packb({"v": 2, "kind": "hb", "inc": ""})],
                                    [msgpack.packb({"v": 2, "kind": "ack", "recv": [[1, 2]]})]],
                         ids=["garbage", "no_request_id", "not_a_map", "header_too_large", "bad_heartbeat",
                              "ack_against_the_data_direction"])
def test_message_without_request_id_is_counted_and_not_answered(frames: list, raw_peers: Callable[..., RawPeer],
                                                                toy_pipeline: LocalPipeline) -> None:
    before = toy_pipeline.status(0)["dropped"]
    peer = raw_peers("entry", "nobody")
    assert peer.hello()
    peer.send(frames)
    assert peer.data(1.0) == []  # nobody to answer
    assert wait_for(lambda: toy_pipeline.status(0)["dropped"] > before)
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
        out = client.run(x)  # the client's socket reconnects on its own
        np.testing.assert_allclose(out["out"], toy_reference(x)["out"], atol=1e-5)


def test_result_for_an_absent_client_is_held_then_dropped_with_a_log(raw_peers: Callable[..., RawPeer],
                                                                     toy_pipeline: LocalPipeline) -> None:
    before = toy_pipeline.status(2)["undeliverable"]
    peer = raw_peers("entry", "ghost")
    assert peer.hello()
    peer.send(v2_frames("ghost", 3, X2))
    assert wait_for(lambda: toy_pipeline.status(2)["undeliverable"] > before)
    assert wait_for(lambda: "undeliverable ghost/3" in toy_pipeline.log_text(2))
    with toy_pipeline.client() as good:
        good.run(X2)


def test_result_is_held_for_a_client_that_connects_late(raw_peers: Callable[..., RawPeer],
                                                        toy_pipeline: LocalPipeline) -> None:
    entry = raw_peers("entry", "latecomer")
    assert entry.hello()
    entry.send(v2_frames("latecomer", 11, X2))
    assert wait_for(lambda: toy_pipeline.status(2)["held_msgs"] > 0)  # at the exit before anyone asks for it
    exit_ = raw_peers("exit", "latecomer")
    (header, (out, _label)), = exit_.data(10.0)
    assert (header.client, header.seq) == ("latecomer", 11)
    np.testing.assert_allclose(out, toy_reference(X2)["out"], atol=1e-5)


def test_bad_input_storm_while_good_requests_are_in_flight(raw_peers: Callable[..., RawPeer],
                                                          toy_pipeline: LocalPipeline) -> None:
    """All bad classes fired from another client key while a client streams 200 good requests."""
    inputs = [toy_input(1 + i % 8, 1000 + i) for i in range(200)]
    answers: dict[str, object] = {}
    attacker_key = toy_pipeline.client_keypairs[1]
    peers = {case: (raw_peers("entry", f"storm-{case}", attacker_key), raw_peers("exit", f"storm-{case}",
                                                                                  attacker_key))
             for case in BAD_REQUESTS}

    def storm() -> None:
        for case, (build, stage, _) in sorted(BAD_REQUESTS.items()):
            entry, exit_ = peers[case]
            entry.hello()
            exit_.hello()
            entry.send(build(f"storm-{case}"))
            replies = (entry if stage == 0 else exit_).data(20.0)
            answers[case] = replies[0][0].kind if replies else None

    attacker = threading.Thread(target=storm)
    with toy_pipeline.client(window=16) as client:
        attacker.start()
        outputs = list(client.map(inputs))
    attacker.join(120)
    for x, out in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(out["out"], toy_reference(x)["out"], atol=1e-5)
    assert answers == {case: "error" for case in BAD_REQUESTS}
