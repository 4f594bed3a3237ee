"""The attacks of issue 11, against real agent processes on a secure pipeline (the default): a
peer without an allowed key gets nothing in, a client cannot take another client's results,
cannot make another client's results wrong, cannot forge errors or trace records, and cannot
skip the entry; a plaintext peer is refused. Every count comes from the stages' own counters."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from agent_testlib import RawPeer, toy_input, toy_reference, v2_frames, wait_for
from edgepipe.agent.client import Client, ClientError
from edgepipe.agent.formats.keys import new_keypair
from edgepipe.agent.local import LocalPipeline

X = toy_input(2, 3)


def test_unknown_key_gets_no_tensor_in(toy_pipeline: LocalPipeline) -> None:
    before = toy_pipeline.status(0)
    stranger = new_keypair()
    with RawPeer(toy_pipeline.entry, keypair=stranger, server_key=toy_pipeline.stage_keys(0)[0],
                 client_id="stranger") as peer:
        assert not peer.hello(timeout_s=2.0)  # the handshake never completes: not even a heartbeat back
        for seq in range(20):
            peer.send(v2_frames("stranger", seq, X))
        assert peer.data(1.0) == []
    with Client(toy_pipeline.entry, toy_pipeline.exit, keypair=stranger, entry_key=toy_pipeline.stage_keys(0)[0],
                exit_key=toy_pipeline.stage_keys(2)[0], timeout_s=1.0) as client, \
            pytest.raises(ClientError, match=r"no answer from the entry .* this client.s key in its --allow"):
        client.run(X)
    after = toy_pipeline.status(0)
    assert after["requests_in"] == before["requests_in"]  # 0 tensors accepted
    assert after["rejected"] == before["rejected"] and after["dropped"] == before["dropped"]  # nothing reached it


def test_plaintext_peer_is_refused(toy_pipeline: LocalPipeline) -> None:
    before = toy_pipeline.status(0)["requests_in"]
    with RawPeer(toy_pipeline.entry, insecure=True, client_id="plain") as peer:
        assert not peer.hello(timeout_s=2.0)
        peer.send(v2_frames("plain", 0, X))
        assert peer.data(1.0) == []
    assert toy_pipeline.status(0)["requests_in"] == before


def test_a_client_key_cannot_skip_the_entry(toy_pipeline: LocalPipeline) -> None:
    """Stage 1 accepts only stage 0's key: a client key that the entry accepts is refused there."""
    before = toy_pipeline.status(1)["requests_in"]
    stage1 = toy_pipeline.agent(1)
    with RawPeer(stage1.listen, keypair=toy_pipeline.client_keypair, server_key=stage1.public_key,
                 client_id="skipper") as peer:
        assert not peer.hello(timeout_s=2.0)
        peer.send(v2_frames("skipper", 0, X, owner="someone"))
    assert toy_pipeline.status(1)["requests_in"] == before


def test_results_go_only_to_the_key_that_sent_the_request(toy_pipeline: LocalPipeline,
                                                          raw_peers: Callable[..., RawPeer]) -> None:
    """The attacker (another authorised client key) connects to the exit under the victim's
    client id, and acknowledges the victim's request ids: it receives none of the victim's results,
    and the victim receives all of them, correct."""
    victim_key, attacker_key = toy_pipeline.client_keypairs
    inputs = [toy_input(1 + i % 8, 300 + i) for i in range(60)]
    with toy_pipeline.client(client_id="victim", keypair=victim_key) as victim:
        hijacker = raw_peers("exit", "victim", attacker_key)
        assert hijacker.hello()
        outputs = []
        for i, out in enumerate(victim.map(inputs)):
            outputs.append(out)
            if i % 10 == 0:  # "I got them" on the victim's behalf: must not make the exit drop them
                hijacker.ack([(victim_key.public_text, "victim", s) for s in range(i, i + 10)])
                hijacker.ack([(attacker_key.public_text, "victim", s) for s in range(i, i + 10)])
        stolen = hijacker.data(2.0, count=1)
    assert stolen == []
    for x, out in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(out["out"], toy_reference(x)["out"], atol=1e-5)


def test_requests_forged_under_another_clients_id_do_not_change_its_results(
        toy_pipeline: LocalPipeline, raw_peers: Callable[..., RawPeer]) -> None:
    """The attacker sends requests with the victim's client id and sequence numbers but other
    inputs (and forged error messages and trace records for them): the entry stamps them with the
    attacker's key, so the victim's results are all the victim's own."""
    victim_key, attacker_key = toy_pipeline.client_keypairs
    inputs = [toy_input(2, 500 + i) for i in range(40)]
    forger = raw_peers("entry", "victim2", attacker_key)
    assert forger.hello()
    with toy_pipeline.client(client_id="victim2", keypair=victim_key) as victim:
        for seq in range(40):  # ahead of the victim: its ids are predictable
            forger.send(v2_frames("victim2", seq, toy_input(2, 9999)))
            forger.send(v2_frames("victim2", seq, X, kind="error", tensors=[], error="forged", error_stage=2)[:1])
            forger.send(v2_frames("victim2", seq, X, trace=[[0, 0.0, 0.0, 0.0, 0.0]]))
        outputs = list(victim.map(inputs))
    for x, out in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(out["out"], toy_reference(x)["out"], atol=1e-5)
    refusals = [h.error for h, _ in forger.data(5.0, count=80)]
    assert refusals.count("bad request: clients may not send error messages") >= 1
    assert any("clients may not send trace records" in r for r in refusals)


def test_exit_stamps_stay_with_the_owner_in_results(toy_pipeline: LocalPipeline) -> None:
    with toy_pipeline.client() as client:
        seq = client.submit(X)
        assert wait_for(lambda: (client._pump(), seq in client._done)[1], timeout_s=20)
        assert client.result(seq).outputs["out"].shape == (2, 16)
    assert client.owner == toy_pipeline.client_keypair.public_text


def test_insecure_pipeline_serves_plaintext_clients_and_no_secure_ones(toy_bundles, tmp_path) -> None:
    """--insecure is all or nothing: a plaintext client is served; a client expecting keys gets no
    answer (the handshake fails), never a silent downgrade."""
    with LocalPipeline(toy_bundles, max_batch=8, log_dir=tmp_path / "logs", insecure=True) as pipe:
        assert all("INSECURE" in pipe.log_text(i) for i in range(3))
        with pipe.client() as client:
            np.testing.assert_allclose(client.run(X)["out"], toy_reference(X)["out"], atol=1e-5)
        some_key = new_keypair()
        with Client(pipe.entry, pipe.exit, keypair=some_key, entry_key=new_keypair().public_text,
                    exit_key=new_keypair().public_text, timeout_s=1.0) as secure_client, \
                pytest.raises(ClientError, match="no answer from the entry"):
            secure_client.run(X)
