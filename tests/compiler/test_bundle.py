"""Stage bundles: what the compiler writes is what an agent accepts, and nothing else is."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
from edgepipe.agent.formats.bundle import DATA_NAME, GRAPH_NAME, MANIFEST_NAME, BundleError, load_bundle


@pytest.fixture
def bundle(vit_tiny_build, tmp_path: Path) -> Path:
    """A private copy of stage 1, free to damage."""
    copy = tmp_path / "stage-1"
    shutil.copytree(vit_tiny_build.bundle_dirs[1], copy)
    return copy


def test_compiled_bundles_load_and_describe_their_stage(vit_tiny_build) -> None:
    manifests = [load_bundle(d) for d in vit_tiny_build.bundle_dirs]
    assert [m.stage_index for m in manifests] == [0, 1, 2]
    assert {m.stage_count for m in manifests} == {3}
    assert manifests[0].inputs[0].name == "pixels" and manifests[0].cut_in is None
    assert manifests[-1].outputs[0].name == "logits" and manifests[-1].cut_out is None
    for upstream, downstream in itertools.pairwise(manifests):
        assert upstream.outputs == downstream.inputs
        assert upstream.cut_out == downstream.cut_in
    assert all(m.model_sha256 == vit_tiny_build.model_sha256 for m in manifests)
    assert manifests[1].compile_settings["opset"] == 20
    # Each stage holds only its own weights: together about the whole model, not N times it.
    whole = (vit_tiny_build.model_path.parent / "model.onnx.data").stat().st_size
    total = sum(m.weight_bytes for m in manifests)
    assert whole * 0.95 < total < whole * 1.05


def test_flipped_byte_in_weights_is_refused_naming_the_file(bundle: Path) -> None:
    data = bundle / DATA_NAME
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"stage\.onnx\.data: sha256 mismatch"):
        load_bundle(bundle)


def test_truncated_graph_is_refused(bundle: Path) -> None:
    graph = bundle / GRAPH_NAME
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"stage\.onnx: size \d+ bytes, manifest says"):
        load_bundle(bundle)


def test_missing_file_is_refused(bundle: Path) -> None:
    (bundle / DATA_NAME).unlink()
    with pytest.raises(BundleError, match="missing from the bundle"):
        load_bundle(bundle)


def test_unknown_format_version_is_refused(bundle: Path) -> None:
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        load_bundle(bundle)


def test_garbage_manifest_is_refused(bundle: Path) -> None:
    (bundle / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(bundle)


def test_manifest_path_escape_is_refused(bundle: Path) -> None:
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="escapes the bundle"):
        load_bundle(bundle)


def test_not_a_bundle_dir(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"is .* a stage bundle directory"):
        load_bundle(tmp_path)
