"""Predict how a plan runs: in steady state, or microbatch by microbatch with bounded queues.

``steady_state`` re-evaluates a plan's stages under a (possibly different) problem: change a
bandwidth, a device's speed or the microbatch's profile and ask what this plan would now do.

``simulate`` plays a stream of microbatches through the runtime's structure: per stage a compute
step and a send step (separate threads in the agent), an input queue and an output queue of
``queue_depth`` microbatches each, and a sender that blocks while the next queue is full. Service
times are the cost model's. It is the tandem-queue recurrence for blocking after service:

    start[s][m]  = max(depart[s-1][m], depart[s][m-1])
    depart[s][m] = max(start[s][m] + time[s], depart[s+1][m - capacity[s] - 1])

exact for deterministic times, so its throughput converges to the steady state's and its first
microbatch's latency equals the plan's latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cost import evaluate
from .plan import Plan
from .problem import Problem


@dataclass(frozen=True)
class Prediction:
    throughput: float  # samples / s
    latency_s: float  # one microbatch through an empty pipeline
    bottleneck: int  # stage index, or -1 for the client link
    stage_s: tuple[float, ...]  # max(compute, send) per stage
    fits: bool


@dataclass(frozen=True)
class Simulation:
    throughput: float  # samples / s over the second half of the run
    latency_s: float  # median time from leaving the client to returning to it
    latency_max_s: float
    makespan_s: float
    n_microbatches: int
    queue_depth: int


def steady_state(problem: Problem, plan: Plan) -> Prediction:
    """The plan's stages, re-costed under ``problem`` at the plan's microbatch."""
    ev = evaluate(problem, plan.microbatch, _placements(plan))
    return Prediction(ev.throughput, ev.latency_s, ev.bottleneck, tuple(s.time_s for s in ev.stages),
                      all(s.fits for s in ev.stages))


def simulate(
    problem: Problem, plan: Plan, n_microbatches: int = 64, queue_depth: int | None = None
) -> Simulation:
    """Run ``n_microbatches`` through the plan, all ready at the client at time 0."""
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches must be >= 1, got {n_microbatches}")
    depth = problem.queue_depth if queue_depth is None else queue_depth
    if depth < 1:
        raise ValueError(f"queue_depth must be >= 1, got {depth}")
    ev = evaluate(problem, plan.microbatch, _placements(plan))
    times, capacity = _stations(ev.client_in_s, [(s.compute_s, s.send_s) for s in ev.stages], depth,
                                problem.client_bandwidth_mbps is not None)
    depart = _run(times, capacity, n_microbatches)
    entered = [_start(depart, times, 0, m) for m in range(n_microbatches)]
    done = depart[-1]
    latencies = sorted(done[m] - entered[m] for m in range(n_microbatches))
    half = n_microbatches // 2
    if n_microbatches >= 4 and done[-1] > done[half]:
        throughput = (n_microbatches - 1 - half) * plan.microbatch / (done[-1] - done[half])
    else:
        throughput = n_microbatches * plan.microbatch / done[-1] if done[-1] > 0 else math.inf
    median = latencies[len(latencies) // 2]
    return Simulation(throughput, median, latencies[-1], done[-1], n_microbatches, depth)


def _placements(plan: Plan) -> list[tuple[str, int, int]]:
    return [(s.device, s.first_segment, s.end_segment) for s in plan.stages]


def _stations(client_in: float, stages: list[tuple[float, float]], depth: int,
              client: bool) -> tuple[list[float], list[int]]:
    """Service time of each step in order, and the queue capacity after each step."""
    times: list[float] = [client_in] if client else []
    capacity: list[int] = [depth] if client else []  # the first stage's input queue
    for compute, send in stages:
        times += [compute, send]
        capacity += [depth, depth]  # this stage's output queue, the next stage's input queue
    capacity[-1] = 0  # the client takes results as they come
    return times, capacity


def _run(times: list[float], capacity: list[int], n: int) -> list[list[float]]:
    steps = len(times)
    depart = [[0.0] * n for _ in range(steps)]
    for m in range(n):
        for s in range(steps):
            start = _start(depart, times, s, m)
            finish = start + times[s]
            if s + 1 < steps and m - capacity[s] - 1 >= 0:
                finish = max(finish, depart[s + 1][m - capacity[s] - 1])  # blocked: next queue full
            depart[s][m] = finish
    return depart


def _start(depart: list[list[float]], times: list[float], s: int, m: int) -> float:
    arrived = depart[s - 1][m] if s > 0 else 0.0
    free = depart[s][m - 1] if m > 0 else 0.0
    return max(arrived, free)
