"""Check that the chained stage bundles compute what the whole model computes.

Both sides run in ONNX Runtime on the same random inputs, made to fit the model (token ids within
the vocabulary, attention masks that pad all samples but the first, normal noise for images); the
result is the largest absolute difference per model output. A model with a fixed batch size is
verified at that size, and the result says so. Stages are cut at tensor boundaries and nothing is approximated, so the
expected difference is 0.0; ORT may fuse kernels differently on either side of a cut, hence a
small tolerance (DEFAULT_TOLERANCE, documented in docs/formats/bundle.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgepipe.agent.client.inputs import ModelInputs, random_inputs
from edgepipe.agent.formats.bundle import GRAPH_NAME, read_manifest

DEFAULT_TOLERANCE = 1e-4


class VerificationError(RuntimeError):
    """The chained stages disagree with the whole model beyond the tolerance."""


@dataclass(frozen=True)
class Verification:
    max_abs_diff: dict[str, float]  # per model output
    tolerance: float
    batch: int  # the batch size actually run

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return self.worst <= self.tolerance


def cpu_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_chain(bundle_dirs: list[Path], feeds: dict[str, np.ndarray], threads: int = 0) -> dict[str, np.ndarray]:
    """Run the stages one after another, each fed the previous stage's outputs by name."""
    values = dict(feeds)
    for bundle_dir in bundle_dirs:
        manifest = read_manifest(bundle_dir)
        session = cpu_session(bundle_dir / GRAPH_NAME, threads)
        outputs = session.run([s.name for s in manifest.outputs], {s.name: values[s.name] for s in manifest.inputs})
        values = dict(zip([s.name for s in manifest.outputs], outputs))
    return values


def verify_chain(
    model_path: Path, bundle_dirs: list[Path], batch: int = 2, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0
) -> Verification:
    first = read_manifest(bundle_dirs[0])
    inputs = ModelInputs(first.inputs, first.input_values, first.fixed_batch)
    batch = first.fixed_batch or batch
    feeds = random_inputs(inputs, batch, np.random.default_rng(seed), padded_masks=True)
    whole = cpu_session(model_path)
    names = [o.name for o in whole.get_outputs()]
    expected = dict(zip(names, whole.run(names, feeds)))
    del whole
    chained = run_chain(bundle_dirs, feeds)
    diffs = {}
    for name, reference in expected.items():
        if name not in chained:
            raise VerificationError(f"the last stage does not produce model output {name!r}")
        got = chained[name]
        if got.shape != reference.shape:
            raise VerificationError(f"output {name!r}: stages give shape {got.shape}, the model {reference.shape}")
        diffs[name] = float(np.max(np.abs(got.astype(np.float64) - reference.astype(np.float64)), initial=0.0))
    return Verification(diffs, tolerance, batch)
