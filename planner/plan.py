"""The plan: which device runs which segments, and what the cost model predicts for it.

Format "edgepipe.plan", version 1, documented in docs/formats/plan.md. The compiler slices stage
bundles at exactly the cut labels of each stage (``cut_in`` / ``cut_out``). Times are per
microbatch; throughput is in samples per second. This module is the one definition of the format.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "edgepipe.plan"
FORMAT_VERSION = 1
CLIENT_LINK = -1  # Plan.bottleneck value when the client -> first device transfer is the slowest step


class PlanError(ValueError):
    """A plan file is malformed or not one this planner reads."""


@dataclass(frozen=True)
class Stage:
    device: str
    first_segment: int
    end_segment: int  # exclusive
    cut_in: str | None  # label of the cut this stage starts at; None for the first stage
    cut_out: str | None  # label of the cut this stage ends at; None for the last stage
    compute_s: float  # one microbatch through this stage's segments on its device
    send_s: float  # its output to the next device (the last stage: to the client, 0 if not modelled)
    memory_bytes: int
    memory_capacity: int

    @property
    def time_s(self) -> float:
        """Compute and sending overlap, so a stage takes the longer of the two per microbatch."""
        return max(self.compute_s, self.send_s)

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
    optimal: bool  # the bottleneck is proven minimal for the cost model
    lower_bound_s: float  # no plan has a bottleneck below this (nan if unknown)
    solve_time_s: float
    left_out: dict[str, str] = field(default_factory=dict)  # device -> why it is not used
    problem_sha256: str = ""
    client_in_s: float = 0.0  # client -> first device transfer per microbatch (0 if not modelled)

    @property
    def bottleneck_s(self) -> float:
        """The time per microbatch of the slowest step: 1 / throughput * microbatch."""
        if self.bottleneck == CLIENT_LINK:
            return self.client_in_s
        return self.stages[self.bottleneck].time_s

    @property
    def fits(self) -> bool:
        """Every stage fits its device's memory (baseline plans may not)."""
        return all(s.fits for s in self.stages)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(s.device for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["throughput"] = _finite_or_none(self.throughput)
        raw["lower_bound_s"] = _finite_or_none(self.lower_bound_s)
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **raw}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @staticmethod
    def from_dict(raw: Any, source: str = "plan") -> Plan:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise PlanError(f"{source}: not an EdgePipe plan (format={got!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise PlanError(
                f"{source}: plan format_version {raw.get('format_version')!r} is not supported "
                f"(this planner reads {FORMAT_VERSION})"
            )
        try:
            stages = tuple(
                Stage(
                    device=str(s["device"]),
                    first_segment=int(s["first_segment"]),
                    end_segment=int(s["end_segment"]),
                    cut_in=s["cut_in"],
                    cut_out=s["cut_out"],
                    compute_s=float(s["compute_s"]),
                    send_s=float(s["send_s"]),
                    memory_bytes=int(s["memory_bytes"]),
                    memory_capacity=int(s["memory_capacity"]),
                )
                for s in raw["stages"]
            )
            throughput, lower = raw["throughput"], raw["lower_bound_s"]
            plan = Plan(
                model_id=str(raw["model_id"]),
                model_sha256=str(raw["model_sha256"]),
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
    if len(set(plan.devices)) != len(plan.stages):
        raise PlanError(f"{source}: stages: a device appears in more than one stage")
    if not CLIENT_LINK <= plan.bottleneck < len(plan.stages):
        raise PlanError(f"{source}: bottleneck: {plan.bottleneck} is not a stage index or {CLIENT_LINK}")
    if plan.microbatch < 1:
        raise PlanError(f"{source}: microbatch: must be >= 1")


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
