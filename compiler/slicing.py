"""Slice an ONNX model at chosen cuts into one self-contained stage bundle per pipeline stage.

The model is opened with onnx_ir, which memory-maps external weights, so slicing ViT-Huge never
holds its 2.5 GB of weights in RAM at once: each stage's weights are streamed from the map into that
stage's own ``stage.onnx.data``. ``onnx_ir.convenience.extract`` refuses a stage whose inputs do not
bound it (a cut that is not clean), so a bad cut can never silently pull in upstream nodes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir
from edgepipe.agent.formats.bundle import (
    DATA_NAME,
    GRAPH_NAME,
    StageManifest,
    TensorSpec,
    file_entries,
    write_manifest,
)
from edgepipe.compiler.cuts import Cut, CutError, stage_boundaries
from edgepipe.compiler.graph import SCOPES_KEY, numpy_dtype_name, tensor_bytes

# Exporter metadata that only bloats a stage file (stack traces are most of a graph's bytes).
_KEEP_METADATA = (SCOPES_KEY,)


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    model_sha256: str
    settings: dict[str, Any]


def stage_dir_name(index: int) -> str:
    return f"stage-{index}"


def slice_model(
    model: ir.Model,
    cuts: list[Cut],
    out_dir: Path,
    identity: ModelIdentity,
    on_stage: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write ``len(cuts) + 1`` bundles ``out_dir/stage-K`` and return their directories.

    ``model`` should come from ``ir.load`` (weights memory-mapped). Existing stage directories
    in ``out_dir`` are replaced, so a recompile with fewer stages leaves no stale bundle behind.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("stage-*"):
        if stale.is_dir():
            shutil.rmtree(stale)
    boundaries = stage_boundaries(model.graph, cuts)
    labels: list[str | None] = [None, *[c.label for c in cuts], None]
    bundle_dirs = []
    for k, (inputs, outputs) in enumerate(boundaries):
        bundle_dir = out_dir / stage_dir_name(k)
        stage = extract_stage(model, inputs, outputs, k)
        write_stage(stage, bundle_dir, identity, k, len(boundaries), labels[k], labels[k + 1])
        bundle_dirs.append(bundle_dir)
        del stage  # free this stage's graph before extracting the next
        if on_stage is not None:
            on_stage(k)
    return bundle_dirs


def extract_stage(model: ir.Model, inputs: list[str], outputs: list[str], index: int) -> ir.Model:
    try:
        graph = ir.convenience.extract(model.graph, inputs, outputs)
    except ValueError as exc:
        raise CutError(f"stage {index} (inputs {inputs}) is not a clean cut: {exc}") from exc
    graph.name = f"stage_{index}"
    # extract collects initializers through a set, so their order (and the bytes of stage.onnx and
    # its data file) would change from one compile to the next; sorted, an unchanged stage is
    # byte for byte the same and a redeploy need not send it again.
    initializers = sorted(graph.initializers.items())
    graph.initializers.clear()
    for _, value in initializers:
        graph.initializers.add(value)
    for node in graph:
        for key in [k for k in node.metadata_props if k not in _KEEP_METADATA]:
            del node.metadata_props[key]
    return ir.Model(
        graph,
        ir_version=model.ir_version,
        producer_name="edgepipe",
        functions=list(model.functions.values()),
    )


def write_stage(
    stage: ir.Model,
    bundle_dir: Path,
    identity: ModelIdentity,
    index: int,
    count: int,
    cut_in: str | None,
    cut_out: str | None,
) -> StageManifest:
    bundle_dir.mkdir(parents=True, exist_ok=True)
    ir.save(stage, bundle_dir / GRAPH_NAME, external_data=DATA_NAME)
    names = [GRAPH_NAME] + ([DATA_NAME] if (bundle_dir / DATA_NAME).is_file() else [])
    manifest = StageManifest(
        model_id=identity.model_id,
        model_sha256=identity.model_sha256,
        stage_index=index,
        stage_count=count,
        inputs=tuple(tensor_spec(v) for v in stage.graph.inputs),
        outputs=tuple(tensor_spec(v) for v in stage.graph.outputs),
        files=file_entries(bundle_dir, names),
        cut_in=cut_in,
        cut_out=cut_out,
        weight_bytes=sum(tensor_bytes(v) for v in stage.graph.initializers.values()),
        compile_settings=identity.settings,
    )
    write_manifest(bundle_dir, manifest)
    return manifest


def tensor_spec(value: ir.Value) -> TensorSpec:
    if value.dtype is None:
        raise CutError(f"tensor {value.name!r} has no known element type; run shape inference on the model")
    shape: tuple[int | str, ...]
    if value.shape is None:
        shape = ("batch",)
    else:
        shape = tuple(d if isinstance(d, int) else str(d.value or "?") for d in value.shape)
    return TensorSpec(value.name, numpy_dtype_name(value.dtype), shape)
