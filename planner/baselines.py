"""What other systems would do with the same devices, judged by our cost model.

Each baseline picks stages by its own rule and is then evaluated under the true cost model, so
its throughput and latency compare directly with ``solve``'s. A baseline plan that does not fit
memory is returned anyway; ``plan.fits`` says so.

- even_split: the same number of segments per device, devices in the order listed.
- pipedream: PipeDream's partitioner: optimal for identical workers, so it assumes every device
  is the most common type (its profile, memory and NIC), then maps stages to devices in order.
- memory_proportional: exo / llama.cpp: segments in proportion to each device's memory,
  largest memory first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from .cost import cut_bytes, make_plan, memory_matrix
from .plan import Plan
from .problem import Problem, ProblemError, profiled_microbatches, segment_seconds


def even_split(problem: Problem, microbatch: int | None = None) -> Plan:
    mb = _microbatch(problem, microbatch)
    usable, left_out = _usable(problem, mb)
    n = len(problem.model.segments)
    k = min(len(usable), n)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    ends = np.cumsum(sizes)
    placements = [(usable[i], int(ends[i] - sizes[i]), int(ends[i])) for i in range(k)]
    left_out.update({d: "even split: more devices than segments" for d in usable[k:]})
    return make_plan(problem, mb, placements, solver="even-split", left_out=left_out)


def pipedream(problem: Problem, microbatch: int | None = None) -> Plan:
    mb = _microbatch(problem, microbatch)
    usable, left_out = _usable(problem, mb)
    kind = Counter(problem.device(d).type for d in usable).most_common(1)[0][0]
    ref = next(problem.device(d) for d in usable if problem.device(d).type == kind)
    n = len(problem.model.segments)
    prefix = np.concatenate([[0.0], np.cumsum(segment_seconds(problem, kind, mb))])
    comp = prefix[None, :] - prefix[:, None]
    cuts = cut_bytes(problem) * mb * 8.0 / (ref.bandwidth_mbps * 1e6)
    send = np.concatenate([cuts[:n], [0.0]])
    if problem.client_bandwidth_mbps is not None:
        rate = min(problem.client_bandwidth_mbps, ref.bandwidth_mbps)
        send[n] = cut_bytes(problem)[n] * mb * 8.0 / (rate * 1e6)
    stage = np.maximum(comp, send[None, :])
    upper = np.arange(n + 1)[None, :] > np.arange(n + 1)[:, None]
    fits = memory_matrix(problem, mb) <= ref.memory_bytes
    cost = np.where(upper & fits, stage, np.inf)
    if not np.isfinite(_partition(cost, min(len(usable), n))[0]):
        cost = np.where(upper, stage, np.inf)  # nothing fits its assumed memory: balance time alone
    bounds = _partition(cost, min(len(usable), n))[1]
    placements = [(usable[k], bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]
    left_out.update({d: f"pipedream: {len(placements)} stages suffice for identical {kind!r} devices"
                     for d in usable[len(placements):]})
    return make_plan(problem, mb, placements, solver="pipedream", left_out=left_out)


def memory_proportional(problem: Problem, microbatch: int | None = None) -> Plan:
    mb = _microbatch(problem, microbatch)
    usable, left_out = _usable(problem, mb)
    ranked = sorted(usable, key=lambda d: -problem.device(d).memory_bytes)
    memory = np.array([problem.device(d).memory_bytes for d in ranked], dtype=np.float64)
    n = len(problem.model.segments)
    ends = np.round(np.cumsum(memory) / memory.sum() * n).astype(int)
    placements, start = [], 0
    for name, end in zip(ranked, ends, strict=True):
        if end > start:
            placements.append((name, start, int(end)))
            start = int(end)
        else:
            left_out[name] = "memory-proportional: its share rounds to no segment"
    return make_plan(problem, mb, placements, solver="memory-proportional", left_out=left_out)


BASELINES: dict[str, Callable[[Problem, int | None], Plan]] = {
    "even-split": even_split,
    "pipedream": pipedream,
    "memory-proportional": memory_proportional,
}


def all_baselines(problem: Problem, microbatch: int | None = None) -> dict[str, Plan]:
    """Every baseline's plan, by name (compare at the microbatch of the plan you judge)."""
    return {name: rule(problem, microbatch) for name, rule in BASELINES.items()}


def _partition(cost: np.ndarray, most: int) -> tuple[float, list[int]]:
    """Split positions 0..S into at most ``most`` consecutive stages minimising the largest
    cost[i, j]; fewest stages among ties. Returns (value, boundaries)."""
    n = cost.shape[0] - 1
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    tables, values = [], []
    for _ in range(most):
        cand = np.maximum(best[:, None], cost)
        tables.append(np.argmin(cand, axis=0))
        best = cand.min(axis=0)
        values.append(best[n])
    k = int(np.argmin(values))  # first minimum: fewest stages
    bounds, end = [n], n
    for level in range(k, -1, -1):
        end = int(tables[level][end])
        bounds.append(end)
    return float(values[k]), bounds[::-1]


def _microbatch(problem: Problem, microbatch: int | None) -> int:
    if microbatch is not None:
        return microbatch
    if problem.microbatch is not None:
        return problem.microbatch
    sizes = profiled_microbatches(problem)
    if not sizes:
        raise ProblemError("microbatch: null and no size is profiled for every device type; give one")
    return sizes[0]


def _usable(problem: Problem, microbatch: int) -> tuple[list[str], dict[str, str]]:
    usable, left_out = [], {}
    for d in problem.devices:
        try:
            segment_seconds(problem, d.type, microbatch)
            usable.append(d.name)
        except ProblemError:
            left_out[d.name] = f"no compute figures for microbatch {microbatch}"
    if not usable:
        raise ProblemError(f"devices: none has compute figures for microbatch {microbatch}")
    return usable, left_out
