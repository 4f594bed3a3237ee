"""Planner benchmark: solve time at the issue's sizes, plan quality against the baselines, and
the predicted gains of compression, replication and int8 weights.

Models are ViT-Base/Large/Huge at sub-block granularity (4 segments per block: attention, its
projection, MLP up, MLP down; 48/96/128 segments), sized by hand from the architecture, since
this measures the planner and not the compiler:
    weights per block 12 d^2 * 4 bytes, FLOPs per sample 24 n d^2 + 4 n^2 d, and per cut n*d*4
    bytes (2x after attention, 5x after the MLP's first layer, where two tensors cross).
For the lossy choices (``--lossy``) each cut offers fp16 and int8 and each segment int8 weights,
with ASSUMED effects on the outputs (the compiler will measure the real ones), and each device
type gets comm costs of the order measured for the codecs on the benchmark machine.

    python tools/bench_planner.py                    # everything, prints tables
    python tools/bench_planner.py --json bench.json  # and writes the numbers
    python tools/bench_planner.py --before main      # solve times side by side with main's planner
    python tools/bench_planner.py --write-problem vit_huge_patch14_224 \\
        --cluster planner/examples/paper-testbed.toml -o vith.problem.json [--lossy]
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import typer
from edgepipe.planner.baselines import all_baselines
from edgepipe.planner.cluster import load_cluster, problem_for
from edgepipe.planner.console import console_for_output
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
    save_problem,
)
from edgepipe.planner.solver import solve
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "planner" / "examples" / "paper-testbed.toml"
PAPER_5MBPS = ROOT / "planner" / "examples" / "paper-testbed-5mbps.toml"
FAST_AND_SLOW = ROOT / "planner" / "examples" / "fast-and-slow.toml"
PLAN_CLI = str(Path(sys.executable).parent / "edgepipe-plan")

# name: (width d, blocks, heads, tokens n, patch)
VIT = {
    "vit_base_patch16_224": (768, 12, 12, 197, 16),
    "vit_large_patch16_224": (1024, 24, 16, 197, 16),
    "vit_huge_patch14_224": (1280, 32, 16, 257, 14),
}

# The 64-device fleet: 8 kinds of board, 8 of each (what-if speeds, effective GFLOPS).
FLEET = [
    ("rcc-ve", 16.0, 8), ("minnow", 10.0, 2), ("rcc-ve-50", 8.0, 8), ("rcc-ve-25", 4.0, 8),
    ("rpi4", 6.0, 4), ("rpi5", 20.0, 8), ("orin-nano-cpu", 30.0, 8), ("nuc", 60.0, 16),
]


def vit_model_spec(name: str) -> ModelSpec:
    """A ViT at quarter-block granularity; patch embedding joins the first segment, head the last."""
    d, depth, heads, n, patch = VIT[name]
    f = 4  # bytes per float32
    rows = []
    for k in range(depth):
        rows += [  # (cut label, weight bytes, peak activation bytes, out bytes, FLOPs) per sample
            [f"blocks.{k}", (3 * d * d + 5 * d) * f, (3 * n * d + 2 * heads * n * n) * f, 2 * n * d * f,
             6 * n * d * d + 4 * n * n * d],
            [f"blocks.{k}.attn.proj", (d * d + d) * f, 2 * n * d * f, n * d * f, 2 * n * d * d],
            [f"blocks.{k}.norm2", (4 * d * d + 6 * d) * f, 5 * n * d * f, 5 * n * d * f, 8 * n * d * d],
            [f"blocks.{k}.mlp.fc2", (4 * d * d + d) * f, 5 * n * d * f, n * d * f, 8 * n * d * d],
        ]
    rows[0][0] = "input"
    rows[0][1] += (3 * patch * patch * d + 2 * d + n * d) * f
    rows[0][4] += 2 * (n - 1) * 3 * patch * patch * d
    rows[-1][1] += (2 * d + d * 1000 + 1000) * f
    rows[-1][3] = 1000 * f
    rows[-1][4] += 2 * d * 1000
    digest = hashlib.sha256(f"analytic:{name}".encode()).hexdigest()
    segments = tuple(Segment(r[0], int(r[1]), int(r[2]), int(r[3]), float(r[4])) for r in rows)
    return ModelSpec(name, digest, 3 * 224 * 224 * f, segments)


# ASSUMED effects of each lossy choice on the model's outputs (logits), one choice at a time. The
# compiler measures the real ones per cut and segment (issue 13); these only make the predicted
# gains concrete. Sending one cut in fp16 costs about 1e-3 of the outputs' scale, int8 with
# per-row scales ten times that; int8 weights of one quarter-block 2e-3 (so a whole ViT-Large in
# int8 adds up to 0.19 by the conservative rule).
FP16_CUT = ErrorEffect(max_abs_diff=1e-3, cosine=0.9999995, top1_agreement=1.0)
INT8_CUT = ErrorEffect(max_abs_diff=1e-2, cosine=0.99998, top1_agreement=0.999)
INT8_WEIGHTS = ErrorEffect(max_abs_diff=2e-3, cosine=0.99999, top1_agreement=0.9998)
INT8_SPEEDUP = 1.3  # int8 MatMul/Gemm speed over fp32 on the boards (assumed)
# CPU seconds per message and per uncompressed byte (receive + decode, encode + send), of the
# order measured for agent/formats/codecs.py plus a socket copy on the benchmark machine (numpy
# fp16 conversion is the dearest); CURVE adds about 1 ns per wire byte. Boards are taken as 4x
# slower than the benchmark machine at this work.
COMM_SCALE = 4.0
COMM_PER_MESSAGE_S = 1e-4
COMM_PER_BYTE_S = {"raw": (0.5e-9, 0.5e-9), "fp16": (1.1e-9, 1.3e-9), "int8": (0.7e-9, 0.9e-9)}  # (recv, send)
CURVE_PER_WIRE_BYTE_S = 1e-9
WIRE_FRACTION = {"raw": 1.0, "fp16": 0.5, "int8": 0.26}


def lossy_model_spec(model: ModelSpec) -> ModelSpec:
    """``model`` with fp16 and int8 offered at every cut between stages and int8 weights for every
    segment, with the assumed effects above (int8 frames carry one float32 scale per token)."""
    segments = []
    last = len(model.segments) - 1
    for i, seg in enumerate(model.segments):
        codecs = () if i == last else (
            CutCodec("fp16", seg.out_bytes // 2, FP16_CUT), CutCodec("int8", seg.out_bytes // 4 + 4 * 257, INT8_CUT))
        segments.append(Segment(seg.name, seg.weight_bytes, seg.activation_bytes, seg.out_bytes, seg.flops,
                                codecs, Int8Weights(seg.weight_bytes // 4, INT8_WEIGHTS)))
    return ModelSpec(model.model_id, model.model_sha256, model.input_bytes, tuple(segments))


def comm_costs(secure: bool = True) -> tuple[CommCost, ...]:
    """The assumed comm costs of a board, with and without CURVE."""
    out = []
    for codec, (recv, send) in COMM_PER_BYTE_S.items():
        for curve in (False, True):
            extra = CURVE_PER_WIRE_BYTE_S * WIRE_FRACTION[codec] if curve else 0.0
            out.append(CommCost(codec, curve, COMM_SCALE * COMM_PER_MESSAGE_S, COMM_SCALE * (recv + extra),
                                COMM_SCALE * COMM_PER_MESSAGE_S, COMM_SCALE * (send + extra)))
    return tuple(out)


def lossy_problem(problem: Problem, budget: ErrorBudget | None) -> Problem:
    """``problem`` with the lossy choices offered, int8 speeds and comm costs on every type (shared
    with the comm threads on one core), planned within ``budget``."""
    types = tuple(replace(t, comm=comm_costs(), comm_share=1.0,
                          int8=Int8Speed(gflops=t.gflops * INT8_SPEEDUP) if t.gflops else None)
                  for t in problem.device_types)
    return replace(problem, model=lossy_model_spec(problem.model), device_types=types, max_error=budget)


def with_comm(problem: Problem) -> Problem:
    """``problem`` with the assumed comm costs and nothing lossy: what every row of a comparison
    is judged by, so the numbers compare directly."""
    return replace(problem, device_types=tuple(replace(t, comm=comm_costs(), comm_share=1.0)
                                               for t in problem.device_types))


def fleet_problem(model: ModelSpec) -> Problem:
    types = tuple(DeviceType(name, gflops=gflops) for name, gflops, _ in FLEET)
    devices = tuple(Device(f"{name}-{i + 1}", name, memory << 30, 1000.0)
                    for name, _, memory in FLEET for i in range(8))
    return Problem(model, types, devices, microbatch=8, client_bandwidth_mbps=1000.0)


def linked_problem(model: ModelSpec, count: int = 12) -> Problem:
    """Boards of 3 kinds where every pair has its own measured link: ``count`` distinct devices."""
    rng = random.Random(12)
    types = (DeviceType("fast", gflops=16.0), DeviceType("slow", gflops=10.0), DeviceType("throttled", gflops=4.0))
    devices = tuple(Device(f"b{i}", types[i % 3].name, 8 << 30, 1000.0) for i in range(count))
    links = tuple(Link(a.name, b.name, rng.choice([100.0, 300.0, 1000.0]), rng.choice([0.0005, 0.002]))
                  for a, b in itertools.combinations(devices, 2))
    return Problem(model, types, devices, links, microbatch=8, client_bandwidth_mbps=1000.0)


def _median_time(fn: Any, repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def planner_before(ref: str) -> Any:
    """The planner package as it was at git ``ref``, imported under another name so both run in
    one process (it is pure and imports only itself and numpy)."""
    tmp = Path(tempfile.mkdtemp(prefix="planner-before-"))
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", ref, "planner/"],
                             check=True, capture_output=True, text=True).stdout.split()
    package = tmp / "planner_before"
    package.mkdir()
    for name in listing:
        if name.endswith(".py"):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{name}"], check=True,
                                  capture_output=True, text=True).stdout
            (package / Path(name).name).write_text(text)
    sys.path.insert(0, str(tmp))
    problem = importlib.import_module("planner_before.problem")
    solver = importlib.import_module("planner_before.solver")
    return problem, solver


def as_version_1(problem: Problem) -> dict[str, Any]:
    """``problem`` as a version 1 file (for the planner before version 2); it must have nothing of
    version 2 in it."""
    raw = json.loads(problem.to_json())
    raw["format_version"] = 1
    raw.pop("max_error")
    raw.pop("secure")
    return raw


def _interleaved(fns: dict[str, Any], repeats: int) -> dict[str, tuple[float, Any]]:
    """Median wall time of each function, run in turn (a, b, c, a, b, c, ...) so that load from
    other work on the machine falls on all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            results[key] = fn()
            times[key].append(time.perf_counter() - start)
    return {k: (statistics.median(v), results[k]) for k, v in times.items()}


def bench_solve_time(repeats: int, progress: Progress, before: str | None) -> list[dict[str, Any]]:
    """Solve time at the issue's sizes: the planner before (if asked), this one planning pipelines
    only (the objective of the one before), and this one with its defaults (replicas, 1% slack);
    for the paper testbed also with every lossy choice offered within a budget."""
    vith = vit_model_spec("vit_huge_patch14_224")
    paper = problem_for(load_cluster(PAPER), vith, 8)
    cases = [
        ("paper testbed: 16 devices, 4 types", paper, 0.5),
        ("12 distinct devices, per-pair links", linked_problem(vith), None),
        ("fleet: 64 devices, 8 types", fleet_problem(vith), 10.0),
        ("64 distinct devices, per-pair links", linked_problem(vith, 64), None),
    ]
    old = planner_before(before) if before else None
    startup, _ = _median_time(lambda: subprocess.run([PLAN_CLI, "--help"], check=True, capture_output=True), repeats)
    rows: list[dict[str, Any]] = [{"case": "edgepipe-plan --help (interpreter + imports only)", "cli_s": startup}]
    task = progress.add_task("solve time", total=len(cases) + 1)
    with tempfile.TemporaryDirectory() as tmp:
        for label, problem, target in cases:
            fns: dict[str, Any] = {}
            if old is not None:
                old_problem = old[0].Problem.from_dict(as_version_1(problem))
                fns["before"] = lambda p=old_problem: old[1].solve(p)
            fns["pipeline only"] = lambda p=problem: solve(p, max_replicas=1, throughput_slack=0.0)
            fns["defaults"] = lambda p=problem: solve(p)
            timed = _interleaved(fns, repeats)
            path = save_problem(problem, Path(tmp) / "problem.json")
            command = [PLAN_CLI, str(path), "--json", "-o", str(Path(tmp) / "plan.json")]
            cli_s, _ = _median_time(lambda c=command: subprocess.run(c, check=True, capture_output=True), repeats)
            for variant, (seconds, plan) in timed.items():
                rows.append(_time_row(label, variant, problem, plan, seconds, target,
                                      cli_s if variant == "defaults" else None, timed.get("before")))
            progress.advance(task)
        lossy = lossy_problem(with_comm(paper), GAIN_BUDGET)
        timed = _interleaved({"pipeline only": lambda: solve(lossy, max_replicas=1, throughput_slack=0.0),
                              "defaults": lambda: solve(lossy)}, max(1, repeats // 2))
        for variant, (seconds, plan) in timed.items():
            rows.append(_time_row("paper testbed, lossy choices offered (budget max |Δ| 0.1)", variant, lossy, plan,
                                  seconds, None, None, None))
        progress.advance(task)
    return rows


def _time_row(label: str, variant: str, problem: Problem, plan: Any, seconds: float, target: float | None,
              cli_s: float | None, before: tuple[float, Any] | None) -> dict[str, Any]:
    gap = plan.bottleneck_s / plan.lower_bound_s - 1 if plan.lower_bound_s == plan.lower_bound_s else float("nan")
    return {"case": label, "variant": variant, "devices": len(problem.devices),
            "segments": len(problem.model.segments), "solver": plan.solver, "optimal": plan.optimal, "gap": gap,
            "stages": len(plan.stages), "devices_used": len(plan.devices), "throughput": plan.throughput,
            "solve_s": seconds, "cli_s": cli_s, "target_s": target,
            "vs_before": seconds / before[0] if before and variant != "before" else None,
            "cli_command": "edgepipe-plan problem.json --json -o plan.json"}


def kinds_problem(model: ModelSpec, kinds: int, each: int) -> Problem:
    """``kinds`` of board from FLEET, ``each`` of every kind."""
    types = tuple(DeviceType(name, gflops=gflops) for name, gflops, _ in FLEET[:kinds])
    devices = tuple(Device(f"{name}-{i + 1}", name, memory << 30, 1000.0)
                    for name, _, memory in FLEET[:kinds] for i in range(each))
    return Problem(model, types, devices, microbatch=8, client_bandwidth_mbps=1000.0)


def bench_heuristic(progress: Progress) -> list[dict[str, Any]]:
    """The heuristic against the exact optimum, where the exact solver can still run (pipeline only)."""
    vith = vit_model_spec("vit_huge_patch14_224")
    cases = [
        ("paper testbed (4 types x 4)", problem_for(load_cluster(PAPER), vith, 8)),
        ("12 distinct devices, per-pair links", linked_problem(vith)),
        ("6 types x 3", kinds_problem(vith, 6, 3)),
        ("8 types x 2", kinds_problem(vith, 8, 2)),
        ("4 types x 16", kinds_problem(vith, 4, 16)),
    ]
    rows = []
    task = progress.add_task("heuristic vs exact", total=len(cases))
    for label, problem in cases:
        # The same search space for both (one device per stage, no slack), as measured before
        # replication: the exact programme over 64 kinds of 4 x 16 devices takes tens of seconds.
        exact = solve(problem, method="exact", max_replicas=1, throughput_slack=0.0)
        heuristic = solve(problem, method="heuristic", max_replicas=1, throughput_slack=0.0)
        rows.append({"case": label, "exact_s": exact.bottleneck_s, "heuristic_s": heuristic.bottleneck_s,
                     "lower_bound_s": heuristic.lower_bound_s, "exact_time_s": exact.solve_time_s,
                     "heuristic_time_s": heuristic.solve_time_s})
        progress.advance(task)
    return rows


def bench_quality(progress: Progress) -> list[dict[str, Any]]:
    cluster = load_cluster(PAPER)
    rows = []
    task = progress.add_task("plan quality", total=len(VIT))
    for name in VIT:
        problem = problem_for(cluster, vit_model_spec(name), 8)
        plan = solve(problem)
        for base, other in all_baselines(problem, plan.microbatch).items():
            rows.append({"model": name, "baseline": base, "ours": plan.throughput, "theirs": other.throughput,
                         "ratio": plan.throughput / other.throughput, "fits": other.fits,
                         "our_latency_s": plan.latency_s, "their_latency_s": other.latency_s})
        progress.advance(task)
    return rows


def bench_bandwidth(progress: Progress) -> list[dict[str, Any]]:
    """The paper's other knob: every NIC throttled (tc tbf); ViT-Large on the paper testbed."""
    base = problem_for(load_cluster(PAPER), vit_model_spec("vit_large_patch16_224"), 8)
    rows = []
    rates = (1000.0, 100.0, 20.0, 5.0)
    task = progress.add_task("bandwidth sweep", total=len(rates))
    for rate in rates:
        problem = replace(base, devices=tuple(replace(d, bandwidth_mbps=rate) for d in base.devices),
                          client_bandwidth_mbps=rate)
        plan = solve(problem)
        others = all_baselines(problem, plan.microbatch)
        rows.append({"mbps": rate, "ours": plan.throughput, "devices_used": len(plan.stages),
                     **{f"{k}_ratio": plan.throughput / v.throughput for k, v in others.items()}})
        progress.advance(task)
    return rows


def coarse_model_spec(model: ModelSpec, per: int) -> ModelSpec:
    """``model`` with every ``per`` consecutive segments merged (2: the cuts where one tensor
    crosses, what edgepipe-compile's default --max-tensors 1 offers)."""
    segs, out = model.segments, []
    for i in range(0, len(segs), per):
        group = segs[i:i + per]
        out.append(Segment(group[0].name, sum(x.weight_bytes for x in group), max(x.activation_bytes for x in group),
                           group[-1].out_bytes, sum(x.flops for x in group)))
    return ModelSpec(model.model_id, model.model_sha256, model.input_bytes, tuple(out))


def small_boards(count: int, memory: str, bandwidth: str) -> Path:
    """A cluster file of ``count`` identical 16-GFLOPS boards (written to a temporary file)."""
    lines = ["[cluster]", 'name = "small-boards"', 'client_bandwidth = "1 Gbps"', "",
             "[[type]]", 'name = "board"', "gflops = 16.0", ""]
    for i in range(count):
        lines += ["[[device]]", f'name = "board-{i + 1}"', 'type = "board"', f'memory = "{memory}"',
                  f'bandwidth = "{bandwidth}"', ""]
    path = Path(tempfile.mkdtemp(prefix="bench-planner-")) / "small-boards.toml"
    path.write_text("\n".join(lines))
    return path


GAIN_BUDGET = ErrorBudget(max_abs_diff=0.1)


def bench_gains(progress: Progress) -> list[dict[str, Any]]:
    """Predicted throughput of the new choices against fp32 pipeline-only plans (what the planner
    did before), even split and PipeDream, all judged by the same cost model with comm costs."""
    vitl, vitb = vit_model_spec("vit_large_patch16_224"), vit_model_spec("vit_base_patch16_224")
    vith = vit_model_spec("vit_huge_patch14_224")
    scenarios = [
        ("paper testbed, 1 Gbps", "vit_large_patch16_224", PAPER, vitl),
        ("paper testbed, 20 Mbps", "vit_large_patch16_224", None, vitl),
        ("paper testbed, 5 Mbps", "vit_large_patch16_224", PAPER_5MBPS, vitl),
        ("1 fast + 3 slow (fast-and-slow.toml), 1 Gbps, cuts where one tensor crosses", "vit_base_patch16_224",
         FAST_AND_SLOW, coarse_model_spec(vitb, 2)),
        ("3 boards of 512 MiB, 1 Gbps", "vit_large_patch16_224", small_boards(3, "512 MiB", "1 Gbps"), vitl),
        ("8 boards of 512 MiB, 20 Mbps", "vit_huge_patch14_224", small_boards(8, "512 MiB", "20 Mbps"), vith),
    ]
    variants = {
        "fp32 pipeline only": dict(lossy=False, max_replicas=1),
        "+ replication": dict(lossy=False, max_replicas=None),
        "+ compression, int8 weights": dict(lossy=True, max_replicas=1),
        "+ both": dict(lossy=True, max_replicas=None),
    }
    rows = []
    task = progress.add_task("predicted gains", total=len(scenarios))
    for label, model_name, cluster_path, model in scenarios:
        if cluster_path is None:  # the paper testbed with every link at 20 Mbps
            base = problem_for(load_cluster(PAPER), model, 8)
            base = replace(base, devices=tuple(replace(d, bandwidth_mbps=20.0) for d in base.devices))
        else:
            base = problem_for(load_cluster(cluster_path), model, 8)
        base = with_comm(base)
        row: dict[str, Any] = {"scenario": label, "model": model_name, "segments": len(model.segments)}
        for name, how in variants.items():
            problem = lossy_problem(base, GAIN_BUDGET) if how["lossy"] else base
            try:
                plan = solve(problem, max_replicas=how["max_replicas"])
            except ValueError as exc:  # InfeasibleError: e.g. the model does not fit in fp32
                row[name] = {"throughput": 0.0, "why": str(exc)}
                continue
            row[name] = {"throughput": plan.throughput, "devices": len(plan.devices), "stages": len(plan.stages),
                         "codecs": sorted({s.codec_out for s in plan.stages[:-1]}),
                         "int8_stages": sum(s.int8_weights for s in plan.stages),
                         "error_max_abs": plan.predicted_error.max_abs_diff if plan.predicted_error else 0.0,
                         "solve_s": plan.solve_time_s}
        for name, other in all_baselines(base, 8).items():
            row[name] = {"throughput": other.throughput if other.fits else 0.0, "fits": other.fits}
        rows.append(row)
        progress.advance(task)
    return rows


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "load_average": os.getloadavg()}


def main(
    json_out: Path = typer.Option(None, "--json", help="Also write the results here."),
    repeats: int = typer.Option(5, help="Runs per solve-time measurement (median reported)."),
    before: str = typer.Option(None, help="Also time the planner at this git ref (e.g. main), side by side."),
    write_problem: str = typer.Option(None, help=f"Only write a problem file for one of: {', '.join(VIT)}."),
    lossy: bool = typer.Option(False, help="--write-problem: offer codecs and int8 weights (assumed effects), "
                                           "with assumed comm costs."),
    cluster: Path = typer.Option(PAPER, help="Cluster for --write-problem."),
    output: Path = typer.Option(Path("problem.json"), "-o", help="File for --write-problem."),
) -> None:
    """Measure the planner: solve time (16 devices / 4 types and 64 devices / 8 types on ViT-Huge)
    and predicted throughput against the baselines on the paper-like testbed."""
    console = console_for_output()
    if write_problem:
        if write_problem not in VIT:
            console.print(f"[red]error:[/red] unknown model {write_problem!r}; choose from {', '.join(VIT)}")
            raise typer.Exit(2)
        problem = problem_for(load_cluster(cluster), vit_model_spec(write_problem), 8)
        save_problem(lossy_problem(with_comm(problem), None) if lossy else problem, output)
        console.print(f"wrote {output}")
        return
    info = machine()
    command = " ".join(["python", "tools/bench_planner.py", *sys.argv[1:]])
    with Progress(console=console, transient=True) as progress:
        timing = bench_solve_time(repeats, progress, before)
        quality = bench_quality(progress)
        bandwidth = bench_bandwidth(progress)
        gains = bench_gains(progress)
        heuristic = bench_heuristic(progress)
    console.print(f"[bold]{command}[/bold]\n{info['cpu']}, {info['cores']} cores, Python {info['python']}, "
                  f"numpy {info['numpy']}, load average {info['load_average'][0]:.2f}")

    table = Table(title=f"Solve time, ViT-Huge (128 segments), median of {repeats}, variants interleaved")
    for col in ("case", "planner", "solver", "stages / devices", "samples/s", "gap to bound", "solve()",
                "÷ before", "CLI end to end", "target"):
        table.add_column(col)
    for r in timing:
        if "solver" not in r:
            table.add_row(r["case"], "", "", "", "", "", "", "", f"{r['cli_s']:.3f} s", "")
            continue
        table.add_row(r["case"], r["variant"], r["solver"] + (" (optimal)" if r["optimal"] else ""),
                      f"{r['stages']} / {r['devices_used']}", f"{r['throughput']:.3f}", f"{max(r['gap'], 0.0):.2%}",
                      f"{r['solve_s']:.3f} s", "" if r["vs_before"] is None else f"{r['vs_before']:.2f}×",
                      "" if r["cli_s"] is None else f"{r['cli_s']:.3f} s",
                      "-" if r["target_s"] is None else f"< {r['target_s']} s")
    console.print(table)

    table = Table(title="Predicted samples/s with compression and int8 weights (budget max|Δ| 0.1), replication; "
                        "all judged by the same cost model, comm costs included")
    names = ["fp32 pipeline only", "+ replication", "+ compression, int8 weights", "+ both", "even-split", "pipedream"]
    for col in ("scenario", "model", *names, "best ÷ fp32 pipeline", "best ÷ pipedream"):
        table.add_column(col)
    for r in gains:
        best = max(r[n]["throughput"] for n in names[:4])
        cells = [f"{r[n]['throughput']:.3f}" if r[n]["throughput"] else "does not fit" for n in names]
        base = r["fp32 pipeline only"]["throughput"]
        table.add_row(r["scenario"], r["model"], *cells, f"{best / base:.2f}×" if base else "-",
                      f"{best / r['pipedream']['throughput']:.2f}×" if r["pipedream"]["throughput"] else "-")
    console.print(table)

    table = Table(title="Predicted throughput on the paper-like testbed (16 devices, 4 types, 1 Gbps), microbatch 8")
    for col in ("model", "baseline", "ours (samples/s)", "baseline (samples/s)", "ours ÷ baseline", "fits"):
        table.add_column(col)
    for r in quality:
        table.add_row(r["model"], r["baseline"], f"{r['ours']:.3f}", f"{r['theirs']:.3f}", f"{r['ratio']:.2f}×",
                      "yes" if r["fits"] else "no")
    console.print(table)

    table = Table(title="ViT-Large on the paper-like testbed with every link throttled")
    for col in ("NIC", "ours (samples/s)", "devices used", "÷ even-split", "÷ pipedream", "÷ memory-prop."):
        table.add_column(col)
    for r in bandwidth:
        table.add_row(f"{r['mbps']:g} Mbps", f"{r['ours']:.3f}", str(r["devices_used"]),
                      f"{r['even-split_ratio']:.2f}×", f"{r['pipedream_ratio']:.2f}×",
                      f"{r['memory-proportional_ratio']:.2f}×")
    console.print(table)

    table = Table(title="The heuristic where the exact solver can check it (ViT-Huge; bottleneck per microbatch; "
                        "one device per stage)")
    for col in ("case", "exact", "heuristic", "heuristic ÷ exact", "lower bound", "exact time", "heuristic time"):
        table.add_column(col)
    for r in heuristic:
        table.add_row(r["case"], f"{r['exact_s']:.3f} s", f"{r['heuristic_s']:.3f} s",
                      f"{r['heuristic_s'] / r['exact_s']:.4f}", f"{r['lower_bound_s']:.3f} s",
                      f"{r['exact_time_s']:.2f} s", f"{r['heuristic_time_s']:.2f} s")
    console.print(table)

    if json_out is not None:
        doc = {"command": command, "machine": info, "repeats": repeats, "solve_time": timing, "quality": quality,
               "bandwidth": bandwidth, "gains": gains, "heuristic": heuristic,
               "assumptions": {"fp16_cut": FP16_CUT.__dict__, "int8_cut": INT8_CUT.__dict__,
                               "int8_weights": INT8_WEIGHTS.__dict__, "int8_speedup": INT8_SPEEDUP,
                               "comm_per_message_s": COMM_SCALE * COMM_PER_MESSAGE_S,
                               "comm_per_byte_s": {k: [COMM_SCALE * x for x in v] for k, v in COMM_PER_BYTE_S.items()},
                               "budget": GAIN_BUDGET.__dict__}}
        json_out.write_text(json.dumps(doc, indent=2) + "\n")
        console.print(f"wrote {json_out}")


if __name__ == "__main__":
    typer.run(main)
