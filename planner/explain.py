"""Why this plan: per stage its devices (replicas), segments, compute, comm and send time, how its
output travels, memory, the bottleneck marked; the devices left out and why; the prediction and
the predicted error; the same numbers for each baseline.

``explain_dict`` is the machine form (``--json``), ``explain`` the rich tables for people. Both
read only the plan and the problem, so a saved plan.json can be explained again later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .plan import CLIENT_LINK, Plan, Stage
from .problem import ErrorBudget, ErrorEffect, Problem
from .units import format_bytes, format_seconds

Baselines = Mapping[str, Plan] | Sequence[Plan]


def explain_dict(problem: Problem, plan: Plan, baselines: Baselines = ()) -> dict[str, Any]:
    segs = problem.model.segments
    stages = []
    for k, s in enumerate(plan.stages):
        stages.append({
            "index": k,
            "device": s.device,
            "devices": list(s.devices),
            "weights": [r.weight for r in s.replicas],
            "type": _types(problem, s),
            "first_segment": s.first_segment,
            "end_segment": s.end_segment,
            "from": segs[s.first_segment].name,
            "to": s.cut_out or "output",
            "compute_s": s.compute_s,
            "comm_s": s.comm_s,
            "send_s": s.send_s,
            "time_s": s.time_s,
            "codec_out": s.codec_out,
            "int8_weights": s.int8_weights,
            "error": _effect(s.error),
            "memory_bytes": s.memory_bytes,
            "memory_capacity": s.memory_capacity,
            "bottleneck": k == plan.bottleneck,
        })
    fastest = plan.microbatch / plan.lower_bound_s if plan.lower_bound_s > 0 else math.nan
    return {
        "model_id": plan.model_id,
        "microbatch": plan.microbatch,
        "solver": plan.solver,
        "optimal": plan.optimal,
        "throughput": _finite(plan.throughput),
        "latency_s": plan.latency_s,
        "bottleneck": plan.bottleneck,
        "bottleneck_s": plan.bottleneck_s,
        "lower_bound_s": _finite(plan.lower_bound_s),
        "best_throughput": _finite(fastest),
        "throughput_slack": plan.throughput_slack,
        "gap": _finite(_gap(plan)),
        "solve_time_s": plan.solve_time_s,
        "client_in_s": plan.client_in_s,
        "fits": plan.fits,
        "predicted_error": _effect(plan.predicted_error),
        "max_error": None if plan.max_error is None else {
            "max_abs_diff": plan.max_error.max_abs_diff, "cosine": plan.max_error.cosine,
            "top1_agreement": plan.max_error.top1_agreement},
        "stages": stages,
        "left_out": dict(plan.left_out),
        "baselines": [_baseline_row(plan, b) for b in _as_list(baselines)],
    }


def explain(problem: Problem, plan: Plan, baselines: Baselines = ()) -> Group:
    """Rich renderables: the stage table, left-out devices, the prediction and the baselines."""
    info = explain_dict(problem, plan, baselines)
    parts: list[Any] = []
    replicated = any(len(s.replicas) > 1 for s in plan.stages)
    title = (f"{plan.model_id}: {len(plan.stages)} stages on {len(plan.devices)} devices, microbatch "
             f"{plan.microbatch}, {plan.solver}{' (optimal)' if plan.optimal else ''}")
    table = Table(title=title, title_justify="left")
    with_comm = any(s.comm_s > 0 for s in plan.stages)
    lossy = any(s.codec_out != "raw" or s.int8_weights for s in plan.stages) or plan.max_error is not None
    columns = [("#", "right"), ("devices (type)" if replicated else "device (type)", "left"),
               ("segments", "left"), ("compute", "right")]
    columns += [("comm", "right")] if with_comm else []
    columns += [("send", "right")]
    columns += [("step", "right")] if replicated or with_comm else []
    columns += [("hop / weights", "left"), ("error", "left")] if lossy else []
    columns += [("memory used / capacity", "right"), ("", "left")]
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    if plan.client_in_s or plan.bottleneck == CLIENT_LINK:
        mark = "◀ bottleneck" if plan.bottleneck == CLIENT_LINK else ""
        row = ["", "client", f"input → {devices_label(plan.stages[0])}", ""] + ([""] if with_comm else [])
        row += [format_seconds(plan.client_in_s)] * (2 if replicated or with_comm else 1)
        row += (["raw", ""] if lossy else []) + ["", Text(mark, style="bold red")]
        table.add_row(*row)
    for stage, row in zip(plan.stages, info["stages"], strict=True):
        n_seg = row["end_segment"] - row["first_segment"]
        over = row["memory_bytes"] > row["memory_capacity"]
        memory = Text(f"{format_bytes(row['memory_bytes'])} / {format_bytes(row['memory_capacity'])}",
                      style="bold red" if over else "")
        mark = ("◀ bottleneck" if row["bottleneck"] else "") + (" does not fit" if over else "")
        slower = "compute_s" if row["compute_s"] + row["comm_s"] >= row["send_s"] else "send_s"
        style = {k: "bold" if row["bottleneck"] and k == slower else "" for k in ("compute_s", "send_s", "time_s")}
        if replicated or with_comm:
            style = {"compute_s": "", "send_s": "", "time_s": "bold" if row["bottleneck"] else ""}
        cells: list[Any] = [
            str(row["index"]),
            f"{devices_label(stage)} ({row['type']})",
            f"{row['from']} → {row['to']} ({n_seg})",
            Text(format_seconds(row["compute_s"]), style=style["compute_s"]),
        ]
        cells += [format_seconds(row["comm_s"])] if with_comm else []
        cells += [Text(format_seconds(row["send_s"]), style=style["send_s"])]
        if replicated or with_comm:
            cells += [Text(format_seconds(row["time_s"]), style=style["time_s"])]
        if lossy:
            cells += [_hop(stage), _error_text(stage.error)]
        cells += [memory, Text(mark.strip(), style="bold red")]
        table.add_row(*cells)
    parts.append(table)
    if plan.left_out:
        left = Table(title="Devices left out", title_justify="left")
        left.add_column("device")
        left.add_column("why")
        for name, why in plan.left_out.items():
            left.add_row(name, why)
        parts.append(left)
    parts.append(Text(_summary(plan)))
    if info["baselines"]:
        base = Table(title="The same devices under other partitioners (our cost model)", title_justify="left")
        for name, justify in (("partitioner", "left"), ("stages", "right"), ("samples/s", "right"),
                              ("latency", "right"), ("ours ÷ theirs", "right"), ("fits memory", "left")):
            base.add_column(name, justify=justify)  # type: ignore[arg-type]
        base.add_row(f"this plan ({plan.solver})", str(len(plan.stages)), _rate(plan.throughput),
                     format_seconds(plan.latency_s), "1.00×", "yes" if plan.fits else "no")
        for row in info["baselines"]:
            ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}×"
            fits = "yes" if row["fits"] else Text(f"no: {row['overflow']}", style="red")
            base.add_row(row["solver"], str(row["stages"]), _rate(row["throughput"] or math.inf),
                         format_seconds(row["latency_s"]), ratio, fits)
        parts.append(base)
    return Group(*parts)


def devices_label(stage: Stage) -> str:
    """``pi-a``; replicas (which share the stage's microbatches) as ``rcc-{1,2,3} ×3`` when their
    names differ only in a trailing number, else ``pi-a+pi-b ×2``."""
    if len(stage.replicas) == 1:
        return stage.device
    names = stage.devices
    stems = {n.rstrip("0123456789") for n in names}
    if len(stems) == 1 and all(n != n.rstrip("0123456789") for n in names):
        stem = stems.pop()
        listed = f"{stem}{{{','.join(n[len(stem):] for n in names)}}}"
    else:
        listed = "+".join(names)
    return f"{listed} ×{len(names)}"


def _types(problem: Problem, stage: Stage) -> str:
    return "/".join(dict.fromkeys(problem.device(d).type for d in stage.devices))


def _hop(stage: Stage) -> str:
    """How the stage's output travels and which weights it runs: ``fp16``, ``raw, int8 weights``;
    uneven replica shares are listed."""
    parts = [stage.codec_out]
    if stage.int8_weights:
        parts.append("int8 weights")
    weights = [r.weight for r in stage.replicas]
    if len(weights) > 1 and max(weights) - min(weights) > 1e-9:
        parts.append("shares " + "/".join(f"{w:.0%}" for w in weights))
    return ", ".join(parts)


def _error_text(effect: ErrorEffect | None) -> str:
    if effect is None:
        return "–"
    return f"Δ≤{effect.max_abs_diff:.2g}, 1−cos≤{1.0 - effect.cosine:.1g}"


def _summary(plan: Plan) -> str:
    if plan.bottleneck == CLIENT_LINK:
        where = "the client link"
    else:
        stage = plan.stages[plan.bottleneck]
        where = f"stage {plan.bottleneck} ({devices_label(stage)})"
    text = (f"Predicted: {_rate(plan.throughput)} samples/s, one microbatch every "
            f"{format_seconds(plan.bottleneck_s)} (set by {where}); "
            f"latency {format_seconds(plan.latency_s)}.")
    if plan.optimal and plan.lower_bound_s > 0 and plan.bottleneck_s > plan.lower_bound_s * (1 + 1e-9):
        fastest = plan.microbatch / plan.lower_bound_s
        text += (f" The fastest plan reaches {_rate(fastest)} samples/s; this one is within the "
                 f"{plan.throughput_slack:.1%} throughput slack and better on error, latency or devices.")
    gap = _gap(plan)
    if plan.optimal:
        text += " Proven optimal for the cost model."
    elif math.isfinite(gap):
        text += f" Lower bound {format_seconds(plan.lower_bound_s)}: within {gap:.1%} of optimal."
    if plan.predicted_error is not None:
        e = plan.predicted_error
        top1 = f", top-1 agreement ≥ {e.top1_agreement:.4f}" if e.top1_agreement is not None else ""
        budget = f" (budget: {plan.max_error.describe()})" if isinstance(plan.max_error, ErrorBudget) else ""
        text += (f" Predicted output error: max|Δ| ≤ {e.max_abs_diff:.3g}, cosine ≥ {e.cosine:.7f}{top1}{budget};"
                 " the compiler verifies it end to end.")
    elif plan.max_error is not None:
        text += f" No lossy choice was needed (budget: {plan.max_error.describe()})."
    if plan.solve_time_s:
        text += f" Solved in {format_seconds(plan.solve_time_s)}."
    return text


def _baseline_row(plan: Plan, other: Plan) -> dict[str, Any]:
    over = [(k, s) for k, s in enumerate(other.stages) if not s.fits]
    overflow = ""
    if over:
        k, s = over[0]
        overflow = (f"stage {k} on {s.device} needs {format_bytes(s.memory_bytes)} of "
                    f"{format_bytes(s.memory_capacity)}")
    ratio = plan.throughput / other.throughput if other.fits and other.throughput > 0 else None
    return {"solver": other.solver, "stages": len(other.stages), "throughput": _finite(other.throughput),
            "latency_s": other.latency_s, "ratio": _finite(ratio) if ratio is not None else None,
            "fits": other.fits, "overflow": overflow, "devices": list(other.devices)}


def _effect(e: ErrorEffect | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {"max_abs_diff": e.max_abs_diff, "cosine": e.cosine, "top1_agreement": e.top1_agreement}


def _gap(plan: Plan) -> float:
    if not math.isfinite(plan.lower_bound_s) or plan.lower_bound_s <= 0:
        return math.nan
    return plan.bottleneck_s / plan.lower_bound_s - 1.0


def _as_list(baselines: Mapping[str, Plan] | Sequence[Plan]) -> list[Plan]:
    return list(baselines.values()) if isinstance(baselines, Mapping) else list(baselines)


def _rate(x: float) -> str:
    return "∞" if not math.isfinite(x) else f"{x:.3g}"


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
