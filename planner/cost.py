"""The cost model: how long a stage computes and sends, how much memory it needs.

One definition, used by the solver (as arrays), the baselines and the simulator (per stage), so
every plan is judged by the same numbers. Times are per microbatch.

- compute: sum of the device type's segment seconds (problem.segment_seconds);
- send: link latency + bytes * 8 / bandwidth; a link runs at the smaller NIC of its two ends
  unless a Link entry gives that pair's own bandwidth and latency;
- stage time: max(compute, send), since the runtime computes microbatch k+1 while sending k;
- memory: weights + microbatch * (largest activation of its segments + queue_depth * (input
  bytes + output bytes per sample)) + runtime overhead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .plan import CLIENT_LINK, Plan, Stage
from .problem import Problem, segment_seconds


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


def stage_memory(problem: Problem, microbatch: int, first: int, end: int) -> int:
    segs = problem.model.segments[first:end]
    cuts = cut_bytes(problem)
    io = int(cuts[first]) + int(cuts[end])
    peak = max(s.activation_bytes for s in segs)
    return (sum(s.weight_bytes for s in segs) + microbatch * (peak + problem.queue_depth * io)
            + problem.runtime_overhead_bytes)


def memory_matrix(problem: Problem, microbatch: int) -> np.ndarray:
    """mem[i, j] = stage_memory(i, j) for i < j, +inf elsewhere; shape (S+1, S+1)."""
    segs = problem.model.segments
    n = len(segs)
    weights = np.concatenate([[0.0], np.cumsum([s.weight_bytes for s in segs], dtype=np.float64)])
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


@dataclass(frozen=True)
class Evaluation:
    stages: tuple[Stage, ...]
    client_in_s: float
    bottleneck: int
    bottleneck_s: float
    throughput: float
    latency_s: float


def evaluate(problem: Problem, microbatch: int, placements: Sequence[tuple[str, int, int]]) -> Evaluation:
    """Cost of running stages ``(device, first_segment, end_segment)`` in this order."""
    if not placements:
        raise ValueError("a plan needs at least one stage")
    segs = problem.model.segments
    cuts = cut_bytes(problem) * microbatch
    seconds: dict[str, np.ndarray] = {}
    link = link_lookup(problem)
    stages = []
    for k, (name, first, end) in enumerate(placements):
        device = problem.device(name)
        if device.type not in seconds:
            seconds[device.type] = segment_seconds(problem, device.type, microbatch)
        compute = math.fsum(seconds[device.type][first:end])
        if k + 1 < len(placements):
            send = transfer_seconds(float(cuts[end]), *link(name, placements[k + 1][0]))
        else:
            rate = client_bandwidth(problem, name)
            send = 0.0 if rate is None else transfer_seconds(float(cuts[end]), rate)
        stages.append(Stage(
            device=name,
            first_segment=first,
            end_segment=end,
            cut_in=segs[first].name if first > 0 else None,
            cut_out=segs[end].name if end < len(segs) else None,
            compute_s=compute,
            send_s=send,
            memory_bytes=stage_memory(problem, microbatch, first, end),
            memory_capacity=device.memory_bytes,
        ))
    rate = client_bandwidth(problem, placements[0][0])
    client_in = 0.0 if rate is None else transfer_seconds(float(cuts[0]), rate)
    times = [s.time_s for s in stages]
    slowest = int(np.argmax(times))
    if client_in > times[slowest]:
        bottleneck, bottleneck_s = CLIENT_LINK, client_in
    else:
        bottleneck, bottleneck_s = slowest, times[slowest]
    latency = client_in + math.fsum(s.compute_s + s.send_s for s in stages)
    throughput = microbatch / bottleneck_s if bottleneck_s > 0 else math.inf
    return Evaluation(tuple(stages), client_in, bottleneck, bottleneck_s, throughput, latency)


def make_plan(
    problem: Problem,
    microbatch: int,
    placements: Sequence[tuple[str, int, int]],
    *,
    solver: str,
    optimal: bool = False,
    lower_bound_s: float = math.nan,
    solve_time_s: float = 0.0,
    left_out: dict[str, str] | None = None,
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
    )
