"""Why this plan: per stage its device, segments, compute and send time, memory, the bottleneck
marked; the devices left out and why; the prediction; the same numbers for each baseline.

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

from .plan import CLIENT_LINK, Plan
from .problem import Problem
from .units import format_bytes, format_seconds

Baselines = Mapping[str, Plan] | Sequence[Plan]


def explain_dict(problem: Problem, plan: Plan, baselines: Baselines = ()) -> dict[str, Any]:
    segs = problem.model.segments
    stages = []
    for k, s in enumerate(plan.stages):
        stages.append({
            "index": k,
            "device": s.device,
            "type": problem.device(s.device).type,
            "first_segment": s.first_segment,
            "end_segment": s.end_segment,
            "from": segs[s.first_segment].name,
            "to": s.cut_out or "output",
            "compute_s": s.compute_s,
            "send_s": s.send_s,
            "time_s": s.time_s,
            "memory_bytes": s.memory_bytes,
            "memory_capacity": s.memory_capacity,
            "bottleneck": k == plan.bottleneck,
        })
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
        "gap": _finite(_gap(plan)),
        "solve_time_s": plan.solve_time_s,
        "client_in_s": plan.client_in_s,
        "fits": plan.fits,
        "stages": stages,
        "left_out": dict(plan.left_out),
        "baselines": [_baseline_row(plan, b) for b in _as_list(baselines)],
    }


def explain(problem: Problem, plan: Plan, baselines: Baselines = ()) -> Group:
    """Rich renderables: the stage table, left-out devices, the prediction and the baselines."""
    info = explain_dict(problem, plan, baselines)
    parts: list[Any] = []
    title = (f"{plan.model_id}: {len(plan.stages)} stages, microbatch {plan.microbatch}, "
             f"{plan.solver}{' (optimal)' if plan.optimal else ''}")
    table = Table(title=title, title_justify="left")
    columns = (("#", "right"), ("device (type)", "left"), ("segments", "left"), ("compute", "right"),
               ("send", "right"), ("memory used / capacity", "right"), ("", "left"))
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    if plan.client_in_s or plan.bottleneck == CLIENT_LINK:
        mark = "◀ bottleneck" if plan.bottleneck == CLIENT_LINK else ""
        table.add_row("", "client", f"input → {plan.stages[0].device}", "", format_seconds(plan.client_in_s),
                      "", Text(mark, style="bold red"))
    for row in info["stages"]:
        n_seg = row["end_segment"] - row["first_segment"]
        over = row["memory_bytes"] > row["memory_capacity"]
        memory = Text(f"{format_bytes(row['memory_bytes'])} / {format_bytes(row['memory_capacity'])}",
                      style="bold red" if over else "")
        mark = ("◀ bottleneck" if row["bottleneck"] else "") + (" does not fit" if over else "")
        slower = "compute_s" if row["compute_s"] >= row["send_s"] else "send_s"
        style = {k: "bold" if row["bottleneck"] and k == slower else "" for k in ("compute_s", "send_s")}
        table.add_row(
            str(row["index"]),
            f"{row['device']} ({row['type']})",
            f"{row['from']} → {row['to']} ({n_seg})",
            Text(format_seconds(row["compute_s"]), style=style["compute_s"]),
            Text(format_seconds(row["send_s"]), style=style["send_s"]),
            memory,
            Text(mark.strip(), style="bold red"),
        )
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


def _summary(plan: Plan) -> str:
    if plan.bottleneck == CLIENT_LINK:
        where = "the client link"
    else:
        where = f"stage {plan.bottleneck} ({plan.devices[plan.bottleneck]})"
    text = (f"Predicted: {_rate(plan.throughput)} samples/s, one microbatch every "
            f"{format_seconds(plan.bottleneck_s)} (set by {where}); "
            f"latency {format_seconds(plan.latency_s)}.")
    gap = _gap(plan)
    if plan.optimal:
        text += " Proven optimal for the cost model."
    elif math.isfinite(gap):
        text += f" Lower bound {format_seconds(plan.lower_bound_s)}: within {gap:.1%} of optimal."
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
