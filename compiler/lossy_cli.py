"""edgepipe-compile's lossy options (--max-error, --calibration, --int8-weights, --hop-codecs): the
steps cli.py calls, kept here so the command's own module only gains a few calls.

    options   = lossy_options(...)                       flags -> LossyOptions (one place)
    problem   = add_lossy_measurements(...)               measured codecs/int8 into the planner's problem
    result    = build_within_budget(...)                  compile, measure, re-plan or refuse
    print_accuracy(result.accuracy, console)             predicted vs measured, in the result table
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepipe.compiler.plan_check import (
    AccuracyCheck,
    ChoiceError,
    LossyOptions,
    calibration_for,
    compile_within_budget,
)
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class BudgetExceeded(RuntimeError):
    """The deployed pipeline's measured error is over the user's budget and nothing safer was possible."""


def parse_budget(text: str) -> Any:
    """``--max-error`` through the planner's own parser (Planner v2: ``parse_error_budget``)."""
    from edgepipe.planner import problem as planner_problem

    parse = getattr(planner_problem, "parse_error_budget", None)
    if parse is None:
        raise ChoiceError("--max-error needs the planner with error budgets (edgepipe.planner.problem v2)")
    return parse(text)


def lossy_options(max_error: str | None, calibration: Path | None, calibration_samples: int,
                  int8_weights: str | None, hop_codecs: str | None, offer_int8: bool) -> LossyOptions | None:
    """The flags as LossyOptions; None when none of them was given (plain fp32 compile)."""
    if max_error is None and calibration is None and int8_weights is None and hop_codecs is None:
        return None
    if calibration_samples < 1:
        raise ChoiceError(f"--calibration-samples must be at least 1, got {calibration_samples}")
    if calibration is not None and not Path(calibration).exists():  # before minutes of export and slicing
        raise ChoiceError(f"--calibration {calibration}: no such file or directory")
    return LossyOptions(max_error=None if max_error is None else parse_budget(max_error), calibration=calibration,
                        calibration_samples=calibration_samples, int8_weights=int8_weights, hop_codecs=hop_codecs,
                        offer_int8=offer_int8)


def add_lossy_measurements(loaded: Any, cuts: list, problem: Any, options: LossyOptions | None, quiet: bool,
                           err: Console) -> Any:
    """With a budget: ``problem`` plus every cut's codec effects and every segment's int8 effect
    (measured, or reused from the cache) and the budget itself. Without one: ``problem`` unchanged."""
    if options is None or options.max_error is None:
        return problem
    if options.manual:
        raise ChoiceError("--int8-weights/--hop-codecs choose by hand; with --cluster and --max-error the planner "
                          "chooses")
    from edgepipe.compiler.compression import attach_to_problem, measure_lossy
    from edgepipe.compiler.slicing import tensor_spec

    calibration = calibration_for(loaded.identity.model_id, loaded.source != "onnx",
                                  [tensor_spec(v) for v in loaded.model.graph.inputs], options.calibration,
                                  options.calibration_samples, loaded.fixed_batch)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=quiet) as bar:
        task = bar.add_task("measuring codecs and int8 weights", total=1.0)
        measurements = measure_lossy(
            loaded.model, cuts, calibration, loaded.identity.model_sha256, int8=options.offer_int8,
            threads=options.threads,
            progress=lambda step, fraction: bar.update(task, description=f"measuring: {step}", completed=fraction))
    if not quiet:
        source = "cached" if measurements.cached else "measured"
        err.print(f"lossy choices {source} on {measurements.samples} samples ({measurements.calibration})",
                  highlight=False)
    return attach_to_problem(problem, measurements, options.max_error)


def build_within_budget(options: LossyOptions | None, plan: Any, problem: Any, out: Path,
                        build: Callable[[Any], Any], err: Console, quiet: bool) -> Any:
    """Compile ``plan`` with ``build``; with a budget and a planner problem, re-plan (tighter budget,
    then fp32) when the measured error exceeds it; refuse when even that is not possible."""
    if options is None or options.max_error is None or problem is None:
        result = build(plan)
    else:
        built = compile_within_budget(options.max_error, plan, lambda budget: _replan(problem, budget, plan, out),
                                      build)
        result = built.result
        if built.notes:
            from edgepipe.compiler.build import write_summary

            write_summary(result)  # compile.json records what was re-planned and why
        for note in built.notes:
            err.print(f"[yellow]max-error:[/yellow] {note}", highlight=False)
    check = result.accuracy
    if check is not None and check.within_budget is False:
        raise BudgetExceeded(
            f"the deployed pipeline's measured error ({check.measured.describe()}) exceeds --max-error "
            f"({_limits(check.budget)}); bundles left in {result.out_dir} for inspection")
    return result


def _replan(problem: Any, budget: Any, first_plan: Any, out: Path) -> Any:
    from edgepipe.planner.plan import save_plan
    from edgepipe.planner.solver import solve

    plan = solve(dataclasses.replace(problem, max_error=budget))
    plan = dataclasses.replace(plan, left_out={**plan.left_out, **first_plan.left_out})
    save_plan(plan, Path(out) / "plan.json")
    return plan


def print_accuracy(check: AccuracyCheck | None, console: Console) -> None:
    if check is None:
        return
    table = Table(title=f"Output error of the deployed pipeline vs fp32 ({check.samples} samples: {check.calibration})")
    for col in ("", "max |Δ|", "cosine", "top-1 agreement"):
        table.add_column(col, justify="right" if col else "left")
    rows = [("predicted", check.predicted), ("measured", check.measured)]
    for name, error in rows:
        if error is None:
            continue
        top1 = "-" if error.top1_agreement is None else f"{error.top1_agreement:.1%}"
        table.add_row(name, f"{error.max_abs_diff:.4g}", f"{error.cosine:.6f}", top1)
    if check.budget is not None:
        b = check.budget
        table.add_row("budget", _or_dash(b.get("max_abs_diff"), "≤ {:.4g}"), _or_dash(b.get("cosine"), "≥ {:.6f}"),
                      _or_dash(b.get("top1_agreement"), "≥ {:.1%}"))
    console.print(table)
    int8 = ", ".join(map(str, check.int8_stages)) or "none"
    hops = ", ".join(check.hop_codecs) or "-"
    verdict = {True: "[green]within budget[/green]", False: "[red]over budget[/red]", None: ""}[check.within_budget]
    console.print(f"int8 stages: {int8}; hop codecs: {hops} {verdict}")
    if check.fallback:
        console.print(f"[yellow]{check.fallback}[/yellow]", highlight=False)


def _or_dash(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _limits(budget: dict | None) -> str:
    if not budget:
        return "none"
    names = {"max_abs_diff": "max_abs", "cosine": "cosine", "top1_agreement": "top1"}
    return ",".join(f"{names[k]}={v:g}" for k, v in budget.items() if v is not None)
