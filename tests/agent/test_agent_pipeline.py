"""End to end through real agent processes: results, order, traces, several clients, resends,
back-pressure."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from agent_testlib import (
    build_identity_chain,
    decode_reply,
    process_alive,
    toy_input,
    toy_reference,
)
from edgepipe.agent.client import Client, ClientError, RequestTimeout, Result
from edgepipe.agent.formats.wire import Limits, data_header, decode, encode
from edgepipe.agent.local import LocalPipeline
from edgepipe.agent.transport import INSECURE, bind_pull, bind_router, bound_endpoint, connect_push


def _assert_matches(outputs: dict[str, np.ndarray], x: np.ndarray) -> None:
    ref = toy_reference(x)
    np.testing.assert_allclose(outputs["out"], ref["out"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(outputs["label"], ref["label"])
    assert outputs["label"].dtype == np.int64


def test_three_agent_processes_compute_the_unsplit_function(toy_pipeline: LocalPipeline) -> None:
    pids = {a.process.pid for a in toy_pipeline.agents}
    assert len(pids) == 3 and all(process_alive(p) for p in pids) and os.getpid() not in pids
    with toy_pipeline.client() as client:
        for seed, batch in enumerate([1, 2, 8, 5]):
            x = toy_input(batch, seed)
            _assert_matches(client.run({"x": x}), x)


def test_many_in_flight_come_back_in_submission_order(toy_pipeline: LocalPipeline) -> None:
    rng = np.random.default_rng(1)
    inputs = [toy_input(int(rng.integers(1, 9)), seed) for seed in range(300)]
    with toy_pipeline.client(window=32) as client:
        outputs = list(client.map(inputs))
        assert client.in_flight == 0
    assert len(outputs) == len(inputs)
    for x, out in zip(inputs, outputs, strict=True):
        _assert_matches(out, x)


def test_results_collected_out_of_order_by_sequence_number(toy_pipeline: LocalPipeline) -> None:
    inputs = [toy_input(3, seed) for seed in range(6)]
    with toy_pipeline.client(window=6) as client:
        seqs = [client.submit(x) for x in inputs]  # a bare array binds to the only input, x
        for seq in reversed(seqs):
            result = client.result(seq)
            assert result.seq == seq
            _assert_matches(result.outputs, inputs[seqs.index(seq)])
        with pytest.raises(KeyError, match="already collected"):
            client.result(seqs[0])


def test_trace_has_one_record_per_stage_in_order(toy_pipeline: LocalPipeline) -> None:
    with toy_pipeline.client() as client:
        (result,) = list(client.results([toy_input(4, 0)]))
    assert isinstance(result, Result)
    assert [r.stage for r in result.trace] == [0, 1, 2]
    for rec in result.trace:
        assert rec.recv <= rec.compute_start <= rec.compute_end <= rec.send
        assert rec.compute_s >= 0 and rec.overhead_s >= 0
    for up, down in zip(result.trace, result.trace[1:], strict=False):
        assert up.send <= down.recv  # one machine, one clock
    assert result.latency_s > 0 and result.attempts == 1


def test_two_clients_interleaved_each_get_their_own_results(toy_pipeline: LocalPipeline) -> None:
    with toy_pipeline.client(client_id="alice") as alice, toy_pipeline.client(client_id="bob") as bob:
        xa = [toy_input(2, 100 + i) for i in range(20)]
        xb = [toy_input(3, 200 + i) for i in range(20)]
        sa = [alice.submit(x) for x in xa[:4]]
        sb = [bob.submit(x) for x in xb[:4]]
        sa += [alice.submit(x) for x in xa[4:8]]
        got_a = [alice.result(s).outputs for s in sa]
        got_b = [bob.result(s).outputs for s in sb]
    for x, out in zip(xa[:8], got_a, strict=True):
        _assert_matches(out, x)
    for x, out in zip(xb[:4], got_b, strict=True):
        _assert_matches(out, x)


def test_client_resends_after_timeout_and_drops_the_late_duplicate() -> None:
    """A hand-played pipeline (raw sockets in a thread, speaking the protocol) ignores the first
    attempt, answers the resend, then answers the first attempt late: the client returns one result,
    both attempts carry the same request id, and the late duplicate is dropped."""
    ctx = zmq.Context()
    entry = bind_pull(ctx, "tcp://127.0.0.1:0", auth=INSECURE, max_frame_bytes=None)
    exit_ = bind_router(ctx, "tcp://127.0.0.1:0", auth=INSECURE)
    seen: list[tuple[str, int]] = []

    def play() -> None:
        for _ in range(2):  # request 0 twice (attempt 1 ignored, attempt 2 answered), then request 1
            first, _ = decode(entry.recv_multipart(copy=False), Limits())
            header, (x,) = decode(entry.recv_multipart(copy=False), Limits())
            seen.extend([(first.client, first.seq), (header.client, header.seq)])
            reply = encode(data_header(header.client, header.seq, {"out": x + 1}), [x + 1])
            exit_.send_multipart([header.client.encode(), *reply])
            exit_.send_multipart([header.client.encode(), *reply])  # the late answer to attempt 1

    player = threading.Thread(target=play, daemon=True)
    player.start()
    try:
        with Client(bound_endpoint(entry), bound_endpoint(exit_), client_id="resender", timeout_s=0.3,
                    retries=2) as client:
            x = toy_input(2, 0)
            result = client.result(client.submit(x))
            np.testing.assert_array_equal(result.outputs["out"], x + 1)
            assert result.attempts == 2 and client.resends == 1
            client.result(client.submit(x))  # while waiting, the duplicate of request 0 arrives
            assert client.duplicates >= 1
        player.join(10)
        assert seen[:2] == [("resender", 0), ("resender", 0)]
    finally:
        entry.close(0)
        exit_.close(0)
        ctx.term()


def test_request_without_any_answer_times_out_after_retries() -> None:
    ctx = zmq.Context()
    entry = bind_pull(ctx, "tcp://127.0.0.1:0", auth=INSECURE, max_frame_bytes=None)
    exit_ = bind_router(ctx, "tcp://127.0.0.1:0", auth=INSECURE)
    try:
        with Client(bound_endpoint(entry), bound_endpoint(exit_), timeout_s=0.2, retries=1) as client:
            seq = client.submit(toy_input(1, 0))
            with pytest.raises(RequestTimeout, match=r"no result after 2 attempt\(s\) of 0.2 s") as info:
                client.result(seq)
            assert info.value.seq == seq
            outcomes = list(client.map([toy_input(1, 1)], errors="return"))
            assert isinstance(outcomes[0], RequestTimeout)
    finally:
        entry.close(0)
        exit_.close(0)
        ctx.term()


def test_entry_that_is_not_running_is_a_clear_error() -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind("tcp://127.0.0.1:0")
    free_endpoint = bound_endpoint(sock)
    sock.close(0)  # the port is now closed: nothing listens there
    ctx.term()
    with Client(free_endpoint, "tcp://127.0.0.1:1", timeout_s=0.3) as client, \
            pytest.raises(ClientError, match=r"accepted no request for 0\.3 s"):
        client.submit(toy_input(1, 0))


def test_slow_stage_applies_back_pressure_without_buffering(tmp_path: Path) -> None:
    """Freeze the last agent (SIGSTOP). Upstream must stop taking work after a bounded number of
    1 MiB messages (HWMs + 2-slot queues + TCP buffers), not buffer everything sent; after SIGCONT
    every message comes through intact."""
    dirs = build_identity_chain(tmp_path / "id", 2, (256, 1024))
    sample = np.random.default_rng(0).random((1, 256, 1024), dtype=np.float32)
    with LocalPipeline(dirs, max_batch=2, log_dir=tmp_path / "logs") as pipe:
        last = pipe.agents[-1].process
        ctx = zmq.Context()
        push = connect_push(ctx, pipe.entry, auth=INSECURE, hwm=2)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, b"bp")
        dealer.connect(pipe.exit)
        try:
            os.kill(last.pid, signal.SIGSTOP)
            accepted = 0
            deadline = time.monotonic() + 15
            while accepted < 400 and time.monotonic() < deadline:
                if not push.poll(500, zmq.POLLOUT):
                    break  # blocked: back-pressure reached the client
                frames = encode(data_header("bp", accepted, {"t0": sample}), [sample])
                push.send_multipart(frames, copy=False)
                accepted += 1
            assert accepted < 100, f"{accepted} MiB accepted by a pipeline whose last stage is frozen"
            os.kill(last.pid, signal.SIGCONT)
            seen = set()
            while len(seen) < accepted:
                assert dealer.poll(20000), f"only {len(seen)}/{accepted} results after SIGCONT"
                header, (out,) = decode_reply(dealer.recv_multipart(copy=False))
                assert header.kind == "data"
                np.testing.assert_array_equal(out, sample)
                seen.add(header.seq)
            assert seen == set(range(accepted))
        finally:
            os.kill(last.pid, signal.SIGCONT)
            push.close(0)
            dealer.close(0)
            ctx.term()
