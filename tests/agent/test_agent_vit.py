"""vit_tiny compiled into 3 stages, served by 3 agent processes (with torch and onnx unimportable,
as on a device), gives the unsplit model's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from agent_testlib import blocked_imports_env
from edgepipe.agent.formats.bundle import read_manifest
from edgepipe.agent.local import LocalPipeline

TOLERANCE = 1e-4  # docs/operations.md: the split model must match the unsplit one to this


def test_vit_tiny_three_agents_match_the_whole_model(vit_tiny_build, tmp_path: Path) -> None:
    bundles = vit_tiny_build.bundle_dirs
    assert len(bundles) == 3
    first = read_manifest(bundles[0]).inputs[0]
    whole = ort.InferenceSession(str(vit_tiny_build.model_path), providers=["CPUExecutionProvider"])
    (output_name,) = [o.name for o in whole.get_outputs()]
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 224, 224)).astype(np.float32) for n in (2, 1, 3, 2)]
    with LocalPipeline(bundles, env=blocked_imports_env(tmp_path), log_dir=tmp_path / "logs") as pipe, \
            pipe.client(window=3) as client:
        results = list(client.results({first.name: b} for b in batches))
    for batch, result in zip(batches, results, strict=True):
        (want,) = whole.run(None, {whole.get_inputs()[0].name: batch})
        got = result.outputs[output_name]
        assert got.shape == want.shape == (batch.shape[0], 1000)
        assert float(np.abs(got - want).max()) <= TOLERANCE
        assert [r.stage for r in result.trace] == [0, 1, 2]
        assert all(r.compute_s > 0 for r in result.trace)
