"""The endpoints file: round trip, atomic rewrite, and refusals that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgepipe.agent.formats.bundle import TensorSpec
from edgepipe.agent.formats.endpoints import DaemonRef, Endpoints, EndpointsError, Peer, load_endpoints, save_endpoints
from edgepipe.agent.formats.keys import new_keypair


def sample(insecure: bool = False) -> Endpoints:
    key = None if insecure else new_keypair().public_text
    return Endpoints(deployment="vitb-1a2b", generation=3, model_id="vit_tiny_patch16_224",
                     entry=(Peer("tcp://10.0.0.2:5550", key),), exit=(Peer("tcp://10.0.0.4:5551", key),),
                     inputs=(TensorSpec("pixels", "float32", ("batch", 3, 224, 224)),),
                     outputs=(TensorSpec("logits", "float32", ("batch", 1000)),),
                     daemons=(DaemonRef("pi-a", "tcp://10.0.0.2:5560", key),), insecure=insecure)


@pytest.mark.parametrize("insecure", [False, True])
def test_round_trip(tmp_path: Path, insecure: bool) -> None:
    endpoints = sample(insecure)
    save_endpoints(tmp_path / "endpoints.json", endpoints)
    assert load_endpoints(tmp_path) == endpoints
    assert [p.name for p in tmp_path.iterdir()] == ["endpoints.json"]  # no temporary file left


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(EndpointsError, match="edgepipe-fleet deploy"):
        load_endpoints(tmp_path)
    raw = sample().to_dict()
    raw["entry"][0]["public_key"] = None
    (tmp_path / "endpoints.json").write_text(json.dumps(raw))
    with pytest.raises(EndpointsError, match=r"tcp://10\.0\.0\.2:5550: a secure deployment needs"):
        load_endpoints(tmp_path)
    raw = sample().to_dict() | {"format_version": 9}
    (tmp_path / "endpoints.json").write_text(json.dumps(raw))
    with pytest.raises(EndpointsError, match="version 9"):
        load_endpoints(tmp_path)
