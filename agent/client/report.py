"""Prediction vs reality: the planner's per-stage predictions beside what a run measured.

The plan is read with ``json`` (agent/ does not import the planner, which devices do not install):
only ``microbatch``, ``throughput``, ``latency_s``, ``bottleneck`` and ``stages[].device``,
``compute_s``, ``send_s`` of format "edgepipe.plan". The measurements come from the stage records
every result carries (agent/formats/wire.py StageRecord; times on one stage's clock, so only
differences within one record are used):

- compute: ``compute_end - compute_start`` (ONNX Runtime);
- send: ``send - compute_end``, until the agent's sender thread takes the result (it waits behind
  earlier sends when the next stage or the link is slower);
- wait: ``compute_start - recv``, queued at the stage before compute.

Receiving, compute and sending run in separate threads of an agent, so a stage's time per
microbatch is its compute; the stage with the longest median compute is the measured bottleneck
(a slow link shows up as send time of the stage before it instead). Measured throughput is the steady state: the
rate at which results leave the last stage (its send times, one clock), first to last, so filling
and draining the pipeline do not count against it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgepipe.agent.formats.wire import StageRecord

PLAN_FORMAT = "edgepipe.plan"


class ReportError(ValueError):
    """The plan file cannot be read or does not describe this pipeline."""


@dataclass(frozen=True)
class PlannedStage:
    device: str
    compute_s: float
    send_s: float


@dataclass(frozen=True)
class Prediction:
    microbatch: int
    throughput: float  # samples / s
    latency_s: float
    bottleneck: int  # stage index, or -1 for the client link
    stages: tuple[PlannedStage, ...]


@dataclass(frozen=True)
class StageRow:
    stage: int
    device: str
    predicted_compute_ms: float
    measured_compute_ms: float
    compute_error_pct: float
    predicted_send_ms: float
    measured_send_ms: float
    measured_wait_ms: float


@dataclass(frozen=True)
class PredictionReport:
    stages: tuple[StageRow, ...]
    predicted_throughput: float
    measured_throughput: float
    throughput_error_pct: float  # (predicted - measured) / measured
    predicted_bottleneck: int
    measured_bottleneck: int
    warnings: tuple[str, ...]


def read_prediction(path: Path | str) -> Prediction:
    """The few fields of an "edgepipe.plan" file that a report needs; ReportError naming the file."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read the plan: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
        raise ReportError(f"{path}: not an {PLAN_FORMAT} file")
    try:
        stages = tuple(PlannedStage(device=str(s["device"]), compute_s=float(s["compute_s"]),
                                    send_s=float(s["send_s"])) for s in raw["stages"])
        prediction = Prediction(microbatch=int(raw["microbatch"]), throughput=float(raw["throughput"]),
                                latency_s=float(raw.get("latency_s", math.nan)),
                                bottleneck=int(raw.get("bottleneck", -2)), stages=stages)
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportError(f"{path}: malformed plan field: {exc!r}") from None
    if not stages:
        raise ReportError(f"{path}: the plan has no stages")
    return prediction


def compare(prediction: Prediction, traces: Sequence[Sequence[StageRecord]], batch: int) -> PredictionReport:
    """Per-stage predicted vs measured medians, and throughput, from the results' stage records."""
    by_stage: dict[int, list[StageRecord]] = {}
    for trace in traces:
        for rec in trace:
            by_stage.setdefault(rec.stage, []).append(rec)
    warnings = []
    if sorted(by_stage) != list(range(len(prediction.stages))):
        raise ReportError(f"the plan has {len(prediction.stages)} stages, the run went through "
                          f"{len(by_stage)}; is this the pipeline the plan describes?")
    if batch != prediction.microbatch:
        warnings.append(f"the plan is for microbatch {prediction.microbatch}, the run used {batch}: "
                        f"per-stage times are not comparable")
    rows = []
    computes = []
    for i, planned in enumerate(prediction.stages):
        recs = by_stage[i]
        compute = statistics.median(r.compute_end - r.compute_start for r in recs)
        send = statistics.median(r.send - r.compute_end for r in recs)
        wait = statistics.median(r.compute_start - r.recv for r in recs)
        computes.append(compute)
        rows.append(StageRow(stage=i, device=planned.device, predicted_compute_ms=planned.compute_s * 1000,
                             measured_compute_ms=compute * 1000,
                             compute_error_pct=error_pct(planned.compute_s, compute),
                             predicted_send_ms=planned.send_s * 1000, measured_send_ms=send * 1000,
                             measured_wait_ms=wait * 1000))
    measured_throughput = steady_throughput(by_stage[len(prediction.stages) - 1], batch)
    if len(by_stage[len(prediction.stages) - 1]) < 3:
        warnings.append("fewer than 3 results: the steady-state throughput is not meaningful; send more (-n)")
    predicted_bottleneck = prediction.bottleneck
    if predicted_bottleneck < -1 or predicted_bottleneck >= len(prediction.stages):
        predicted_bottleneck = max(range(len(prediction.stages)),
                                   key=lambda k: max(prediction.stages[k].compute_s, prediction.stages[k].send_s))
    return PredictionReport(
        stages=tuple(rows), predicted_throughput=prediction.throughput, measured_throughput=measured_throughput,
        throughput_error_pct=error_pct(prediction.throughput, measured_throughput),
        predicted_bottleneck=predicted_bottleneck,
        measured_bottleneck=max(range(len(computes)), key=computes.__getitem__),
        warnings=tuple(warnings),
    )


def steady_throughput(last_stage: Sequence[StageRecord], batch: int) -> float:
    """Samples per second leaving the pipeline between its first and last result."""
    sends = sorted(r.send for r in last_stage)
    if len(sends) < 2 or sends[-1] <= sends[0]:
        return math.nan
    return (len(sends) - 1) * batch / (sends[-1] - sends[0])


def error_pct(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured * 100 if measured > 0 else math.nan


def bottleneck_name(report: PredictionReport, which: int) -> str:
    if which == -1:
        return "the client link"
    return f"stage {which} ({report.stages[which].device})"


def print_prediction(report: PredictionReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="predicted vs measured (per microbatch)")
    for col in ("stage", "device", "compute pred", "compute meas", "error", "send pred", "send meas", "wait meas"):
        table.add_column(col, justify="left" if col == "device" else "right")
    for r in report.stages:
        table.add_row(str(r.stage), r.device, f"{r.predicted_compute_ms:.1f} ms", f"{r.measured_compute_ms:.1f} ms",
                      f"{r.compute_error_pct:+.1f}%", f"{r.predicted_send_ms:.1f} ms", f"{r.measured_send_ms:.1f} ms",
                      f"{r.measured_wait_ms:.1f} ms")
    table.add_row("all", "throughput", f"{report.predicted_throughput:.1f}/s", f"{report.measured_throughput:.1f}/s",
                  f"{report.throughput_error_pct:+.1f}%", "", "", "", style="bold")
    console.print(table)
    measured = bottleneck_name(report, report.measured_bottleneck)
    predicted = bottleneck_name(report, report.predicted_bottleneck)
    verdict = "as predicted" if report.measured_bottleneck == report.predicted_bottleneck else \
        f"the plan predicted {predicted}"
    console.print(f"measured bottleneck: {measured} ({verdict})", highlight=False)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
