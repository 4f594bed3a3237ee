"""Build and check what a plan's lossy choices deploy: int8 stages, compressed hops.

The planner predicts a plan's error by combining the measured effect of each lossy choice
(compiler/compression.py) with a conservative first-order rule. Here the chosen pipeline is run as
it will be deployed (the int8 stage bundles themselves, every hop's codec applied with
``codecs.roundtrip``) against the whole fp32 model on the calibration samples, and the measured
error is compared with the prediction and the user's budget. A plan over budget is refused, or
re-planned within a tighter budget (``compile_within_budget``), and the user is told which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from edgepipe.agent.formats import codecs
from edgepipe.agent.formats.bundle import GRAPH_NAME, TensorSpec, read_manifest
from edgepipe.compiler.calibration import (
    DEFAULT_SAMPLES,
    Calibration,
    file_calibration,
    noise_calibration,
    registry_calibration,
    timm_norm,
)
from edgepipe.compiler.compression import OutputError, cpu_session, is_classifier, output_error
from edgepipe.compiler.quantize import DEFAULT_SETTINGS, QuantSettings, quantize_bundle

# A fallback re-plan asks for this fraction of what the prediction under-estimated by.
TIGHTEN_MARGIN = 0.8


@dataclass(frozen=True)
class LossyOptions:
    """Every compile option about lossy choices, in one place (edgepipe-compile flags in brackets)."""

    max_error: Any = None  # edgepipe.planner.problem.ErrorBudget [--max-error]; None: no lossy plan
    calibration: Path | None = None  # [--calibration FILE|DIR]; None: registry example inputs / noise
    calibration_samples: int = DEFAULT_SAMPLES  # [--calibration-samples]
    int8_weights: str | None = None  # manual pipelines: "all" or "0,2" [--int8-weights]
    hop_codecs: str | None = None  # manual pipelines: "fp16" or "fp16,raw" [--hop-codecs]
    offer_int8: bool = True  # let the planner choose int8 weights [--no-int8 turns it off]
    threads: int = 0  # ONNX Runtime threads for measuring (0: all cores)

    @property
    def manual(self) -> bool:
        return self.int8_weights is not None or self.hop_codecs is not None


class ChoiceError(ValueError):
    """Per-stage choices (--int8-weights, --hop-codecs) that do not fit the pipeline."""


@dataclass(frozen=True)
class StageChoice:
    """What one stage deploys beyond its fp32 graph: int8 weights, and its output hop's codec."""

    int8_weights: bool = False
    codec_out: str = "raw"

    @property
    def lossy(self) -> bool:
        return self.int8_weights or self.codec_out != "raw"


def choices_from_plan(plan: Any) -> tuple[StageChoice, ...]:
    """The stages' choices in a plan (version 1 plans have none: all fp32, raw)."""
    if plan is None:
        return ()
    return tuple(StageChoice(bool(getattr(s, "int8_weights", False)), str(getattr(s, "codec_out", "raw")))
                 for s in plan.stages)


def parse_choices(stages: int, int8_weights: str | None, hop_codecs: str | None) -> tuple[StageChoice, ...]:
    """Choices for a pipeline of ``stages`` from the CLI: ``--int8-weights all|0,2`` and
    ``--hop-codecs fp16`` (every hop) or ``fp16,raw`` (one per hop; there are stages - 1 hops)."""
    int8 = [False] * stages
    if int8_weights:
        text = int8_weights.strip()
        if text == "all":
            int8 = [True] * stages
        else:
            for part in (p.strip() for p in text.split(",") if p.strip()):
                if not part.isdigit() or not 0 <= int(part) < stages:
                    raise ChoiceError(f"--int8-weights: {part!r} is not a stage index 0..{stages - 1} (or 'all')")
                int8[int(part)] = True
    hops = ["raw"] * (stages - 1)
    if hop_codecs:
        names = [c.strip() for c in hop_codecs.split(",") if c.strip()]
        unknown = [c for c in names if c not in codecs.CODECS]
        if unknown:
            raise ChoiceError(f"--hop-codecs: unknown codec {unknown[0]!r} (known: {', '.join(codecs.CODECS)})")
        if len(names) == 1:
            hops = names * (stages - 1)
        elif len(names) == stages - 1:
            hops = names
        else:
            raise ChoiceError(f"--hop-codecs: {len(names)} codecs for {stages - 1} hop(s); give one for every "
                              f"hop or one for all")
    return tuple(StageChoice(int8[k], hops[k] if k < stages - 1 else "raw") for k in range(stages))


def is_lossy(choices: Sequence[StageChoice]) -> bool:
    return any(c.lossy for c in choices)


def calibration_for(model_id: str, from_registry: bool, input_specs: Sequence[TensorSpec], path: Path | None,
                    samples: int, fixed_batch: int | None = None) -> Calibration:
    """The user's calibration data if given, else the registry's example inputs, else noise. A model
    fixed to one batch size (exported without a batch axis) is measured on exactly that many samples."""
    if fixed_batch is not None:
        samples = fixed_batch
    if path is not None:
        norm = timm_norm(model_id) if from_registry else None
        calibration = file_calibration(path, input_specs, samples, norm)
        if fixed_batch is not None and calibration.samples != fixed_batch:
            raise ChoiceError(f"--calibration {path}: the model takes batches of exactly {fixed_batch}; "
                              f"give at least {fixed_batch} samples")
        return calibration
    if from_registry:
        return registry_calibration(model_id, samples)
    return noise_calibration(input_specs, samples)


def quantize_stages(bundle_dirs: Sequence[Path], choices: Sequence[StageChoice],
                    settings: QuantSettings = DEFAULT_SETTINGS) -> list[int]:
    """Turn the bundles of stages marked ``int8_weights`` into their int8 twins; their indices."""
    if len(choices) != len(bundle_dirs):
        raise ChoiceError(f"{len(choices)} stage choices for {len(bundle_dirs)} stage bundles")
    done = []
    for k, (bundle_dir, choice) in enumerate(zip(bundle_dirs, choices)):
        if choice.int8_weights and read_manifest(bundle_dir).quantization is None:
            quantize_bundle(bundle_dir, settings)
            done.append(k)
    return done


def deploy_lossy_choices(model_id: str, from_registry: bool, model_path: Path, input_specs: Sequence[TensorSpec],
                         bundle_dirs: Sequence[Path], plan: Any, options: LossyOptions, check: bool = True,
                         fixed_batch: int | None = None) -> AccuracyCheck | None:
    """The compile step after slicing (and the exact fp32 verification): quantize the stages the plan
    (or --int8-weights) marks, then measure the deployed pipeline (with its hop codecs) against the
    whole model. None when nothing is lossy and no budget asks for a check."""
    if options.manual:
        if plan is not None and is_lossy(choices_from_plan(plan)):
            raise ChoiceError("--int8-weights/--hop-codecs choose by hand; this plan already makes its own choices")
        choices = parse_choices(len(bundle_dirs), options.int8_weights, options.hop_codecs)
    else:
        choices = choices_from_plan(plan) or tuple(StageChoice() for _ in bundle_dirs)
    # a plan file made within a budget (edgepipe-plan --max-error) is checked against that budget
    budget = options.max_error if options.max_error is not None else getattr(plan, "max_error", None)
    if not is_lossy(choices) and budget is None:
        return None
    quantize_stages(bundle_dirs, choices)
    if not check and budget is None:
        return None
    calibration = calibration_for(model_id, from_registry, input_specs, options.calibration,
                                  options.calibration_samples, fixed_batch)
    predicted = getattr(plan, "predicted_error", None)
    return check_deployed(model_path, bundle_dirs, choices, calibration, budget,
                          None if predicted is None else OutputError(predicted.max_abs_diff, predicted.cosine,
                                                                     predicted.top1_agreement),
                          options.threads)


def run_deployed(bundle_dirs: Sequence[Path], choices: Sequence[StageChoice], feeds: dict[str, np.ndarray],
                 threads: int = 0) -> dict[str, np.ndarray]:
    """The pipeline's outputs as deployed: each bundle as it is on disk (int8 or not), each stage's
    outputs passed through its hop's codec (what the next stage decodes)."""
    values = dict(feeds)
    for k, bundle_dir in enumerate(bundle_dirs):
        manifest = read_manifest(bundle_dir)
        session = cpu_session(bundle_dir / GRAPH_NAME, threads)
        names = [s.name for s in manifest.outputs]
        outputs = session.run(names, {s.name: values[s.name] for s in manifest.inputs})
        del session
        codec = choices[k].codec_out if k + 1 < len(bundle_dirs) else "raw"
        values.update({name: codecs.roundtrip(arr, codec) for name, arr in zip(names, outputs)})
    return values


@dataclass(frozen=True)
class AccuracyCheck:
    """The deployed pipeline's measured error, against its prediction and the budget."""

    measured: OutputError
    predicted: OutputError | None
    budget: dict[str, float | None] | None  # max_abs_diff / cosine / top1_agreement limits, or None
    samples: int
    calibration: str
    int8_stages: tuple[int, ...]
    hop_codecs: tuple[str, ...]
    fallback: str | None = None  # what was done because an earlier plan exceeded the budget

    @property
    def within_budget(self) -> bool | None:
        return None if self.budget is None else within(self.measured, self.budget)

    def to_dict(self) -> dict[str, Any]:
        return {
            "measured": self.measured.to_dict(),
            "predicted": None if self.predicted is None else self.predicted.to_dict(),
            "max_error": self.budget,
            "within_budget": self.within_budget,
            "samples": self.samples,
            "calibration": self.calibration,
            "int8_stages": list(self.int8_stages),
            "hop_codecs": list(self.hop_codecs),
            "fallback": self.fallback,
        }


def budget_dict(budget: Any) -> dict[str, float | None] | None:
    """An ErrorBudget (edgepipe.planner.problem) as the plain limits this module compares with."""
    if budget is None:
        return None
    return {"max_abs_diff": budget.max_abs_diff, "cosine": budget.cosine, "top1_agreement": budget.top1_agreement}


def within(error: OutputError, budget: dict[str, float | None]) -> bool:
    """Every limit the budget names holds (top-1 agreement only when the model is a classifier)."""
    ok = True
    if budget.get("max_abs_diff") is not None:
        ok &= error.max_abs_diff <= budget["max_abs_diff"]
    if budget.get("cosine") is not None:
        ok &= error.cosine >= budget["cosine"]
    if budget.get("top1_agreement") is not None and error.top1_agreement is not None:
        ok &= error.top1_agreement >= budget["top1_agreement"]
    return bool(ok)


def check_deployed(model_path: Path, bundle_dirs: Sequence[Path], choices: Sequence[StageChoice],
                   calibration: Calibration, budget: Any = None, predicted: OutputError | None = None,
                   threads: int = 0) -> AccuracyCheck:
    """Measure the deployed pipeline against the whole fp32 model at ``model_path``."""
    whole = cpu_session(model_path, threads)
    names = [o.name for o in whole.get_outputs()]
    feeds = {name: calibration.feeds[name] for name in (i.name for i in whole.get_inputs())}
    reference = whole.run(names, feeds)
    del whole
    got = run_deployed(bundle_dirs, choices, dict(feeds), threads)
    missing = [n for n in names if n not in got]
    if missing:
        raise ChoiceError(f"the last stage does not produce model output(s) {missing}")
    last = read_manifest(bundle_dirs[-1])
    classifier = is_classifier([next(s for s in last.outputs if s.name == n) for n in names])
    measured = output_error(reference, [got[n] for n in names], classifier)
    return AccuracyCheck(
        measured=measured,
        predicted=predicted,
        budget=budget_dict(budget),
        samples=calibration.samples,
        calibration=calibration.source,
        int8_stages=tuple(k for k, c in enumerate(choices) if c.int8_weights),
        hop_codecs=tuple(c.codec_out for c in choices[:-1]),
    )


def tightened(budget: Any, predicted: OutputError, measured: OutputError) -> Any:
    """A budget under which the planner's predictions, which under-estimated this plan's error, would
    have kept the measured error within ``budget``: each named limit shrunk by how far the prediction
    fell short, times a margin. Same type as ``budget`` (the planner's ErrorBudget)."""

    def scale(allowed: float, pred: float, meas: float) -> float:
        if meas <= 0 or pred >= meas:
            return allowed * TIGHTEN_MARGIN
        return allowed * TIGHTEN_MARGIN * pred / meas

    changes: dict[str, float] = {}
    if budget.max_abs_diff is not None:
        changes["max_abs_diff"] = scale(budget.max_abs_diff, predicted.max_abs_diff, measured.max_abs_diff)
    if budget.cosine is not None:
        allowed = math.acos(min(1.0, budget.cosine))
        angle = scale(allowed, math.acos(min(1.0, predicted.cosine)), math.acos(min(1.0, measured.cosine)))
        changes["cosine"] = math.cos(angle)
    if budget.top1_agreement is not None and measured.top1_agreement is not None:
        pred = 1.0 - (predicted.top1_agreement if predicted.top1_agreement is not None else 1.0)
        changes["top1_agreement"] = 1.0 - scale(1.0 - budget.top1_agreement, pred, 1.0 - measured.top1_agreement)
    return replace(budget, **changes)


@dataclass(frozen=True)
class BudgetedBuild:
    plan: Any
    result: Any  # CompileResult whose ``accuracy`` is an AccuracyCheck (or None for an fp32 plan)
    notes: tuple[str, ...]  # what was re-planned and why, for the user


def compile_within_budget(budget: Any, first_plan: Any, replan: Callable[[Any], Any],
                          build: Callable[[Any], Any]) -> BudgetedBuild:
    """Build ``first_plan`` (made within ``budget``) and measure it. If the deployed error exceeds the
    budget, re-plan once within a budget tightened by how far the prediction fell short; if that still
    exceeds it, fall back to the plan without lossy choices (exact, so within any budget).
    ``replan(budget)`` returns a plan (budget None: no lossy choices); ``build(plan)`` compiles it and
    returns a result whose ``accuracy`` is an AccuracyCheck."""
    notes: list[str] = []
    plan = first_plan
    result = build(plan)
    check = result.accuracy
    if check is None or check.within_budget is not False:
        return BudgetedBuild(plan, result, ())
    notes.append(f"measured error ({check.measured.describe()}) exceeds the budget; the prediction was "
                 f"{check.predicted.describe() if check.predicted else 'not available'}")
    if check.predicted is not None:
        tighter = tightened(budget, check.predicted, check.measured)
        notes.append("re-planned within a tighter budget " + _describe_budget(budget_dict(tighter)))
        plan = replan(tighter)
        result = build(plan)
        check = result.accuracy
        if check is None or check.within_budget is not False:
            result = _with_fallback(result, notes)
            return BudgetedBuild(plan, result, tuple(notes))
        notes.append(f"still over budget ({check.measured.describe()})")
    notes.append("fell back to the plan without lossy choices (fp32 weights, raw hops)")
    plan = replan(None)
    result = build(plan)
    return BudgetedBuild(plan, _with_fallback(result, notes), tuple(notes))


def _with_fallback(result: Any, notes: list[str]) -> Any:
    if result.accuracy is None:
        return result
    return replace(result, accuracy=replace(result.accuracy, fallback="; ".join(notes)))


def _describe_budget(budget: dict[str, float | None] | None) -> str:
    if not budget:
        return "(none)"
    parts = [f"{k}={v:.6g}" for k, v in budget.items() if v is not None]
    return "(" + ", ".join(parts) + ")"
