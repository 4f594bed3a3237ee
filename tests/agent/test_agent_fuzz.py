"""The data sockets fuzzed: random frames and random msgpack headers, from a client key the
pipeline accepts, to the entry's --listen and to the exit's --results. Every malformed message
is answered (``rejected``) or counted (``dropped``), exactly once each, and no stage goes down."""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import numpy as np
from agent_testlib import RawPeer, process_alive, toy_input, toy_reference, wait_for
from edgepipe.agent.local import LocalPipeline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FIELDS = ["v", "kind", "client", "seq", "owner", "ls", "attempt", "tensors", "error", "error_stage", "trace",
          "inc", "role", "credit", "tx", "txs", "recv", "done"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=4), max_leaves=12)
# Headers that look almost right: the known fields with arbitrary values, and the kinds that exist.
headers = st.dictionaries(st.sampled_from(FIELDS), values, max_size=10).map(
    lambda h: {**h, "kind": h.get("kind") if h.get("kind") not in ("hb", "ack") else "data"})


def _packed(header: dict) -> bytes:
    try:
        return msgpack.packb(header)
    except (TypeError, ValueError, OverflowError):  # integers beyond 64 bits
        return b"\xc1"


messages = st.one_of(
    st.lists(st.binary(max_size=200), min_size=1, max_size=5),
    st.tuples(headers, st.lists(st.binary(max_size=200), max_size=4)).map(lambda t: [_packed(t[0]), *t[1]]),
    st.tuples(headers.map(lambda h: {**h, "v": 2, "client": "fuzz", "seq": 1}),
              st.lists(st.binary(max_size=200), max_size=4)).map(lambda t: [_packed(t[0]), *t[1]]),
)


def _answered_or_counted(pipe: LocalPipeline, stage: int) -> int:
    s = pipe.status(stage)
    return s["rejected"] + s["dropped"]


def _fuzz(pipe: LocalPipeline, peer: RawPeer, stage: int) -> None:
    sent: list[int] = [0]
    before = _answered_or_counted(pipe, stage)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(frames=messages)
    def fire(frames: list[bytes]) -> None:
        assert peer.send(frames)
        sent[0] += 1

    fire()
    assert wait_for(lambda: _answered_or_counted(pipe, stage) - before == sent[0], timeout_s=30), \
        (sent[0], _answered_or_counted(pipe, stage) - before)


def test_fuzzed_entry_answers_or_counts_every_message(toy_pipeline: LocalPipeline,
                                                      raw_peers: Callable[..., RawPeer]) -> None:
    peer = raw_peers("entry", "fuzz", toy_pipeline.client_keypairs[1])
    assert peer.hello()
    _fuzz(toy_pipeline, peer, 0)
    assert all(process_alive(a.process.pid) for a in toy_pipeline.agents)
    with toy_pipeline.client() as client:
        x = toy_input(4, 77)
        np.testing.assert_allclose(client.run(x)["out"], toy_reference(x)["out"], atol=1e-5)


def test_fuzzed_results_socket_counts_every_message(toy_pipeline: LocalPipeline,
                                                    raw_peers: Callable[..., RawPeer]) -> None:
    peer = raw_peers("exit", "fuzz-exit", toy_pipeline.client_keypairs[1])
    assert peer.hello()
    _fuzz(toy_pipeline, peer, 2)
    assert all(process_alive(a.process.pid) for a in toy_pipeline.agents)
    with toy_pipeline.client() as client:
        client.run(toy_input(1, 0))
