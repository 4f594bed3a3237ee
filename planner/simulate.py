"""Predict how a plan runs: in steady state, or microbatch by microbatch with bounded queues.

``steady_state`` re-evaluates a plan's stages under a (possibly different) problem: change a
bandwidth, a device's speed or the microbatch's profile and ask what this plan would now do.

``simulate`` plays a stream of microbatches through the runtime's structure. Each step is a
*station*: the client link, then per stage its replicas (compute with its receive and send
threads) and its output hop. A station has one or more servers; a server takes ``sojourn``
seconds for one microbatch and can start the next ``cycle`` seconds after the previous one (a
replica receives, computes and sends one microbatch in recv + compute + send seconds, but its
threads overlap, so it takes a new one every max(compute + share * comm, recv, send) seconds;
a hop's transfer takes its wire time, and hops between replicated stages run min(r, r') transfers
at once). A microbatch goes to the server that can start it first (the runtime gives it to the
replica with free credit). Between stations, queues hold ``queue_depth`` microbatches; a server
whose result finds the next queue full holds it (and its next start) until there is room:

    start[s][m]  = max(depart[s-1][m], ready of the chosen server)
    depart[s][m] = max(start[s][m] + sojourn, depart[s+1][m - capacity[s] - servers[s+1]],
                       depart[s][m-1])   (the last term does not hold the server)

With one server per station and sojourn = cycle this is the tandem-queue recurrence for blocking
after service, exact for deterministic times: its rate converges to the steady state's, and its
first microbatch takes exactly the plan's latency. Each replica has queues of its own, so a stage
of r replicas buffers r * queue_depth microbatches on each side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cost import evaluate, placements_of, replica_costs
from .plan import Plan
from .problem import Problem


@dataclass(frozen=True)
class Prediction:
    throughput: float  # samples / s
    latency_s: float  # one microbatch through an empty pipeline
    bottleneck: int  # stage index, or -1 for the client link
    stage_s: tuple[float, ...]  # each stage's steady-state time per microbatch
    fits: bool


@dataclass(frozen=True)
class Simulation:
    throughput: float  # samples / s over the second half of the run
    latency_s: float  # median time from leaving the client to returning to it
    latency_max_s: float
    makespan_s: float
    n_microbatches: int
    queue_depth: int


@dataclass(frozen=True)
class Server:
    sojourn: float  # one microbatch, start to finish
    cycle: float  # the least time between two starts


@dataclass(frozen=True)
class Station:
    servers: tuple[Server, ...]


def steady_state(problem: Problem, plan: Plan) -> Prediction:
    """The plan's stages, re-costed under ``problem`` at the plan's microbatch."""
    ev = evaluate(problem, plan.microbatch, placements_of(plan))
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
    stations = plan_stations(problem, plan)
    capacity = _queues(plan, depth, problem.client_bandwidth_mbps is not None)
    starts, depart = _run(stations, capacity, n_microbatches)
    entered = starts[0]
    done = depart[-1]
    latencies = sorted(done[m] - entered[m] for m in range(n_microbatches))
    # Replicas finish in bursts that repeat every lcm(replica counts) microbatches: measure the
    # rate over a whole number of those periods in the second half of the run.
    period = math.lcm(*(len(st.servers) for st in stations))
    span = (n_microbatches - 1 - n_microbatches // 2) // period * period or n_microbatches - 1 - n_microbatches // 2
    half = n_microbatches - 1 - span
    if n_microbatches >= 4 and done[-1] > done[half]:
        throughput = span * plan.microbatch / (done[-1] - done[half])
    else:
        throughput = n_microbatches * plan.microbatch / done[-1] if done[-1] > 0 else math.inf
    median = latencies[len(latencies) // 2]
    return Simulation(throughput, median, latencies[-1], done[-1], n_microbatches, depth)


def plan_stations(problem: Problem, plan: Plan) -> list[Station]:
    """The plan as stations, with the cost model's times under ``problem``."""
    placements = placements_of(plan)
    ev = evaluate(problem, plan.microbatch, placements)
    stages = ev.stages
    stations: list[Station] = []
    if problem.client_bandwidth_mbps is not None:
        stations.append(Station((Server(ev.client_in_s, ev.client_in_s),)))
    for k, s in enumerate(stages):
        costs = replica_costs(problem, plan.microbatch, placements, k)
        stations.append(Station(tuple(Server(compute + comm, cycle) for compute, comm, cycle in zip(
            costs.compute, costs.comm, costs.cycle, strict=True))))
        lanes = min(len(s.devices), len(stages[k + 1].devices)) if k + 1 < len(stages) else 1
        # A hop's transfers take the wire time (the slowest pair); min(r, r') of them run at once.
        stations.append(Station(tuple(Server(s.send_s, s.send_s) for _ in range(lanes))))
    return stations


def _queues(plan: Plan, depth: int, client: bool) -> list[int]:
    """Microbatches the runtime can hold after each station: every replica has an input and an
    output queue of ``depth`` (so a stage of r replicas holds r * depth on each side); the client
    takes results as they come."""
    replicas = [len(s.replicas) for s in plan.stages]
    out = [depth * replicas[0]] if client else []
    for k, r in enumerate(replicas):
        out += [depth * r, depth * replicas[k + 1] if k + 1 < len(replicas) else 0]
    return out


def _run(stations: list[Station], capacity: list[int], n: int) -> tuple[list[list[float]], list[list[float]]]:
    steps = len(stations)
    start = [[0.0] * n for _ in range(steps)]
    depart = [[0.0] * n for _ in range(steps)]
    ready = [[0.0] * len(st.servers) for st in stations]  # when each server may start its next microbatch
    for m in range(n):
        for s, station in enumerate(stations):
            arrived = depart[s - 1][m] if s > 0 else 0.0
            chosen = min(range(len(station.servers)), key=lambda i, s=s, a=arrived: (max(a, ready[s][i]), i))
            server = station.servers[chosen]
            start[s][m] = max(arrived, ready[s][chosen])
            finish = start[s][m] + server.sojourn
            ahead = m - capacity[s] - len(stations[s + 1].servers) if s + 1 < steps else -1
            if ahead >= 0:
                finish = max(finish, depart[s + 1][ahead])  # blocked: the queue and servers after are full
            # The server starts its next microbatch a cycle later, or as late as back-pressure
            # delayed this one.
            ready[s][chosen] = max(start[s][m] + server.cycle, finish - server.sojourn + server.cycle)
            # Results are passed on in order: one that a faster replica finished early waits in its
            # output queue (the replica carries on) until the ones before it have gone.
            depart[s][m] = max(finish, depart[s][m - 1]) if m > 0 else finish
    return start, depart
