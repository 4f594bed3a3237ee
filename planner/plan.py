"""The plan: which devices run which segments, how each hop travels, and what the cost model predicts.

Format "edgepipe.plan", version 2 (version 1 files are read too), documented in
docs/formats/plan.md. The compiler slices stage bundles at exactly the cut labels of each stage
(``cut_in`` / ``cut_out``), with int8 weights where ``int8_weights`` says so; a replicated stage is
one bundle deployed to each of its ``replicas``, which share its microbatches by ``weight``. Times
are per microbatch; throughput is in samples per second. This module is the one definition of the
format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .problem import CODECS, ErrorBudget, ErrorEffect

FORMAT = "edgepipe.plan"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CLIENT_LINK = -1  # Plan.bottleneck value when the client -> first device transfer is the slowest step


class PlanError(ValueError):
    """A plan file is malformed or not one this planner reads."""


@dataclass(frozen=True)
class Replica:
    device: str
    weight: float = 1.0  # the share of the stage's microbatches this device takes


@dataclass(frozen=True)
class Stage:
    replicas: tuple[Replica, ...]  # one device, or several sharing the stage's microbatches
    first_segment: int
    end_segment: int  # exclusive
    cut_in: str | None  # label of the cut this stage starts at; None for the first stage
    cut_out: str | None  # label of the cut this stage ends at; None for the last stage
    compute_s: float  # one microbatch through this stage's segments on one replica (the slowest)
    send_s: float  # one microbatch's output over the wire to the next stage (last: to the client, 0 if not modelled)
    memory_bytes: int  # on each replica
    memory_capacity: int  # the smallest replica's memory
    comm_s: float = 0.0  # CPU seconds one replica spends receiving + decoding and encoding + sending a microbatch
    time_s: float = math.nan  # steady-state time per microbatch of the stage and its output hop (see cost.py)
    codec_out: str = "raw"  # how the output hop travels
    int8_weights: bool = False
    error: ErrorEffect | None = None  # the effect of this stage's lossy choices (its int8 weights, its codec)

    def __post_init__(self) -> None:
        if math.isnan(self.time_s):  # a version 1 stage: compute and sending overlap
            object.__setattr__(self, "time_s", max(self.compute_s, self.send_s))

    @property
    def device(self) -> str:
        """The stage's device; for a replicated stage, its first replica (see ``devices``)."""
        return self.replicas[0].device

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(r.device for r in self.replicas)

    @property
    def latency_s(self) -> float:
        """One microbatch through an empty pipeline spends this long in the stage and its output hop."""
        return self.compute_s + self.comm_s + self.send_s

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.memory_capacity


@dataclass(frozen=True)
class Plan:
    model_id: str
    model_sha256: str
    microbatch: int
    stages: tuple[Stage, ...]
    throughput: float  # samples / s in steady state
    latency_s: float  # one microbatch through an empty pipeline, client to client
    bottleneck: int  # index of the slowest stage, or CLIENT_LINK
    solver: str
    optimal: bool  # proven optimal for the cost model and the objective (docs/planner.md)
    lower_bound_s: float  # no plan within the error budget has a bottleneck below this (nan if unknown)
    solve_time_s: float
    left_out: dict[str, str] = field(default_factory=dict)  # device -> why it is not used
    problem_sha256: str = ""
    client_in_s: float = 0.0  # client -> first device transfer per microbatch (0 if not modelled)
    predicted_error: ErrorEffect | None = None  # all lossy choices together; None: the plan has none
    max_error: ErrorBudget | None = None  # the budget the plan was made within
    throughput_slack: float = 0.0  # plans this close to the best throughput counted as equally fast

    @property
    def bottleneck_s(self) -> float:
        """The time per microbatch of the slowest step: 1 / throughput * microbatch."""
        if self.bottleneck == CLIENT_LINK:
            return self.client_in_s
        return self.stages[self.bottleneck].time_s

    @property
    def fits(self) -> bool:
        """Every stage fits its devices' memory (baseline plans may not)."""
        return all(s.fits for s in self.stages)

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device the plan uses, replicas included, in pipeline order."""
        return tuple(d for s in self.stages for d in s.devices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "model_sha256": self.model_sha256,
            "microbatch": self.microbatch,
            "stages": [_stage_to_dict(s) for s in self.stages],
            "throughput": _finite_or_none(self.throughput),
            "latency_s": self.latency_s,
            "bottleneck": self.bottleneck,
            "client_in_s": self.client_in_s,
            "solver": self.solver,
            "optimal": self.optimal,
            "lower_bound_s": _finite_or_none(self.lower_bound_s),
            "solve_time_s": self.solve_time_s,
            "left_out": dict(self.left_out),
            "problem_sha256": self.problem_sha256,
            "predicted_error": _effect_to_dict(self.predicted_error),
            "max_error": None if self.max_error is None else {
                "max_abs_diff": self.max_error.max_abs_diff, "cosine": self.max_error.cosine,
                "top1_agreement": self.max_error.top1_agreement},
            "throughput_slack": self.throughput_slack,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @staticmethod
    def from_dict(raw: Any, source: str = "plan") -> Plan:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise PlanError(f"{source}: not an EdgePipe plan (format={got!r})")
        if raw.get("format_version") not in READABLE_VERSIONS:
            raise PlanError(
                f"{source}: plan format_version {raw.get('format_version')!r} is not supported "
                f"(this planner reads {', '.join(str(v) for v in READABLE_VERSIONS)})"
            )
        try:
            stages = tuple(_stage_from_dict(s) for s in raw["stages"])
            throughput, lower = raw["throughput"], raw["lower_bound_s"]
            budget = raw.get("max_error")
            plan = Plan(
                model_id=str(raw["model_id"]),
                model_sha256=str(raw.get("model_sha256", "")),
                microbatch=int(raw["microbatch"]),
                stages=stages,
                throughput=math.inf if throughput is None else float(throughput),
                latency_s=float(raw["latency_s"]),
                bottleneck=int(raw["bottleneck"]),
                solver=str(raw["solver"]),
                optimal=bool(raw["optimal"]),
                lower_bound_s=math.nan if lower is None else float(lower),
                solve_time_s=float(raw["solve_time_s"]),
                left_out={str(k): str(v) for k, v in raw.get("left_out", {}).items()},
                problem_sha256=str(raw.get("problem_sha256", "")),
                client_in_s=float(raw.get("client_in_s", 0.0)),
                predicted_error=_effect_from_dict(raw.get("predicted_error")),
                max_error=None if budget is None else ErrorBudget(
                    budget.get("max_abs_diff"), budget.get("cosine"), budget.get("top1_agreement")),
                throughput_slack=float(raw.get("throughput_slack", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"{source}: malformed plan field: {exc!r}") from exc
        _check(plan, source)
        return plan

    @staticmethod
    def from_json(text: str, source: str = "plan") -> Plan:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{source}: not valid JSON: {exc}") from exc
        return Plan.from_dict(raw, source)


def save_plan(plan: Plan, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(plan.to_json() + "\n")
    return path


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot read plan file: {exc}") from exc
    return Plan.from_json(text, source=str(path))


def _stage_to_dict(s: Stage) -> dict[str, Any]:
    return {
        "device": s.device,  # the first replica: what a version 1 reader sees
        "replicas": [{"device": r.device, "weight": r.weight} for r in s.replicas],
        "first_segment": s.first_segment,
        "end_segment": s.end_segment,
        "cut_in": s.cut_in,
        "cut_out": s.cut_out,
        "compute_s": s.compute_s,
        "comm_s": s.comm_s,
        "send_s": s.send_s,
        "time_s": s.time_s,
        "memory_bytes": s.memory_bytes,
        "memory_capacity": s.memory_capacity,
        "codec_out": s.codec_out,
        "int8_weights": s.int8_weights,
        "error": _effect_to_dict(s.error),
    }


def _stage_from_dict(s: dict[str, Any]) -> Stage:
    if "replicas" in s:
        replicas = tuple(Replica(str(r["device"]), float(r["weight"])) for r in s["replicas"])
        if replicas and "device" in s and s["device"] != replicas[0].device:
            raise ValueError(f"device {s['device']!r} must be the first replica ({replicas[0].device!r})")
    else:  # version 1: one device
        replicas = (Replica(str(s["device"]), 1.0),)
    return Stage(
        replicas=replicas,
        first_segment=int(s["first_segment"]),
        end_segment=int(s["end_segment"]),
        cut_in=s["cut_in"],
        cut_out=s["cut_out"],
        compute_s=float(s["compute_s"]),
        send_s=float(s["send_s"]),
        memory_bytes=int(s["memory_bytes"]),
        memory_capacity=int(s["memory_capacity"]),
        comm_s=float(s.get("comm_s", 0.0)),
        time_s=float(s.get("time_s", math.nan)),
        codec_out=str(s.get("codec_out", "raw")),
        int8_weights=bool(s.get("int8_weights", False)),
        error=_effect_from_dict(s.get("error")),
    )


def _effect_to_dict(e: ErrorEffect | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {"max_abs_diff": e.max_abs_diff, "cosine": e.cosine, "top1_agreement": e.top1_agreement}


def _effect_from_dict(raw: Any) -> ErrorEffect | None:
    if raw is None:
        return None
    top1 = raw.get("top1_agreement")
    return ErrorEffect(float(raw["max_abs_diff"]), float(raw["cosine"]), None if top1 is None else float(top1))


def _check(plan: Plan, source: str) -> None:
    if not plan.stages:
        raise PlanError(f"{source}: stages: a plan has at least one stage")
    if plan.stages[0].first_segment != 0:
        raise PlanError(f"{source}: stages[0].first_segment: must be 0")
    for k, s in enumerate(plan.stages):
        if s.end_segment <= s.first_segment:
            raise PlanError(f"{source}: stages[{k}]: end_segment must be after first_segment")
        if k and s.first_segment != plan.stages[k - 1].end_segment:
            raise PlanError(f"{source}: stages[{k}].first_segment: must equal stages[{k - 1}].end_segment")
        if not s.replicas:
            raise PlanError(f"{source}: stages[{k}].replicas: a stage runs on at least one device")
        if any(not r.weight > 0 for r in s.replicas) or not math.isclose(sum(r.weight for r in s.replicas), 1.0,
                                                                         rel_tol=1e-6):
            raise PlanError(f"{source}: stages[{k}].replicas: weights must be positive and sum to 1")
        if s.codec_out not in CODECS:
            raise PlanError(f"{source}: stages[{k}].codec_out: {s.codec_out!r} is not one of {', '.join(CODECS)}")
    if plan.stages[-1].codec_out != "raw":
        raise PlanError(f"{source}: stages[{len(plan.stages) - 1}].codec_out: the last stage sends results raw")
    if len(set(plan.devices)) != len(plan.devices):
        raise PlanError(f"{source}: stages: a device appears in more than one stage")
    if not CLIENT_LINK <= plan.bottleneck < len(plan.stages):
        raise PlanError(f"{source}: bottleneck: {plan.bottleneck} is not a stage index or {CLIENT_LINK}")
    if plan.microbatch < 1:
        raise PlanError(f"{source}: microbatch: must be >= 1")


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
