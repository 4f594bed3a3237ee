"""Helpers for the planner tests: small models, random problems, and an evaluator and brute-force
search written from the cost-model text (docs/planner.md), independent of planner/cost.py."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from edgepipe.planner.problem import Device, DeviceType, Link, ModelSpec, Problem, Segment
from hypothesis import strategies as st

TOL = 1e-9


def vit_like(blocks: int = 4, width: int = 64, tokens: int = 17) -> ModelSpec:
    """A small transformer at quarter-block granularity: 4 segments per block with the usual
    weight, FLOP and cut-size pattern (two tensors cross the in-block cuts)."""
    d, n, f = width, tokens, 4
    segs = []
    for k in range(blocks):
        segs += [
            Segment("input" if k == 0 else f"blocks.{k}", (3 * d * d) * f, (3 * n * d + 2 * n * n) * f,
                    2 * n * d * f, float(6 * n * d * d + 4 * n * n * d)),
            Segment(f"blocks.{k}.attn.proj", d * d * f, 2 * n * d * f, n * d * f, float(2 * n * d * d)),
            Segment(f"blocks.{k}.norm2", 4 * d * d * f, 5 * n * d * f, 5 * n * d * f, float(8 * n * d * d)),
            Segment(f"blocks.{k}.mlp.fc2", 4 * d * d * f, 5 * n * d * f, n * d * f, float(8 * n * d * d)),
        ]
    last = segs[-1]
    segs[-1] = Segment(last.name, last.weight_bytes, last.activation_bytes, 10 * f, last.flops)
    return ModelSpec(f"vit-like-{blocks}x{width}", "0" * 64, 3 * 32 * 32 * f, tuple(segs))


# --- an independent reading of the cost model -------------------------------------------------


def seconds(problem: Problem, type_name: str, mb: int) -> list[float] | None:
    t = next(t for t in problem.device_types if t.name == type_name)
    if mb in t.profiles:
        return list(t.profiles[mb])
    if t.reference is not None:
        base = seconds(problem, t.reference, mb)
        return None if base is None else [x / t.speed for x in base]
    if t.gflops is not None:
        return [s.flops * mb / (t.gflops * 1e9) for s in problem.model.segments]
    return None


def link(problem: Problem, a: str, b: str) -> tuple[float, float]:
    for k in problem.links:
        if {k.a, k.b} == {a, b}:
            return k.bandwidth_mbps, k.latency_s
    nic = {d.name: d.bandwidth_mbps for d in problem.devices}
    return min(nic[a], nic[b]), 0.0


def cut(problem: Problem, j: int) -> int:
    return problem.model.input_bytes if j == 0 else problem.model.segments[j - 1].out_bytes


@dataclass(frozen=True)
class Reference:
    bottleneck_s: float
    latency_s: float
    fits: bool
    client_in_s: float
    stages: tuple[tuple[float, float, int], ...]  # (compute, send, memory) per stage


def evaluate(problem: Problem, mb: int, placements: list[tuple[str, int, int]]) -> Reference | None:
    """None when a device has no compute figures at this microbatch."""
    devices = {d.name: d for d in problem.devices}
    segs = problem.model.segments
    client = problem.client_bandwidth_mbps
    stages = []
    for k, (name, i, j) in enumerate(placements):
        secs = seconds(problem, devices[name].type, mb)
        if secs is None:
            return None
        compute = sum(secs[i:j])
        if k + 1 < len(placements):
            bw, lat = link(problem, name, placements[k + 1][0])
            send = lat + cut(problem, j) * mb * 8 / (bw * 1e6)
        elif client is None:
            send = 0.0
        else:
            send = cut(problem, j) * mb * 8 / (min(client, devices[name].bandwidth_mbps) * 1e6)
        memory = (sum(s.weight_bytes for s in segs[i:j])
                  + mb * (max(s.activation_bytes for s in segs[i:j])
                          + problem.queue_depth * (cut(problem, i) + cut(problem, j)))
                  + problem.runtime_overhead_bytes)
        stages.append((compute, send, memory))
    client_in = 0.0
    if client is not None:
        first = devices[placements[0][0]]
        client_in = problem.model.input_bytes * mb * 8 / (min(client, first.bandwidth_mbps) * 1e6)
    bottleneck = max([client_in] + [max(c, s) for c, s, _ in stages])
    latency = client_in + sum(c + s for c, s, _ in stages)
    capacities = [devices[name].memory_bytes for name, _, _ in placements]
    fits = all(memory <= cap for (_, _, memory), cap in zip(stages, capacities, strict=True))
    return Reference(bottleneck, latency, fits, client_in, tuple(stages))


@dataclass(frozen=True)
class Best:
    throughput: float
    latency_s: float
    n_devices: int
    bottleneck_s: float
    microbatch: int


def brute_force(problem: Problem, sizes: list[int]) -> Best | None:
    """Every ordered choice of devices and every split of the segments, at each microbatch size:
    highest throughput, then lowest latency, then fewest devices (ties within TOL)."""
    n = len(problem.model.segments)
    names = [d.name for d in problem.devices]
    found = []
    for mb in sizes:
        for k in range(1, min(len(names), n) + 1):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = (0, *cuts, n)
                for order in itertools.permutations(names, k):
                    ref = evaluate(problem, mb, [(d, bounds[i], bounds[i + 1]) for i, d in enumerate(order)])
                    if ref is not None and ref.fits:
                        rate = mb / ref.bottleneck_s if ref.bottleneck_s > 0 else math.inf
                        found.append(Best(rate, ref.latency_s, k, ref.bottleneck_s, mb))
    if not found:
        return None
    top = max(f.throughput for f in found)
    found = [f for f in found if f.throughput >= top * (1 - TOL)]
    low = min(f.latency_s for f in found)
    found = [f for f in found if f.latency_s <= low * (1 + TOL)]
    return min(found, key=lambda f: (f.n_devices, f.latency_s))


# --- random small problems ---------------------------------------------------------------------


@st.composite
def small_problems(draw: st.DrawFn, max_devices: int = 5, max_segments: int = 7) -> Problem:
    """Up to 5 devices and 7 segments; memory sizes often tight, duplicated devices common (so
    classes of interchangeable devices form), sometimes per-pair links and a modelled client."""
    n = draw(st.integers(1, max_segments))
    # Zero-byte cuts and zero-second segments make exact latency ties, where fewer devices must win.
    segments = tuple(
        Segment(f"s{i}", weight_bytes=draw(st.integers(0, 60)), activation_bytes=draw(st.integers(0, 12)),
                out_bytes=draw(st.sampled_from([0, 4, 16, 64])), flops=float(draw(st.integers(1, 9))))
        for i in range(n)
    )
    model = ModelSpec("random", "", draw(st.sampled_from([0, 8, 40])), segments)
    def profile() -> tuple[float, ...]:
        return tuple(float(draw(st.integers(0, 9))) for _ in range(n))

    if draw(st.booleans()):
        types = [DeviceType("t0", profiles={4: profile(), 8: profile()})]
    else:
        types = [DeviceType("t0", gflops=draw(st.sampled_from([4e-9, 8e-9, 16e-9])))]
    for k in range(1, draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["gflops", "reference", "profile8"]))
        if kind == "gflops":
            types.append(DeviceType(f"t{k}", gflops=draw(st.sampled_from([2e-9, 8e-9, 32e-9]))))
        elif kind == "reference":
            types.append(DeviceType(f"t{k}", reference="t0", speed=draw(st.sampled_from([0.5, 2.0, 3.0]))))
        else:  # profiled at 8 only: unusable when the planner tries microbatch 4
            types.append(DeviceType(f"t{k}", profiles={8: profile()}))
    names = [f"d{i}" for i in range(draw(st.integers(2, max_devices)))]
    # Bandwidths are tiny so that sending (bytes * microbatch * 8 bits) takes seconds, like computing.
    devices = tuple(
        Device(name, type=draw(st.sampled_from([t.name for t in types])),
               memory_bytes=draw(st.sampled_from([120, 200, 320, 10**6])),
               bandwidth_mbps=draw(st.sampled_from([5e-5, 1e-4, 4e-4])))
        for name in names
    )
    links = []
    if draw(st.booleans()):
        for a, b in itertools.combinations(names, 2):
            if draw(st.booleans()):
                bandwidth = draw(st.sampled_from([2e-5, 2e-4, 1e-3]))
                links.append(Link(a, b, bandwidth, draw(st.sampled_from([0.0, 1.0, 4.0]))))
    return Problem(
        model=model,
        device_types=tuple(types),
        devices=devices,
        links=tuple(links),
        microbatch=draw(st.sampled_from([8, 4, None])),
        client_bandwidth_mbps=draw(st.sampled_from([None, 1e-4, 4e-4])),
        runtime_overhead_bytes=draw(st.sampled_from([0, 40])),
        queue_depth=draw(st.integers(1, 2)),
    )
