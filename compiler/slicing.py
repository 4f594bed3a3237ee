"""Slice an ONNX model at chosen cuts into one self-contained stage bundle per pipeline stage.

The model is opened with onnx_ir, which memory-maps external weights, so slicing ViT-Huge never
holds its 2.5 GB of weights in RAM at once: each stage's weights are streamed from the map into that
stage's own ``stage.onnx.data``. ``onnx_ir.convenience.extract`` refuses a stage whose inputs do not
bound it (a cut that is not clean), so a bad cut can never silently pull in upstream nodes.

A stage that starts at a cut with rebuilt values (masks, shapes; compiler/cuts.py) gets its own
copy of the nodes computing them, fed by what it receives: the nodes are inserted into the graph in
front of the stage, the stage's consumers are pointed at them, the stage is extracted (a copy), and
the graph is put back as it was. In the stage the copies carry the original value names, so every
stage computes the same named values as the whole model.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
from edgepipe.agent.formats.bundle import (
    DATA_NAME,
    GRAPH_NAME,
    InputValues,
    StageManifest,
    TensorSpec,
    file_entries,
    write_manifest,
)
from edgepipe.compiler.cuts import Cut, CutError, chain_cuts, stage_boundaries
from edgepipe.compiler.derived import REBUILT_SUFFIX, rebuild_nodes
from edgepipe.compiler.graph import SCOPES_KEY, GraphIndex, index_graph, numpy_dtype_name, tensor_bytes

# Exporter metadata that only bloats a stage file (stack traces are most of a graph's bytes).
_KEEP_METADATA = (SCOPES_KEY,)


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    model_sha256: str
    settings: dict[str, Any]
    input_values: Mapping[str, InputValues] = field(default_factory=dict)  # per model input


def stage_dir_name(index: int) -> str:
    return f"stage-{index}"


def slice_model(
    model: ir.Model,
    cuts: list[Cut],
    out_dir: Path,
    identity: ModelIdentity,
    on_stage: Callable[[int], None] | None = None,
    index: GraphIndex | None = None,
) -> list[Path]:
    """Write ``len(cuts) + 1`` bundles ``out_dir/stage-K`` and return their directories.

    ``model`` should come from ``ir.load`` (weights memory-mapped). Existing stage directories
    in ``out_dir`` are replaced, so a recompile with fewer stages leaves no stale bundle behind.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("stage-*"):
        if stale.is_dir():
            shutil.rmtree(stale)
    index = index or index_graph(model.graph)
    cuts = chain_cuts(index, cuts)
    labels: list[str | None] = [None, *[c.label for c in cuts], None]
    forwarded: list[tuple[str, ...]] = [(), *[c.forwarded for c in cuts]]
    bundle_dirs = []
    for k, stage in stage_models(model, cuts, index):
        bundle_dir = out_dir / stage_dir_name(k)
        write_stage(stage, bundle_dir, identity, k, len(cuts) + 1, labels[k], labels[k + 1], forwarded[k])
        bundle_dirs.append(bundle_dir)
        del stage  # free this stage's graph before extracting the next
        if on_stage is not None:
            on_stage(k)
    return bundle_dirs


def stage_models(model: ir.Model, cuts: list[Cut], index: GraphIndex | None = None) -> Iterator[tuple[int, ir.Model]]:
    """(k, stage k as its own model) for the stages ``cuts`` make, first to last, one at a time."""
    index = index or index_graph(model.graph)
    cuts = chain_cuts(index, cuts)
    ends = [*[c.position for c in cuts], index.size]
    for k, (inputs, outputs) in enumerate(stage_boundaries(model.graph, cuts)):
        cut_in = cuts[k - 1] if k > 0 else None
        with rebuilt_in_stage(model.graph, index, cut_in, ends[k]) as rebuilt:
            stage = extract_stage(model, inputs, outputs, k, rebuilt)
        yield k, stage


@contextlib.contextmanager
def rebuilt_in_stage(graph: ir.Graph, index: GraphIndex, cut: Cut | None, end: int) -> Iterator[dict[str, ir.Value]]:
    """While open: the nodes rebuilding ``cut.rebuilt`` sit in front of the stage starting at ``cut``
    (and ending before node ``end``), and the stage reads them. Yields original name -> rebuilt value."""
    if cut is None or not cut.rebuilt:
        yield {}
        return
    received = [value_named(graph, index, name) for name in cut.sent]
    new_nodes, rebuilt = rebuild_nodes(index.nodes, index.derivations, cut.rebuilt, received)
    graph.insert_before(index.nodes[cut.position], new_nodes)
    rewired: list[tuple[ir.Node, int, ir.Value]] = []
    try:
        for node in index.nodes[cut.position:end]:
            for i, value in enumerate(node.inputs):
                if value is not None and value.name in rebuilt:
                    node.replace_input_with(i, rebuilt[value.name])
                    rewired.append((node, i, value))
        yield rebuilt
    finally:
        for node, i, value in rewired:
            node.replace_input_with(i, value)
        graph.remove(new_nodes, safe=True)


def value_named(graph: ir.Graph, index: GraphIndex, name: str) -> ir.Value:
    """The graph input or node output called ``name`` (an activation)."""
    position = index.produced_at[name]
    if position < 0:
        return next(v for v in graph.inputs if v.name == name)
    return next(v for v in index.nodes[position].outputs if v.name == name)


def extract_stage(model: ir.Model, inputs: list[str], outputs: list[str], index: int,
                  rebuilt: Mapping[str, ir.Value] | None = None) -> ir.Model:
    """Stage ``index`` of ``model``: the nodes between ``inputs`` and ``outputs``, with only the weights
    they read. ``rebuilt`` maps output names the stage recomputes (see rebuilt_in_stage) to its copies."""
    rebuilt = rebuilt or {}
    try:
        graph = ir.convenience.extract(model.graph, inputs, [rebuilt.get(name, name) for name in outputs])
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
        for out in node.outputs:
            if out.name and out.name.endswith(REBUILT_SUFFIX):
                out.name = out.name[: -len(REBUILT_SUFFIX)]  # the stage holds only the copy
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
    forwarded: tuple[str, ...] = (),
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
        forwarded=forwarded,
        input_values={v.name: identity.input_values[v.name] for v in stage.graph.inputs
                      if v.name in identity.input_values and (index == 0 or v.name in forwarded)},
        fixed_batch=fixed_batch(stage.graph.inputs),
    )
    write_manifest(bundle_dir, manifest)
    return manifest


def fixed_batch(inputs: list[ir.Value] | tuple[ir.Value, ...]) -> int | None:
    """The batch size a graph is fixed to (axis 0 of its first input is a number), else None."""
    if not inputs or inputs[0].shape is None or len(inputs[0].shape) == 0:
        return None
    first = inputs[0].shape[0]
    return first if isinstance(first, int) else None


def tensor_spec(value: ir.Value) -> TensorSpec:
    if value.dtype is None:
        raise CutError(f"tensor {value.name!r} has no known element type; run shape inference on the model")
    shape: tuple[int | str, ...]
    if value.shape is None:
        shape = ("batch",)
    else:
        shape = tuple(d if isinstance(d, int) else str(d.value or "?") for d in value.shape)
    return TensorSpec(value.name, numpy_dtype_name(value.dtype), shape)
