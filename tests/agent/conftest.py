"""Fixtures for the runtime tests (helpers live in agent_testlib.py, beside this file)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

sys.path.insert(0, str(Path(__file__).parent))  # agent_testlib, whatever pytest's import mode

from agent_testlib import build_toy
from edgepipe.agent.local import LocalPipeline
from edgepipe.agent.transport import INSECURE, connect_dealer, connect_push


@pytest.fixture(scope="session")
def toy_bundles(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def toy_pipeline(toy_bundles: list[Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPipeline]:
    """The toy pipeline, 3 agent processes, shared by the tests that leave it running. max_batch 8;
    the exit holds results for an absent client 1 s."""
    with LocalPipeline(toy_bundles, max_batch=8, log_dir=tmp_path_factory.mktemp("toy-logs"),
                       agent_args=["--hold-s", "1"]) as pipe:
        yield pipe


@pytest.fixture
def raw_exchange(toy_pipeline: LocalPipeline) -> Iterator[Callable[..., list[zmq.Frame] | None]]:
    """send(frames, client_id, timeout_s) -> the first message routed back to client_id (None on
    timeout). Raw ZeroMQ, for messages the Client would never produce."""
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def send(frames: list, client_id: str, timeout_s: float = 10.0) -> list[zmq.Frame] | None:
        dealer = connect_dealer(ctx, toy_pipeline.exit, auth=INSECURE, routing_id=client_id.encode())
        push = connect_push(ctx, toy_pipeline.entry, auth=INSECURE)
        socks.extend([dealer, push])
        push.send_multipart(frames, copy=False)
        if not dealer.poll(int(timeout_s * 1000)):
            return None
        return dealer.recv_multipart(copy=False)

    yield send
    for sock in socks:
        sock.close(0)
    ctx.term()


