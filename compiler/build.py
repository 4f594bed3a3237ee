"""From a model name or ONNX file to verified stage bundles: the compiler's one entry point.

    source -> export (cached) -> cut discovery -> choose cuts -> slice -> verify -> compile.json

Cuts come from, in order of precedence: an explicit list (``cuts``), a plan file, a cluster file
(the planner chooses devices and cuts), or ``stages`` (N stages balanced by estimated FLOPs over
the model's natural boundaries). Whatever chose them, the result says how evenly the stages share
the work and warns, with the reason, about a stage far off its share (compiler/balance.py).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
from edgepipe.compiler.balance import Balance, check_balance
from edgepipe.compiler.cuts import Cut, CutError, chain_cuts, find_cuts, natural_cuts, resolve_cuts
from edgepipe.compiler.export import DEFAULT_OPSET, export_model, sha256_files
from edgepipe.compiler.graph import GraphIndex, index_graph, input_values_from_graph, tidy_shapes
from edgepipe.compiler.segments import balanced_partition, model_spec
from edgepipe.compiler.slicing import ModelIdentity, slice_model
from edgepipe.compiler.verify import DEFAULT_TOLERANCE, Verification, VerificationError, verify_chain
from edgepipe.models.registry import get_model
from edgepipe.planner.problem import ModelSpec

COMPILE_SUMMARY = "compile.json"

# Progress callback: (step name, fraction done 0..1).
Progress = Callable[[str, float], None]


class CompileError(RuntimeError):
    """Anything that stops a compile, with a message meant for the user."""


@dataclass(frozen=True)
class LoadedModel:
    model: ir.Model
    path: Path
    identity: ModelIdentity
    index: GraphIndex
    natural_pattern: str | None
    export_cached: bool
    source: str = "export"  # "export" (a registry model, exported or from the cache) or "onnx" (--onnx FILE)
    exporter: str | None = None  # which exporter made it (None: an ONNX file from elsewhere)

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model is fixed to (exported without a batch axis), else None."""
        return self.index.batch_dim if isinstance(self.index.batch_dim, int) else None


@dataclass(frozen=True)
class CompileResult:
    model_id: str
    model_sha256: str
    model_path: Path  # the whole model (for baselines and reference outputs)
    out_dir: Path
    bundle_dirs: list[Path]
    cuts: list[Cut]
    verification: Verification | None
    export_cached: bool
    plan: Any = None  # edgepipe.planner.plan.Plan when a cluster or plan chose the cuts
    stage_rows: list[dict[str, Any]] = field(default_factory=list)
    balance: Balance | None = None
    source: str = "export"
    exporter: str | None = None
    fixed_batch: int | None = None
    accuracy: Any = None  # compiler.plan_check.AccuracyCheck when stages are int8 or hops compressed


def load_model(
    model: str | None = None,
    onnx: Path | None = None,
    checkpoint: Path | None = None,
    opset: int = DEFAULT_OPSET,
    progress: Progress | None = None,
) -> LoadedModel:
    """Export a registry model (cached) or open an ONNX file; weights stay memory-mapped."""
    if model is None and onnx is None:
        raise CompileError("give a model name (see --list-models) or --onnx FILE")
    if model is not None and onnx is not None:
        raise CompileError("give either a model name or --onnx FILE, not both")
    if onnx is not None:
        if checkpoint is not None:
            raise CompileError("--checkpoint loads weights into a registry model; an ONNX file has its own")
        path = Path(onnx)
        if not path.is_file():
            raise CompileError(f"ONNX file {path} does not exist")
        loaded = _with_shapes(_load_ir(path), path)
        tidy_shapes(loaded.graph)  # exporters leave constant dimension expressions like (32*n)//n
        identity = ModelIdentity(path.stem, sha256_files(_model_files(path, loaded)), {"source": "onnx"},
                                 input_values_from_graph(loaded.graph))
        return LoadedModel(loaded, path, identity, index_graph(loaded.graph), None, False, source="onnx")

    entry = get_model(model)  # type: ignore[arg-type]
    if progress:
        progress(f"exporting {entry.name}", 0.0)
    exported = export_model(entry, checkpoint=checkpoint, opset=opset)
    loaded = _load_ir(exported.path)  # tidied when exported
    identity = ModelIdentity(entry.name, exported.model_sha256, exported.settings, entry.input_values)
    return LoadedModel(loaded, exported.path, identity, index_graph(loaded.graph), entry.natural_cuts,
                       exported.cached, source="export", exporter=exported.settings["exporter"])


def _load_ir(path: Path) -> ir.Model:
    try:
        model = ir.load(path)
    except Exception as exc:
        raise CompileError(f"{path}: not a readable ONNX model: {exc}") from exc
    return model


def _model_files(path: Path, model: ir.Model) -> list[Path]:
    files = {path}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(tensor.path))
    return sorted(files)


def _with_shapes(model: ir.Model, path: Path) -> ir.Model:
    """Run ONNX shape inference when intermediate tensors lack shapes (hand-made or old exports)."""
    graph = model.graph
    produced = [v for node in graph for v in node.outputs]
    if all(v.shape is not None and v.dtype is not None for v in produced):
        return model
    from onnx_ir.passes.common import ShapeInferencePass

    try:
        return ShapeInferencePass(strict_mode=False).call(model).model
    except Exception as exc:
        raise CompileError(f"{path}: shape inference failed ({exc}); export the model with value_info") from exc


def candidate_cuts(loaded: LoadedModel, max_tensors: int = 1) -> list[Cut]:
    return find_cuts(loaded.index, max_tensors=max_tensors)


def spec_for(loaded: LoadedModel, cuts: list[Cut]) -> ModelSpec:
    graph = loaded.model.graph
    return model_spec(loaded.index, cuts, loaded.identity.model_id, loaded.identity.model_sha256,
                      outputs=[v.name for v in graph.outputs], inputs=[v.name for v in graph.inputs])


def balanced_cuts(loaded: LoadedModel, stages: int, candidates: list[Cut]) -> list[Cut]:
    """N stages with FLOPs as even as the natural boundaries (block inputs) allow; all candidate
    cuts (block halves, stems, heads) are used when they split more evenly, e.g. when N is close to
    the number of blocks."""
    if stages < 1:
        raise CompileError(f"--stages must be at least 1, got {stages}")
    if stages - 1 > len(candidates):
        raise CompileError(f"asked for {stages} stages but the model has only {len(candidates)} cut points "
                           f"(try --max-tensors 2 for sub-block cuts)")
    if stages == 1:
        return []
    best: tuple[float, list[Cut]] | None = None
    pools = [natural_cuts(candidates, loaded.natural_pattern), candidates]
    for pool in pools:
        if stages - 1 > len(pool):
            continue
        flops = [s.flops for s in spec_for(loaded, pool).segments]
        starts = balanced_partition(flops, stages)
        bounds = [0, *starts, len(flops)]
        bottleneck = max(sum(flops[a:b]) for a, b in itertools.pairwise(bounds))
        # The natural boundaries win unless the finer cuts shorten the slowest stage by over 10%.
        if best is None or bottleneck < 0.9 * best[0]:
            best = (bottleneck, [pool[i - 1] for i in starts])
    assert best is not None
    return best[1]


def compile_model(
    model: str | None,
    out_dir: Path,
    *,
    onnx: Path | None = None,
    stages: int | None = None,
    cuts: list[str] | None = None,
    plan: Any = None,
    checkpoint: Path | None = None,
    opset: int = DEFAULT_OPSET,
    max_tensors: int = 1,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: Progress | None = None,
    lossy: Any = None,
) -> CompileResult:
    """Compile ``model`` into bundles in ``out_dir/stage-K``.

    ``plan`` is an ``edgepipe.planner.plan.Plan``; its stages' ``cut_in`` labels are the cuts.
    ``lossy`` (compiler.plan_check.LossyOptions) holds the options about int8 weights and codecs.
    """
    out_dir = Path(out_dir)
    loaded = load_model(model, onnx, checkpoint, opset, progress)
    # A plan made at sub-block granularity names multi-tensor cuts; a label names one position
    # whatever the width, so look wide enough to find them.
    candidates = candidate_cuts(loaded, max_tensors=max_tensors if plan is None else max(max_tensors, 4))
    if cuts:
        chosen = resolve_cuts(loaded.index, candidates, cuts)
    elif plan is not None:
        labels = [s.cut_in for s in plan.stages[1:]]
        if plan.model_sha256 and plan.model_sha256 != loaded.identity.model_sha256:
            raise CompileError(
                f"the plan was made for model hash {plan.model_sha256[:12]}, this model is "
                f"{loaded.identity.model_sha256[:12]}; re-plan for this model"
            )
        chosen = resolve_cuts(loaded.index, candidates, labels)
    else:
        chosen = balanced_cuts(loaded, 1 if stages is None else stages, candidates)
    chosen = chain_cuts(loaded.index, chosen)
    balance = check_balance(loaded.index, chosen, max_tensors)

    total = len(chosen) + 1

    def on_stage(k: int) -> None:
        if progress:
            progress(f"slicing stage {k + 1}/{total}", (k + 1) / total)

    if progress:
        progress("slicing", 0.0)
    bundle_dirs = slice_model(loaded.model, chosen, out_dir, loaded.identity, on_stage=on_stage, index=loaded.index)
    verification = None
    if verify:
        if progress:
            progress("verifying chained stages against the whole model", 1.0)
        verification = verify_chain(loaded.path, bundle_dirs, batch=loaded.fixed_batch or 2, tolerance=tolerance)
    accuracy = None
    if verification is None or verification.passed:  # slicing is exact; only then add lossy choices
        accuracy = lossy_step(loaded, bundle_dirs, plan, lossy, verify, progress)
    result = CompileResult(
        model_id=loaded.identity.model_id,
        model_sha256=loaded.identity.model_sha256,
        model_path=loaded.path,
        out_dir=out_dir,
        bundle_dirs=bundle_dirs,
        cuts=chosen,
        verification=verification,
        export_cached=loaded.export_cached,
        plan=plan,
        stage_rows=stage_rows(bundle_dirs, plan, balance),
        balance=balance,
        source=loaded.source,
        exporter=loaded.exporter,
        fixed_batch=loaded.fixed_batch,
        accuracy=accuracy,
    )
    write_summary(result)
    if verification is not None and not verification.passed:
        raise VerificationError(
            f"chained stages differ from the whole model by {verification.worst:.3g} "
            f"(tolerance {verification.tolerance:g}); bundles left in {out_dir} for inspection"
        )
    return result


def lossy_step(loaded: LoadedModel, bundle_dirs: list[Path], plan: Any, lossy: Any, verify: bool,
               progress: Progress | None) -> Any:
    """int8 stages and compressed hops (compiler/plan_check.py): quantize what the plan marks and
    measure the deployed pipeline's error against the whole model."""
    from edgepipe.compiler.plan_check import LossyOptions, choices_from_plan, deploy_lossy_choices, is_lossy
    from edgepipe.compiler.slicing import tensor_spec

    if lossy is None and not is_lossy(choices_from_plan(plan)):
        return None
    if progress:
        progress("int8 stages and hop codecs: measuring the deployed pipeline", 1.0)
    return deploy_lossy_choices(
        loaded.identity.model_id, loaded.source != "onnx", loaded.path,
        [tensor_spec(v) for v in loaded.model.graph.inputs], bundle_dirs, plan, lossy or LossyOptions(), verify,
        loaded.fixed_batch)


def stage_rows(bundle_dirs: list[Path], plan: Any = None, balance: Balance | None = None) -> list[dict[str, Any]]:
    """One summary row per stage; with a plan, the device each bundle is meant for."""
    from edgepipe.agent.formats.bundle import read_manifest

    rows = []
    for k, bundle_dir in enumerate(bundle_dirs):
        m = read_manifest(bundle_dir)
        out_bytes = [o.bytes_per_sample() for o in m.outputs]
        rows.append({
            "gflop": balance.stage_flops[k] / 1e9 if balance is not None else None,
            "forwarded_in": list(m.forwarded),
            "stage": m.stage_index,
            "dir": str(bundle_dir),
            "cut_in": m.cut_in,
            "cut_out": m.cut_out,
            "weight_bytes": m.weight_bytes,
            "params": (m.weight_bytes if m.quantization is None else m.quantization.float_weight_bytes) // 4,
            "out_bytes_per_sample": None if None in out_bytes else sum(out_bytes),
            "weights": "float32" if m.quantization is None else m.quantization.weights,
            "outputs": [o.name for o in m.outputs],
            "device": plan.stages[k].device if plan is not None else None,
        })
    return rows


def write_summary(result: CompileResult) -> Path:
    summary = {
        "format": "edgepipe.compile-summary",
        "format_version": 1,
        "model_id": result.model_id,
        "model_sha256": result.model_sha256,
        "model_path": str(result.model_path),
        "source": result.source,
        "exporter": result.exporter,
        "fixed_batch": result.fixed_batch,
        "cuts": [cut_summary(c) for c in result.cuts],
        "stages": result.stage_rows,
        "balance": None if result.balance is None else {
            "stage_gflop": [f / 1e9 for f in result.balance.stage_flops],
            "worst_over_mean": result.balance.worst_ratio,
            "least_over_mean": result.balance.least_ratio,
            "warnings": list(result.balance.warnings),
        },
        "verification": None if result.verification is None else {
            "max_abs_diff": result.verification.max_abs_diff,
            "tolerance": result.verification.tolerance,
            "batch": result.verification.batch,
            "passed": result.verification.passed,
        },
        "accuracy": None if result.accuracy is None else result.accuracy.to_dict(),
    }
    path = result.out_dir / COMPILE_SUMMARY
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def cut_summary(cut: Cut) -> dict[str, Any]:
    """A cut as compile.json and --list-cuts --json describe it."""
    return {"label": cut.label, "position": cut.position, "tensors": list(cut.tensors),
            "forwarded": list(cut.forwarded), "rebuilt": list(cut.rebuilt), "bytes_per_sample": cut.bytes_per_sample,
            "rebuilt_bytes_per_sample": cut.rebuilt_bytes_per_sample}


__all__ = ["CompileError", "CompileResult", "CutError", "VerificationError", "compile_model", "load_model"]
