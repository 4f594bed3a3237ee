"""Int8-weight stage bundles: made by ONNX Runtime's quantize_dynamic, self-contained, hash-checked,
recorded in the manifest and loadable by an agent (tests/agent/test_agent_int8.py serves them)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx_ir as ir
import pytest
from edgepipe.agent.device.session import create_session
from edgepipe.agent.formats.bundle import (
    DATA_NAME,
    GRAPH_NAME,
    MANIFEST_NAME,
    BundleError,
    load_bundle,
)
from edgepipe.compiler.quantize import QuantizeError, quantizable_nodes, quantize_bundle


@pytest.fixture()
def stages(vit_tiny_build, tmp_path: Path) -> list[Path]:
    """A private copy of the 3 fp32 vit_tiny stages."""
    copies = []
    for bundle in vit_tiny_build.bundle_dirs:
        copies.append(Path(shutil.copytree(bundle, tmp_path / bundle.name)))
    return copies


def test_quantized_bundle_records_how_and_shrinks_its_weights(stages: list[Path]) -> None:
    before = load_bundle(stages[1])
    matmuls = len(quantizable_nodes(ir.load(stages[1] / GRAPH_NAME).graph))
    assert matmuls == 4 * 4  # 4 blocks: qkv, proj, fc1, fc2
    after = quantize_bundle(stages[1])
    assert load_bundle(stages[1]) == after  # every file re-hashed: the bundle still loads
    q = after.quantization
    assert q is not None and q.weights == "int8" and q.op_types == ("MatMul", "Gemm") and q.per_channel
    assert q.float_weight_bytes == before.weight_bytes
    assert after.weight_bytes < before.weight_bytes / 3.5  # int8 weights, fp32 norms/biases/scales
    assert (stages[1] / DATA_NAME).stat().st_size < before.files[DATA_NAME].bytes / 3.5
    assert (after.inputs, after.outputs) == (before.inputs, before.outputs)  # fits the same pipeline slot
    ops = {n.op_type for n in ir.load(stages[1] / GRAPH_NAME).graph}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    create_session(stages[1], after)  # what the agent does before serving: graph matches manifest
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_bundle(stages[1])


def test_tampered_int8_bundle_is_refused(stages: list[Path]) -> None:
    quantize_bundle(stages[2])
    data = stages[2] / DATA_NAME
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(stages[2])


def test_version_1_manifests_are_still_read(stages: list[Path]) -> None:
    raw = json.loads((stages[0] / MANIFEST_NAME).read_text())
    raw["format_version"] = 1
    del raw["quantization"]
    (stages[0] / MANIFEST_NAME).write_text(json.dumps(raw))
    assert load_bundle(stages[0]).quantization is None


def test_agent_check_says_the_weights_are_int8(stages: list[Path]) -> None:
    quantize_bundle(stages[0])
    proc = subprocess.run([sys.executable, "-m", "edgepipe.agent.cli", "check", str(stages[0]), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["weights"].startswith("int8") and "quantize_dynamic" in info["weights"]
    proc = subprocess.run([sys.executable, "-m", "edgepipe.agent.cli", "check", str(stages[1]), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert json.loads(proc.stdout)["weights"] == "float32"
