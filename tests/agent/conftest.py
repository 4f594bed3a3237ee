"""Fixtures for the runtime tests (helpers live in agent_testlib.py, beside this file)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # agent_testlib, whatever pytest's import mode

from agent_testlib import RawPeer, build_toy
from edgepipe.agent.formats.keys import KeyPair
from edgepipe.agent.local import LocalPipeline


@pytest.fixture(scope="session")
def toy_bundles(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def toy_pipeline(toy_bundles: list[Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPipeline]:
    """The toy pipeline, 3 agent processes shared by the tests that leave it running: secure
    (ephemeral keys; two authorised client keys, ``client_keypairs[1]`` playing the attacker or the
    other client), max_batch 8, results held 1 s for an absent client, heartbeats every 0.2 s,
    counters readable with ``pipe.status(i)``."""
    with LocalPipeline(toy_bundles, max_batch=8, log_dir=tmp_path_factory.mktemp("toy-logs"),
                       agent_args=["--hold-s", "1"], heartbeat_s=0.2, clients=2, control=True) as pipe:
        yield pipe


@pytest.fixture
def raw_peers(toy_pipeline: LocalPipeline) -> Iterator[Callable[..., RawPeer]]:
    """peer(where, client_id, keypair=None) -> a RawPeer to the toy pipeline's entry ("entry") or
    exit ("exit"), authenticated with the first client key unless another keypair is given."""
    made: list[RawPeer] = []

    def peer(where: str, client_id: str, keypair: KeyPair | None = None) -> RawPeer:
        keypair = keypair or toy_pipeline.client_keypair
        if where == "entry":
            p = RawPeer(toy_pipeline.entry, keypair=keypair, server_key=toy_pipeline.stage_keys(0)[0],
                        client_id=client_id)
        else:
            p = RawPeer(toy_pipeline.exit, keypair=keypair, server_key=toy_pipeline.stage_keys(2)[0],
                        results=True, client_id=client_id)
        made.append(p)
        return p

    yield peer
    for p in made:
        p.close()
