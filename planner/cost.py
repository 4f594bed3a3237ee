"""The cost model: how long a stage computes, talks and sends, how much memory it needs, and what
its lossy choices do to the model's outputs.

One definition, used by the solver (as arrays, tables.py), the baselines and the simulator (per
stage), so every plan is judged by the same numbers. Times are per microbatch. For a stage on
replica devices R (weights w, summing to 1) covering segments [i, j), whose input arrives in
codec x and whose output leaves in codec y:

- compute_d: the device type's seconds for the segments (the int8 variant's if the stage is int8);
- recv_d, send_d: CPU seconds to receive + decode the input, to encode + send the output
  (the type's comm costs for the codec; per message + per uncompressed byte);
- busy_d = compute_d + share_d * (recv_d + send_d): compute slowed by the comm threads' CPU;
- cycle_d = max(busy_d, recv_d, send_d): how often replica d can take a new microbatch;
- stage step: max over d of w_d * cycle_d (replicas share the microbatches by weight);
- hop step (the output to the next stage's replicas S, weights v), each pair x -> y taking
  t(x, y) = latency + wire bytes * 8 / bandwidth: every device's sends and receives are one after
  another, so the step is the busiest device: max(w_x * sum_y v_y t(x, y), v_y * sum_x w_x t(x, y));
  to the client: max over d of t(d, client) (the client link is not shared out);
- the stage's time is the larger of its two steps; the slowest step sets the pace.
- latency (one microbatch through an empty pipeline): client in + for every stage its compute,
  recv + send CPU and one wire transfer (the slowest replica, the slowest pair).
- memory: weights (int8 weights for an int8 stage) + microbatch * (largest activation + queue_depth
  * (input + output bytes)) + runtime overhead, on each replica.
- error: the stage's lossy items (its int8 segments, its output codec) combined by
  problem.combine_effects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .plan import CLIENT_LINK, Plan, PlanError, Replica, Stage
from .problem import (
    ErrorEffect,
    Problem,
    combine_effects,
    error_units,
    int8_segment_seconds,
    segment_seconds,
)


@dataclass(frozen=True)
class Placement:
    """One stage as a solver or a user chooses it. ``weights`` None: shared by speed."""

    devices: tuple[str, ...]
    first: int
    end: int
    codec_out: str = "raw"
    int8: bool = False
    weights: tuple[float, ...] | None = None


PlacementLike = Placement | tuple[str, int, int]


def as_placement(p: PlacementLike) -> Placement:
    if isinstance(p, Placement):
        return p
    name, first, end = p
    return Placement((name,), first, end)


def placements_of(plan: Plan) -> list[Placement]:
    """A plan's stages as placements (what ``evaluate`` re-costs)."""
    return [Placement(s.devices, s.first_segment, s.end_segment, s.codec_out, s.int8_weights,
                      tuple(r.weight for r in s.replicas)) for s in plan.stages]


def link_lookup(problem: Problem) -> Callable[[str, str], tuple[float, float]]:
    """A function giving (bandwidth Mbps, latency s) between two devices: the pair's Link if the
    problem has one, else the smaller of the two NICs with no latency."""
    nic = {d.name: d.bandwidth_mbps for d in problem.devices}
    given = {frozenset((k.a, k.b)): (k.bandwidth_mbps, k.latency_s) for k in problem.links}

    def link(a: str, b: str) -> tuple[float, float]:
        return given.get(frozenset((a, b)), (min(nic[a], nic[b]), 0.0))

    return link


def link_between(problem: Problem, a: str, b: str) -> tuple[float, float]:
    """(bandwidth Mbps, latency s) of the link between devices a and b."""
    return link_lookup(problem)(a, b)


def transfer_seconds(n_bytes: float, bandwidth_mbps: float, latency_s: float = 0.0) -> float:
    return latency_s + n_bytes * 8.0 / (bandwidth_mbps * 1e6)


def client_bandwidth(problem: Problem, device: str) -> float | None:
    """Rate between the client and a device, or None when the client is not modelled."""
    if problem.client_bandwidth_mbps is None:
        return None
    return min(problem.client_bandwidth_mbps, problem.device(device).bandwidth_mbps)


def cut_bytes(problem: Problem) -> np.ndarray:
    """Bytes per sample crossing each position 0..S: the input, then each segment's output."""
    model = problem.model
    return np.array([model.input_bytes, *(s.out_bytes for s in model.segments)], dtype=np.float64)


def wire_bytes(problem: Problem, position: int, codec: str) -> float | None:
    """Bytes per sample on the wire at a cut in ``codec``; None when the cut has no such codec."""
    if codec == "raw":
        return float(cut_bytes(problem)[position])
    if not 0 < position < len(problem.model.segments):
        return None
    entry = problem.model.segments[position - 1].codec(codec)
    return None if entry is None else float(entry.out_bytes)


def weight_bytes(problem: Problem, int8: bool) -> np.ndarray:
    """Weight bytes of each segment, fp32 or (where the segment has one) its int8 variant."""
    segs = problem.model.segments
    return np.array([s.int8.weight_bytes if int8 and s.int8 is not None else s.weight_bytes for s in segs],
                    dtype=np.float64)


def stage_memory(problem: Problem, microbatch: int, first: int, end: int, int8: bool = False) -> int:
    segs = problem.model.segments[first:end]
    cuts = cut_bytes(problem)
    io = int(cuts[first]) + int(cuts[end])
    peak = max(s.activation_bytes for s in segs)
    weights = int(weight_bytes(problem, int8)[first:end].sum())
    return weights + microbatch * (peak + problem.queue_depth * io) + problem.runtime_overhead_bytes


def memory_matrix(problem: Problem, microbatch: int, int8: bool = False) -> np.ndarray:
    """mem[i, j] = stage_memory(i, j) for i < j, +inf elsewhere; shape (S+1, S+1)."""
    segs = problem.model.segments
    n = len(segs)
    weights = np.concatenate([[0.0], np.cumsum(weight_bytes(problem, int8))])
    act = np.array([s.activation_bytes for s in segs], dtype=np.float64)
    # peak[i, j] = max(act[i:j]): lay act[j-1] out in row i for j > i, then a running max per row.
    grid = np.where(np.arange(n + 1)[None, :] > np.arange(n + 1)[:, None],
                    np.concatenate([[0.0], act])[None, :], 0.0)
    peak = np.maximum.accumulate(grid, axis=1)
    cuts = cut_bytes(problem)
    mem = (weights[None, :] - weights[:, None]
           + microbatch * (peak + problem.queue_depth * (cuts[:, None] + cuts[None, :]))
           + problem.runtime_overhead_bytes)
    upper = np.arange(n + 1)[None, :] > np.arange(n + 1)[:, None]
    return np.where(upper, mem, np.inf)


def comm_seconds(problem: Problem, type_name: str, codec: str, n_bytes: float) -> tuple[float, float]:
    """(recv, send) CPU seconds of one message of ``n_bytes`` uncompressed bytes in ``codec`` on a
    device of ``type_name``; (0, 0) where the type has no measured cost for it."""
    cost = problem.device_type(type_name).comm_cost(codec, problem.secure)
    return (0.0, 0.0) if cost is None else (cost.recv_s(n_bytes), cost.send_s(n_bytes))


def stage_seconds(problem: Problem, type_name: str, microbatch: int, int8: bool) -> np.ndarray | None:
    """Seconds of each segment on ``type_name``; for an int8 stage, the int8 variant's seconds for
    the segments that have an int8 variant (the others run fp32). None: no int8 figures."""
    fp32 = segment_seconds(problem, type_name, microbatch)
    if not int8:
        return fp32
    quantized = int8_segment_seconds(problem, type_name, microbatch)
    if quantized is None:
        return None
    has_int8 = np.array([s.int8 is not None for s in problem.model.segments])
    return np.where(has_int8, quantized, fp32)


def stage_effects(problem: Problem, first: int, end: int, codec_out: str, int8: bool) -> list[ErrorEffect]:
    """The lossy items of a stage: its segments' int8 weights and its output cut's codec."""
    segs = problem.model.segments
    effects = [s.int8.effect for s in segs[first:end] if int8 and s.int8 is not None]
    if codec_out != "raw":
        entry = segs[end - 1].codec(codec_out)
        if entry is not None:
            effects.append(entry.effect)
    return effects


@dataclass(frozen=True)
class Evaluation:
    stages: tuple[Stage, ...]
    client_in_s: float
    bottleneck: int
    bottleneck_s: float
    throughput: float
    latency_s: float
    error: ErrorEffect | None  # all lossy choices combined; None when there are none
    error_units: float  # their share of the problem's budget in problem.ERROR_UNITS (inf: over; 0: none)


@dataclass(frozen=True)
class ReplicaCosts:
    """Per replica of one stage: compute, comm and cycle seconds, and the weights used."""

    compute: tuple[float, ...]
    comm: tuple[float, ...]
    cycle: tuple[float, ...]
    weights: tuple[float, ...]


def evaluate(problem: Problem, microbatch: int, placements: Sequence[PlacementLike]) -> Evaluation:
    """Cost of running these stages in this order (see the module docstring).

    Raises PlanError when a placement asks for something the problem cannot give (an unknown
    device, a codec the cut does not offer, int8 on a type without int8 figures)."""
    stages_in = [as_placement(p) for p in placements]
    if not stages_in:
        raise ValueError("a plan needs at least one stage")
    n = len(problem.model.segments)
    link = link_lookup(problem)
    cuts = cut_bytes(problem) * microbatch
    replicas = [replica_costs(problem, microbatch, stages_in, k) for k in range(len(stages_in))]
    stages = []
    for k, p in enumerate(stages_in):
        wire = wire_bytes(problem, p.end, p.codec_out)
        if wire is None:
            raise PlanError(f"stage {k}: cut {p.end} offers no codec {p.codec_out!r}")
        wire *= microbatch
        rep = replicas[k]
        if k + 1 < len(stages_in):
            down = stages_in[k + 1].devices
            pair = [[transfer_seconds(wire, *link(x, y)) for y in down] for x in p.devices]
            hop_step = _hop_step(pair, rep.weights, replicas[k + 1].weights)
            send = max(max(row) for row in pair)
        else:
            rates = [client_bandwidth(problem, d) for d in p.devices]
            send = 0.0 if rates[0] is None else max(transfer_seconds(wire, r) for r in rates)
            hop_step = send
        own = max(w * c for w, c in zip(rep.weights, rep.cycle, strict=True))
        segs = problem.model.segments
        effects = stage_effects(problem, p.first, p.end, p.codec_out, p.int8)
        stages.append(Stage(
            replicas=tuple(Replica(d, w) for d, w in zip(p.devices, rep.weights, strict=True)),
            first_segment=p.first,
            end_segment=p.end,
            cut_in=segs[p.first].name if p.first > 0 else None,
            cut_out=segs[p.end].name if p.end < n else None,
            compute_s=max(rep.compute),
            send_s=send,
            memory_bytes=stage_memory(problem, microbatch, p.first, p.end, p.int8),
            memory_capacity=min(problem.device(d).memory_bytes for d in p.devices),
            comm_s=max(rep.comm),
            time_s=max(own, hop_step),
            codec_out=p.codec_out,
            int8_weights=p.int8,
            error=combine_effects(effects) if effects else None,
        ))
    rates = [client_bandwidth(problem, d) for d in stages_in[0].devices]
    client_in = 0.0 if rates[0] is None else max(transfer_seconds(float(cuts[0]), r) for r in rates)
    times = [s.time_s for s in stages]
    slowest = int(np.argmax(times))
    if client_in > times[slowest]:
        bottleneck, bottleneck_s = CLIENT_LINK, client_in
    else:
        bottleneck, bottleneck_s = slowest, times[slowest]
    latency = client_in + math.fsum(s.latency_s for s in stages)
    throughput = microbatch / bottleneck_s if bottleneck_s > 0 else math.inf
    effects = [e for p in stages_in for e in stage_effects(problem, p.first, p.end, p.codec_out, p.int8)]
    units = _units(problem, effects)
    error = combine_effects(effects) if effects else None
    return Evaluation(tuple(stages), client_in, bottleneck, bottleneck_s, throughput, latency, error, units)


def _units(problem: Problem, effects: list[ErrorEffect]) -> float:
    if not effects:
        return 0.0
    if problem.max_error is None:
        return math.inf  # a lossy choice with no budget to spend
    return math.fsum(error_units(e, problem.max_error) for e in effects)


def replica_costs(problem: Problem, microbatch: int, stages: Sequence[PlacementLike], k: int) -> ReplicaCosts:
    """Per replica of stage k: compute, comm CPU and cycle seconds, and the weights it gets."""
    stages = [as_placement(s) for s in stages]
    p = stages[k]
    if len(set(p.devices)) != len(p.devices):
        raise PlanError(f"stage {k}: a device is listed twice among its replicas")
    codec_in = stages[k - 1].codec_out if k else "raw"
    cuts = cut_bytes(problem) * microbatch
    compute, comm, cycle = [], [], []
    for name in p.devices:
        try:
            kind = problem.device(name).type
        except ValueError as exc:
            raise PlanError(f"stage {k}: {exc}") from None
        seconds = stage_seconds(problem, kind, microbatch, p.int8)
        if seconds is None:
            raise PlanError(f"stage {k}: device {name!r} (type {kind!r}) has no int8 compute figures")
        c = math.fsum(seconds[p.first:p.end])
        recv, _ = comm_seconds(problem, kind, codec_in, float(cuts[p.first]))
        _, send = comm_seconds(problem, kind, p.codec_out, float(cuts[p.end]))
        share = problem.device_type(kind).comm_share
        compute.append(c)
        comm.append(recv + send)
        cycle.append(max(c + share * (recv + send), recv, send))
    if p.weights is not None:
        if len(p.weights) != len(p.devices):
            raise PlanError(f"stage {k}: {len(p.weights)} weights for {len(p.devices)} replicas")
        total = math.fsum(p.weights)
        weights = tuple(w / total for w in p.weights)
    else:
        weights = speed_weights(cycle)
    return ReplicaCosts(tuple(compute), tuple(comm), tuple(cycle), weights)


def speed_weights(cycles: Sequence[float]) -> tuple[float, ...]:
    """Shares of the microbatches in proportion to each replica's speed (1 / cycle), so every
    replica is equally busy; equal shares when some replica takes no time at all."""
    if len(cycles) == 1:
        return (1.0,)
    if any(c <= 0 for c in cycles):
        return tuple(1.0 / len(cycles) for _ in cycles)
    speeds = [1.0 / c for c in cycles]
    total = math.fsum(speeds)
    return tuple(s / total for s in speeds)


def _hop_step(pair: list[list[float]], up: tuple[float, ...], down: tuple[float, ...]) -> float:
    """The busiest device of a hop when each device sends (and receives) one message at a time:
    x sends its share up[x] of the microbatches, each to y with probability down[y]."""
    egress = [w * math.fsum(v * t for v, t in zip(down, row, strict=True)) for w, row in zip(up, pair, strict=True)]
    ingress = [v * math.fsum(w * pair[i][j] for i, w in enumerate(up)) for j, v in enumerate(down)]
    return max(*egress, *ingress)


def make_plan(
    problem: Problem,
    microbatch: int,
    placements: Sequence[PlacementLike],
    *,
    solver: str,
    optimal: bool = False,
    lower_bound_s: float = math.nan,
    solve_time_s: float = 0.0,
    left_out: dict[str, str] | None = None,
    throughput_slack: float = 0.0,
) -> Plan:
    ev = evaluate(problem, microbatch, placements)
    return Plan(
        model_id=problem.model.model_id,
        model_sha256=problem.model.model_sha256,
        microbatch=microbatch,
        stages=ev.stages,
        throughput=ev.throughput,
        latency_s=ev.latency_s,
        bottleneck=ev.bottleneck,
        solver=solver,
        optimal=optimal,
        lower_bound_s=lower_bound_s,
        solve_time_s=solve_time_s,
        left_out=dict(left_out or {}),
        problem_sha256=problem.sha256(),
        client_in_s=ev.client_in_s,
        predicted_error=ev.error,
        max_error=problem.max_error,
        throughput_slack=throughput_slack,
    )
