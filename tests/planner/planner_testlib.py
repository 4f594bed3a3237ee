"""Helpers for the planner tests: small models, random problems, and an evaluator and brute-force
search written from the cost-model text (docs/planner.md), independent of planner/cost.py and of
the solver's tables: stages on replica groups, activation codecs, int8 weights, comm costs and the
error budget are all re-read from the docs here."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from edgepipe.planner.problem import (
    CommCost,
    CutCodec,
    Device,
    DeviceType,
    ErrorBudget,
    ErrorEffect,
    Int8Speed,
    Int8Weights,
    Link,
    ModelSpec,
    Problem,
    Segment,
)
from hypothesis import strategies as st

TOL = 1e-9
EXAMPLES = Path(__file__).parents[2] / "planner" / "examples"


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


def seconds(problem: Problem, type_name: str, mb: int, int8: bool = False) -> list[float] | None:
    """A type's seconds per segment; with ``int8``, the int8 seconds of the segments that have an
    int8 variant and the fp32 seconds of the others (None: the type has no int8 figures)."""
    if int8:
        fp32, quantized = seconds(problem, type_name, mb), _int8_seconds(problem, type_name, mb)
        if fp32 is None or quantized is None:
            return None
        return [q if s.int8 is not None else f for q, f, s in zip(quantized, fp32, problem.model.segments, strict=True)]
    t = next(t for t in problem.device_types if t.name == type_name)
    if mb in t.profiles:
        return list(t.profiles[mb])
    if t.reference is not None:
        base = seconds(problem, t.reference, mb)
        return None if base is None else [x / t.speed for x in base]
    if t.gflops is not None:
        return [s.flops * mb / (t.gflops * 1e9) for s in problem.model.segments]
    return None


def _int8_seconds(problem: Problem, type_name: str, mb: int) -> list[float] | None:
    """The int8 resolution order of docs/formats/plan.md: own profile, reference / speed, gflops."""
    t = next(t for t in problem.device_types if t.name == type_name)
    if t.int8 is not None and mb in t.int8.profiles:
        return list(t.int8.profiles[mb])
    if t.reference is not None:
        base = _int8_seconds(problem, t.reference, mb)
        if base is not None:
            return [x / t.speed for x in base]
    if t.int8 is not None and t.int8.gflops is not None:
        return [s.flops * mb / (t.int8.gflops * 1e9) for s in problem.model.segments]
    return None


def link(problem: Problem, a: str, b: str) -> tuple[float, float]:
    for k in problem.links:
        if {k.a, k.b} == {a, b}:
            return k.bandwidth_mbps, k.latency_s
    nic = {d.name: d.bandwidth_mbps for d in problem.devices}
    return min(nic[a], nic[b]), 0.0


def cut(problem: Problem, j: int) -> int:
    return problem.model.input_bytes if j == 0 else problem.model.segments[j - 1].out_bytes


def wire(problem: Problem, j: int, codec: str) -> int | None:
    """Bytes per sample of cut j in ``codec`` (None: not offered there)."""
    if codec == "raw":
        return cut(problem, j)
    if not 0 < j < len(problem.model.segments):
        return None
    entry = next((c for c in problem.model.segments[j - 1].codecs if c.codec == codec), None)
    return None if entry is None else entry.out_bytes


def comm(problem: Problem, type_name: str, codec: str, n_bytes: float) -> tuple[float, float]:
    t = next(t for t in problem.device_types if t.name == type_name)
    for c in t.comm:
        if c.codec == codec and c.secure == problem.secure:
            return (c.recv_per_message_s + c.recv_per_byte_s * n_bytes,
                    c.send_per_message_s + c.send_per_byte_s * n_bytes)
    return 0.0, 0.0


def share(effect: ErrorEffect, budget: ErrorBudget | None) -> float:
    """The docs' rule: the largest fraction of the budget over its named measures (angles for cosine),
    in units of 2**-32 rounded up; inf when over the whole budget or when there is no budget."""
    if budget is None:
        return math.inf
    parts = [0.0]
    if budget.max_abs_diff is not None and effect.max_abs_diff > 0:
        parts.append(effect.max_abs_diff / budget.max_abs_diff if budget.max_abs_diff > 0 else math.inf)
    if budget.cosine is not None:
        used = math.acos(min(1.0, max(-1.0, effect.cosine)))
        allowed = math.acos(min(1.0, max(-1.0, budget.cosine)))
        if used > 0:
            parts.append(used / allowed if allowed > 0 else math.inf)
    if budget.top1_agreement is not None:
        lost = 1.0 - (1.0 if effect.top1_agreement is None else effect.top1_agreement)
        if lost > 0:
            parts.append(lost / (1.0 - budget.top1_agreement) if budget.top1_agreement < 1 else math.inf)
    frac = max(parts)
    return math.inf if frac > 1 else float(math.ceil(frac * 2**32))


@dataclass(frozen=True)
class Reference:
    bottleneck_s: float
    latency_s: float
    fits: bool
    client_in_s: float
    stages: tuple[tuple[float, float, int], ...]  # (compute, send, memory) per stage
    times: tuple[float, ...] = ()  # each stage's steady-state time (its own step and its output hop)
    comm: tuple[float, ...] = ()  # recv + send CPU per stage (the slowest replica)
    error_units: float = 0.0  # inf: over the budget (or lossy with no budget)


StageSpec = tuple  # (device or devices, first, end[, codec_out[, int8]])


def _spec(stage: StageSpec) -> tuple[tuple[str, ...], int, int, str, bool]:
    devices, first, end, *rest = stage
    devices = (devices,) if isinstance(devices, str) else tuple(devices)
    codec = rest[0] if rest else "raw"
    int8 = rest[1] if len(rest) > 1 else False
    return devices, first, end, codec, int8


def evaluate(problem: Problem, mb: int, placements: list[StageSpec]) -> Reference | None:
    """The cost model of docs/planner.md for these stages, with replicas sharing a stage equally.
    None when a device has no compute figures (in the stage's variant) or a cut lacks the codec."""
    devices = {d.name: d for d in problem.devices}
    segs = problem.model.segments
    client = problem.client_bandwidth_mbps
    specs = [_spec(p) for p in placements]
    stages, times, comms, units = [], [], [], 0.0
    for k, (names, i, j, codec, int8) in enumerate(specs):
        codec_in = specs[k - 1][3] if k else "raw"
        w = wire(problem, j, codec)
        if w is None or (k + 1 == len(specs) and codec != "raw"):
            return None
        compute, cpu, cycle = [], [], []
        for name in names:
            kind = devices[name].type
            secs = seconds(problem, kind, mb, int8)
            if secs is None:
                return None
            c = sum(secs[i:j])
            recv, _ = comm(problem, kind, codec_in, cut(problem, i) * mb)
            _, send = comm(problem, kind, codec, cut(problem, j) * mb)
            frac = next(t for t in problem.device_types if t.name == kind).comm_share
            compute.append(c)
            cpu.append(recv + send)
            cycle.append(max(c + frac * (recv + send), recv, send))
        r = len(names)
        own = max(cycle) / r  # equal shares
        if k + 1 < len(specs):
            nxt = specs[k + 1][0]
            pair = [[link(problem, x, y)[1] + w * mb * 8 / (link(problem, x, y)[0] * 1e6) for y in nxt] for x in names]
            egress = [sum(row) / len(nxt) / r for row in pair]
            ingress = [sum(pair[a][b] for a in range(r)) / r / len(nxt) for b in range(len(nxt))]
            hop = max(egress + ingress)
            send_s = max(max(row) for row in pair)
        elif client is None:
            hop = send_s = 0.0
        else:
            send_s = max(w * mb * 8 / (min(client, devices[x].bandwidth_mbps) * 1e6) for x in names)
            hop = send_s
        effects = [s.int8.effect for s in segs[i:j] if int8 and s.int8 is not None]
        if codec != "raw":
            effects.append(next(c for c in segs[j - 1].codecs if c.codec == codec).effect)
        units += sum(share(e, problem.max_error) for e in effects)
        weights = sum((s.int8.weight_bytes if int8 and s.int8 is not None else s.weight_bytes) for s in segs[i:j])
        memory = (weights + mb * (max(s.activation_bytes for s in segs[i:j])
                                  + problem.queue_depth * (cut(problem, i) + cut(problem, j)))
                  + problem.runtime_overhead_bytes)
        capacity = min(devices[x].memory_bytes for x in names)
        stages.append((max(compute), send_s, memory if memory <= capacity else -memory))
        times.append(max(own, hop))
        comms.append(max(cpu))
    client_in = 0.0
    if client is not None:
        client_in = max(problem.model.input_bytes * mb * 8 / (min(client, devices[x].bandwidth_mbps) * 1e6)
                        for x in specs[0][0])
    bottleneck = max([client_in, *times])
    latency = client_in + sum(c + s + m for (c, s, _), m in zip(stages, comms, strict=True))
    fits = all(memory >= 0 for _, _, memory in stages)
    stages = [(c, s, abs(memory)) for c, s, memory in stages]
    return Reference(bottleneck, latency, fits, client_in, tuple(stages), tuple(times), tuple(comms), units)


@dataclass(frozen=True)
class Best:
    throughput: float
    latency_s: float
    n_devices: int
    bottleneck_s: float
    microbatch: int
    error_units: float = 0.0


def interchangeable(problem: Problem, x: str, y: str) -> bool:
    """Same type, memory and NIC, and the same link to every other device: what may share a stage."""
    dx, dy = problem.device(x), problem.device(y)
    if (dx.type, dx.memory_bytes, dx.bandwidth_mbps) != (dy.type, dy.memory_bytes, dy.bandwidth_mbps):
        return False
    return all(link(problem, x, z) == link(problem, y, z) for z in (d.name for d in problem.devices) if z not in (x, y))


def _groups(problem: Problem, names: list[str], most: int) -> list[tuple[str, ...]]:
    """Every non-empty set of up to ``most`` mutually interchangeable devices (in listed order)."""
    out = []
    for r in range(1, most + 1):
        for group in itertools.combinations(names, r):
            if all(interchangeable(problem, a, b) for a, b in itertools.combinations(group, 2)):
                out.append(group)
    return out


def brute_force(problem: Problem, sizes: list[int], max_replicas: int = 1, slack: float = 0.0) -> Best | None:
    """Every sequence of stages (cuts; a device, or a group of interchangeable devices, per stage;
    a codec per hop between stages; fp32 or int8 weights per stage), at each microbatch size: the
    highest throughput within the error budget (up to ``slack``), then the fewest error units, then
    the lowest latency, then the fewest devices (ties within TOL)."""
    n = len(problem.model.segments)
    names = [d.name for d in problem.devices]
    groups = _groups(problem, names, max_replicas)
    lossy = problem.max_error is not None
    offered = [["raw"]] + [["raw", *(c.codec for c in s.codecs)] if lossy else ["raw"] for s in problem.model.segments]
    variants = [False, True] if lossy and any(s.int8 is not None for s in problem.model.segments) else [False]
    found = []
    for mb in sizes:
        for k in range(1, min(len(names), n) + 1):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = (0, *cuts, n)
                for order in itertools.permutations(groups, k):
                    used = [d for g in order for d in g]
                    if len(set(used)) != len(used):
                        continue
                    for hop_codecs in itertools.product(*(offered[c] for c in cuts)):
                        for int8s in itertools.product(variants, repeat=k):
                            stages = [(g, bounds[i], bounds[i + 1], (*hop_codecs, "raw")[i], int8s[i])
                                      for i, g in enumerate(order)]
                            ref = evaluate(problem, mb, stages)
                            if ref is None or not ref.fits or ref.error_units > 2**32:
                                continue
                            rate = mb / ref.bottleneck_s if ref.bottleneck_s > 0 else math.inf
                            found.append(Best(rate, ref.latency_s, len(used), ref.bottleneck_s, mb, ref.error_units))
    if not found:
        return None
    top = max(f.throughput for f in found)
    found = [f for f in found if f.throughput * (1 + slack) * (1 + TOL) >= top]
    least = min(f.error_units for f in found)
    found = [f for f in found if f.error_units == least]
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


_EFFECTS = [ErrorEffect(0.002, 0.99999, 1.0), ErrorEffect(0.01, 0.9999, 0.99), ErrorEffect(0.03, 0.999, 0.97),
            ErrorEffect(0.0, 1.0, 1.0)]


@st.composite
def small_v2_problems(draw: st.DrawFn, max_devices: int = 4, max_segments: int = 4) -> Problem:
    """Problems with the version 2 features, scaled so that computing a segment, sending a cut and
    the comm CPU all take seconds (so each can set the pace): codecs offered at some cuts, int8
    variants of some segments and int8 speeds on some types, comm costs (every compute share), an
    error budget (or none), links and a client now and then, and identical devices to replicate."""
    n = draw(st.integers(2, max_segments))
    segments = []
    for i in range(n):
        out = draw(st.sampled_from([16, 32, 64])) if i < n - 1 else draw(st.sampled_from([0, 8]))
        weight = draw(st.sampled_from([0, 400, 900, 1500]))  # memory is mostly weights and queued cuts
        codecs = []
        if i < n - 1 and draw(st.booleans()):
            codecs.append(CutCodec("fp16", out // 2, draw(st.sampled_from(_EFFECTS))))
        if i < n - 1 and draw(st.booleans()):
            codecs.append(CutCodec("int8", out // 4 + 1, draw(st.sampled_from(_EFFECTS))))
        int8 = Int8Weights(weight // 4, draw(st.sampled_from(_EFFECTS))) if draw(st.booleans()) else None
        segments.append(Segment(f"s{i}", weight, draw(st.integers(0, 12)), out, float(draw(st.integers(1, 9))),
                                tuple(codecs), int8))
    model = ModelSpec("random-v2", "", draw(st.sampled_from([0, 16])), tuple(segments))

    def comm_costs() -> tuple[CommCost, ...]:
        if not draw(st.booleans()):
            return ()
        return tuple(
            CommCost(codec, secure, recv_per_message_s=draw(st.sampled_from([0.0, 1.0, 3.0])),
                     recv_per_byte_s=draw(st.sampled_from([0.0, 0.004])),
                     send_per_message_s=draw(st.sampled_from([0.0, 2.0])),
                     send_per_byte_s=draw(st.sampled_from([0.0, 0.002, 0.008])))
            for codec in ("raw", "fp16", "int8") for secure in (False, True) if draw(st.integers(0, 3)))

    def int8_speed(profiled: dict[int, tuple[float, ...]]) -> Int8Speed | None:
        choice = draw(st.sampled_from(["none", "gflops", "profile"]))
        if choice == "gflops":
            return Int8Speed(gflops=draw(st.sampled_from([6e-9, 12e-9])))
        if choice == "profile" and profiled:
            return Int8Speed(profiles={mb: tuple(x / 2 for x in secs) for mb, secs in profiled.items()})
        return None

    profiled = {mb: tuple(float(draw(st.integers(1, 9))) for _ in range(n)) for mb in (4, 8)}
    types = [DeviceType("t0", profiles=profiled if draw(st.booleans()) else {},
                        gflops=draw(st.sampled_from([2e-9, 4e-9])), int8=int8_speed(profiled),
                        comm=comm_costs(), comm_share=draw(st.sampled_from([0.0, 0.5, 1.0, 1.5])))]
    if draw(st.booleans()):
        types.append(DeviceType("t1", reference="t0", speed=draw(st.sampled_from([0.5, 2.0])),
                                int8=int8_speed({}), comm=comm_costs(), comm_share=draw(st.sampled_from([0.0, 1.0]))))
    kinds = [(draw(st.sampled_from([t.name for t in types])), draw(st.sampled_from([2500, 4000, 10**6])),
              draw(st.sampled_from([4e-4, 1e-3, 4e-3]))) for _ in range(2)]
    devices = tuple(Device(f"d{i}", *draw(st.sampled_from(kinds))) for i in range(draw(st.integers(2, max_devices))))
    links = ()
    if draw(st.integers(0, 3)) == 0:
        a, b = devices[0].name, devices[-1].name
        links = (Link(a, b, draw(st.sampled_from([1e-4, 2e-3])), draw(st.sampled_from([0.0, 1.0]))),)
    budget = draw(st.sampled_from([None, ErrorBudget(max_abs_diff=0.01), ErrorBudget(max_abs_diff=0.035),
                                   ErrorBudget(cosine=0.9995), ErrorBudget(max_abs_diff=0.05, top1_agreement=0.96)]))
    return Problem(model=model, device_types=tuple(types), devices=devices, links=links,
                   microbatch=draw(st.sampled_from([8, 4, None] if types[0].profiles else [8, 4])),
                   client_bandwidth_mbps=draw(st.sampled_from([None, 1e-3, 1e-2])),
                   runtime_overhead_bytes=draw(st.sampled_from([0, 20])), queue_depth=draw(st.integers(1, 2)),
                   max_error=budget, secure=draw(st.booleans()))
