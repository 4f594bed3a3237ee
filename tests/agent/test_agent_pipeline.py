"""End to end through real agent processes: results, order, traces, several clients, resends,
back-pressure."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq
from agent_testlib import (
    build_identity_chain,
    free_endpoint,
    process_alive,
    toy_input,
    toy_reference,
    wait_for,
)
from edgepipe.agent.client import Client, ClientError, RequestTimeout, Result
from edgepipe.agent.formats.wire import (
    Ack,
    Header,
    Heartbeat,
    Limits,
    data_header,
    encode,
    encode_ack,
    encode_heartbeat,
    parse,
)
from edgepipe.agent.local import LocalPipeline
from edgepipe.agent.transport import INSECURE, bind_data, bind_results, bound_endpoint


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


class _HandPlayed:
    """A pipeline played by hand in a thread (an entry ROUTER and an exit ROUTER speaking the wire
    protocol, insecure): it grants credit and acknowledges like a stage, and answers each request
    as ``answer(header, x)`` says: a list of result arrays to send (several: duplicates), or none."""

    def __init__(self, answer: Callable[[Header, np.ndarray], list[np.ndarray]]) -> None:
        self.ctx = zmq.Context()
        self.entry = bind_data(self.ctx, "tcp://127.0.0.1:0", auth=INSECURE, max_frame_bytes=None)
        self.exit = bind_results(self.ctx, "tcp://127.0.0.1:0", auth=INSECURE)
        self.answer, self.seen, self.stop = answer, [], threading.Event()
        self.thread = threading.Thread(target=self._play, daemon=True)
        self.thread.start()

    def _play(self) -> None:
        hb = encode_heartbeat(Heartbeat("handplayed", "stage", 0, credit=(8, 2**30)))
        clients: set[bytes] = set()
        while not self.stop.is_set():
            for sock in (self.entry, self.exit):
                while sock.poll(10):
                    route, *frames = sock.recv_multipart(copy=False)
                    message = parse(frames, Limits())
                    if isinstance(message, Heartbeat):
                        with contextlib.suppress(zmq.ZMQError):
                            sock.send_multipart([route.bytes, hb])
                        if sock is self.exit:
                            clients.add(route.bytes)
                    elif isinstance(message, tuple) and sock is self.entry:
                        header, (x,) = message
                        self.seen.append((header.client, header.seq, header.attempt))
                        self.entry.send_multipart([route.bytes, encode_ack(Ack((header.request_id,),
                                                                               (header.request_id,)))])
                        for out in self.answer(header, np.array(x)):
                            reply = encode(data_header(header.client, header.seq, {"out": out}), [out])
                            for client in clients:
                                with contextlib.suppress(zmq.ZMQError):  # that client has left
                                    self.exit.send_multipart([client, *reply])

    @property
    def endpoints(self) -> tuple[str, str]:
        return bound_endpoint(self.entry), bound_endpoint(self.exit)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.entry.close(0)
        self.exit.close(0)
        self.ctx.term()


def test_client_resends_as_a_last_resort_and_drops_the_late_duplicate() -> None:
    """The hand-played pipeline ignores a request's first attempt and answers the second (a
    last-resort resend, same request id, attempt 1) twice: the client returns one result and
    counts the other as a duplicate."""
    def answer(header: Header, x: np.ndarray) -> list[np.ndarray]:
        return [] if header.attempt == 0 else [x + 1, x + 1]

    player = _HandPlayed(answer)
    try:
        entry, exit_ = player.endpoints
        with Client(entry, exit_, insecure=True, client_id="resender", timeout_s=0.5, retries=2) as client:
            x = toy_input(2, 0)
            result = client.result(client.submit(x))
            np.testing.assert_array_equal(result.outputs["out"], x + 1)
            assert result.attempts == 2 and client.resends == 1
            assert wait_for(lambda: (client._pump(), client.duplicates)[1] >= 1, timeout_s=10)
        assert player.seen[:2] == [("resender", 0, 0), ("resender", 0, 1)]
    finally:
        player.close()


def test_request_without_any_answer_times_out_after_retries() -> None:
    player = _HandPlayed(lambda header, x: [])
    try:
        entry, exit_ = player.endpoints
        with Client(entry, exit_, insecure=True, timeout_s=0.2, retries=1) as client:
            seq = client.submit(toy_input(1, 0))
            with pytest.raises(RequestTimeout, match=r"no result after 2 attempt\(s\) of 0.2 s") as info:
                client.result(seq)
            assert info.value.seq == seq
            outcomes = list(client.map([toy_input(1, 1)], errors="return"))
            assert isinstance(outcomes[0], RequestTimeout)
    finally:
        player.close()


def test_entry_that_is_not_running_is_a_clear_error() -> None:
    with Client(free_endpoint(), free_endpoint(), insecure=True, timeout_s=0.3) as client, \
            pytest.raises(ClientError, match=r"no answer from the entry tcp://127.0.0.1:\d+ for 0\.\d s"):
        client.run(toy_input(1, 0))


def test_a_secure_client_needs_keys_or_insecure_by_name() -> None:
    with pytest.raises(ValueError, match="needs this client's keypair and the entry's and exit's public keys"):
        Client("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")


def test_slow_stage_applies_back_pressure_without_buffering(tmp_path: Path) -> None:
    """Freeze the last agent (SIGSTOP). The client gets only its credit at the entry onto the wire
    (each stage takes its upstream's work only as it passes it on), and ``submit`` blocks instead of
    buffering; after SIGCONT every message comes through intact and in order."""
    dirs = build_identity_chain(tmp_path / "id", 2, (256, 1024))
    samples = [np.full((1, 256, 1024), i, np.float32) for i in range(40)]
    outputs: list[np.ndarray] = []
    with LocalPipeline(dirs, max_batch=2, log_dir=tmp_path / "logs", heartbeat_s=0.2) as pipe, \
            pipe.client(window=len(samples)) as client:
        pipe.pause(1)

        def use_client() -> None:  # the client belongs to this thread from now on
            seqs = [client.submit({"t0": s}) for s in samples]
            outputs.extend(client.result(seq).outputs["t2"] for seq in seqs)

        user = threading.Thread(target=use_client)
        try:
            user.start()
            time.sleep(3)
            sent = client._outbox.sent  # an int written by the other thread
            assert 0 < sent <= 8, f"{sent} MiB sent into a pipeline whose last stage is frozen (credit 4 per hop)"
        finally:
            pipe.resume(1)
        user.join(120)
    assert len(outputs) == len(samples)
    for out, sample in zip(outputs, samples, strict=True):
        np.testing.assert_array_equal(out, sample)


def test_last_resort_timeout_follows_the_measured_latency(toy_pipeline: LocalPipeline) -> None:
    """No fixed 30 s: 120 s before anything is measured (a first result may be slow), then five
    times the slowest recent latency, at least 30 s; a timeout given explicitly is kept."""
    from edgepipe.agent.client.client import FIRST_TIMEOUT_S, MIN_TIMEOUT_S, TIMEOUT_FACTOR

    with toy_pipeline.client() as client:
        assert client.timeout_s == FIRST_TIMEOUT_S
        latencies = [client.result(client.submit(toy_input(2, s))).latency_s for s in range(5)]
        assert client.timeout_s == max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * max(latencies))
    with toy_pipeline.client(timeout_s=7.5) as client:
        client.run(toy_input(1, 0))
        assert client.timeout_s == 7.5


def test_a_client_left_idle_then_used_is_not_taken_for_unreachable(toy_pipeline: LocalPipeline) -> None:
    """Time the caller spends elsewhere is not time the pipeline failed to answer."""
    with toy_pipeline.client(timeout_s=1.0) as client:
        time.sleep(2.5)  # longer than the 1 s the client allows an entry to answer at all
        x = toy_input(2, 9)
        np.testing.assert_allclose(client.run(x)["out"], toy_reference(x)["out"], atol=1e-5)
