"""Agents serve stages with int8 weights: real agent processes (torch and onnx unimportable, as on a
device) give exactly what the compiler's deployed-pipeline check computed for them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from agent_testlib import blocked_imports_env
from edgepipe.agent.formats.bundle import read_manifest
from edgepipe.agent.local import LocalPipeline
from edgepipe.compiler.plan_check import StageChoice, quantize_stages, run_deployed


def test_agents_serve_int8_stages_as_the_compiler_measured(vit_tiny_build, tmp_path: Path) -> None:
    """Stages 0 and 2 with int8 weights, stage 1 fp32; results match the compiler's run of the same bundles."""
    stages = [Path(shutil.copytree(b, tmp_path / b.name)) for b in vit_tiny_build.bundle_dirs]
    choices = [StageChoice(int8_weights=True), StageChoice(), StageChoice(int8_weights=True)]
    assert quantize_stages(stages, choices) == [0, 2]
    first = read_manifest(stages[0]).inputs[0]
    batches = [np.random.default_rng(seed).standard_normal((2, 3, 224, 224)).astype(np.float32) for seed in (0, 1)]
    with LocalPipeline(stages, env=blocked_imports_env(tmp_path), log_dir=tmp_path / "logs") as pipe, \
            pipe.client(window=2) as client:
        results = list(client.results({first.name: b} for b in batches))
    for batch, result in zip(batches, results, strict=True):
        want = run_deployed(stages, choices, {first.name: batch})["logits"]
        got = result.outputs["logits"]
        assert got.shape == want.shape == (2, 1000)
        assert float(np.abs(got - want).max()) <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_compressed_hops_deliver_what_the_compiler_measured(vit_tiny_build, tmp_path: Path) -> None:
    """Agents sending their outputs in fp16 and int8 (`serve --codec`) give, bit for bit up to ORT's
    thread-dependent rounding, what the compiler's codecs.roundtrip-based check computed: the error
    the planner was told is the error the runtime makes."""
    stages = [Path(shutil.copytree(b, tmp_path / b.name)) for b in vit_tiny_build.bundle_dirs]
    choices = [StageChoice(int8_weights=True, codec_out="fp16"), StageChoice(codec_out="int8"), StageChoice()]
    quantize_stages(stages, choices)
    first = read_manifest(stages[0]).inputs[0]
    batch = np.random.default_rng(5).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with LocalPipeline(stages, env=blocked_imports_env(tmp_path), log_dir=tmp_path / "logs",
                       stage_args={0: ["--codec", "fp16"], 1: ["--codec", "int8"]}) as pipe, \
            pipe.client(window=1) as client:
        (result,) = list(client.results([{first.name: batch}]))
    want = run_deployed(stages, choices, {first.name: batch})["logits"]
    raw = run_deployed(stages, [StageChoice(c.int8_weights) for c in choices], {first.name: batch})["logits"]
    got = result.outputs["logits"]
    assert float(np.abs(got - want).max()) <= 1e-3 * float(np.abs(want).max())
    assert float(np.abs(got - raw).max()) > 10 * float(np.abs(got - want).max())  # the codecs really applied
