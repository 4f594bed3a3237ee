"""Pipeline benchmarks on the emulated edge cluster (issue 6): scaling, heterogeneity, bandwidth.

Every configuration is planned from profiles **the devices measured themselves**: the testbed comes
up (each device a network namespace with a tbf-shaped link, a cgroup CPU quota and memory limit),
`edgepipe-agent control` runs in every device, and the root namespace profiles them through the
network (compiler.remote_profile.profile_cluster: the same path as `edgepipe-compile --profile`;
all devices at once by default, since at run time they all compute at once on the shared cores).
The planner then plans from the measured times, the plan is compiled into verified bundles, served
by real agents inside the same devices and measured from a client in the root namespace; every
output is checked against the whole model. Each row reports the planner's prediction and, beside
it, the prediction with the runtime's own costs that the profiles measured (``+comm``: compute +
share x (receive + send CPU) per stage, the cost model proposed to the planner in
docs/profiling.md), and the per-stage compute predicted vs measured.

    .venv/bin/python tools/bench_cluster.py scaling                 # ViT-B on 1, 2, 4, 8 equal devices
    .venv/bin/python tools/bench_cluster.py hetero                  # ours vs even / PipeDream / memory
    .venv/bin/python tools/bench_cluster.py bandwidth               # 1 Gbps .. 5 Mbps
    .venv/bin/python tools/bench_cluster.py all --json build/bench-cluster.json --traces build/traces

Needs root (the testbed). The machine's 2 cores are shared out among the devices, so use a quiet machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
console = Console(width=150)
TOLERANCE = 1e-4
PROFILE_MODES = ("parallel", "sequential")


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which."""


@dataclass(frozen=True)
class Setup:
    model: str
    microbatch: int
    count: int
    out: Path
    profile_mode: str  # "parallel": all devices profile at once (as they compute at run time)
    rounds: int  # profiling rounds (timed runs per piece)
    profile_bundle: Path
    traces: Path | None  # write each run's trace here


def device_toml(name: str, type_: str, cpu: float, memory: str, bandwidth: str) -> str:
    return (f'[[device]]\nname = "{name}"\ntype = "{type_}"\nmemory = "{memory}"\nbandwidth = "{bandwidth}"\n'
            f"cpu = {cpu}\n")


def type_toml(name: str, gflops: float = 1.0) -> str:
    """A device type. Here its gflops is a placeholder that the measured profiles replace;
    tools/bench_memory.py gives it a calibrated speed."""
    return f'[[type]]\nname = "{name}"\ngflops = {gflops:.4f}\n'


def calibrate(model: str, microbatch: int) -> float:
    """GFLOPS one core sustains on this model: the whole model timed with one ORT thread
    (tools/bench_memory.py's prediction; this benchmark predicts from the devices' profiles)."""
    from edgepipe.agent.device.profiler import random_feeds, time_runs
    from edgepipe.agent.formats.bundle import TensorSpec
    from edgepipe.compiler.build import candidate_cuts, load_model, spec_for
    from edgepipe.compiler.verify import cpu_session

    loaded = load_model(model)
    flops = sum(s.flops for s in spec_for(loaded, candidate_cuts(loaded)).segments)
    session = cpu_session(loaded.path, threads=1)
    specs = [TensorSpec(i.name, "float32", tuple(d if isinstance(d, int) else "batch" for d in i.shape))
             for i in session.get_inputs()]
    seconds = time_runs(session, random_feeds(specs, microbatch), repeats=3, warmup=1)
    return flops * microbatch / seconds / 1e9


def comm_adjusted(problem: Any, plan: Any, profiles: dict[str, Any]) -> tuple[float, list[float]]:
    """(throughput, per-stage seconds) with each stage's compute plus share x (receive + send CPU)
    of its device's profile (raw codec, plaintext: what the runtime sends today), and the planner's
    link times. The planner will carry this model itself (Planner v2); until then it is computed here."""
    from edgepipe.planner.cost import client_bandwidth, cut_bytes, transfer_seconds

    cuts = cut_bytes(problem) * plan.microbatch
    times = []
    for stage in plan.stages:
        comm = profiles[stage.device].comm
        extra = 0.0
        if comm is not None and (cost := comm.cost("raw", False)) is not None:
            moved = cost.recv_s(float(cuts[stage.first_segment])) + cost.send_s(float(cuts[stage.end_segment]))
            extra = comm.share * moved
        times.append(max(stage.compute_s + extra, stage.send_s))
    rate = client_bandwidth(problem, plan.stages[0].device)
    client_in = 0.0 if rate is None else transfer_seconds(float(cuts[0]), rate)
    return plan.microbatch / max(*times, client_in), times


def profile_devices(setup: Setup, bed: Any, cluster_path: Path, work: Path) -> tuple[Any, dict[str, Any]]:
    """Profile every device of the testbed through the network; the planner's cluster with the
    measured times, and the profiles by device."""
    from edgepipe.agent.local import stop_processes
    from edgepipe.compiler.planning import apply_profiles
    from edgepipe.compiler.remote_profile import profile_cluster
    from edgepipe.planner.cluster import load_cluster
    from testbed_pipeline import CONTROL_PORT, start_controls

    cluster = load_cluster(cluster_path)
    cluster = dataclasses.replace(cluster, devices=tuple(
        dataclasses.replace(d, address=bed.endpoint(d.name, CONTROL_PORT)) for d in cluster.devices))
    shutil.rmtree(work / "profiles", ignore_errors=True)  # measure anew: never reuse an earlier run's
    controls = start_controls(bed, [d.name for d in cluster.devices], work)
    try:
        started = time.perf_counter()
        profiles, failures = profile_cluster(cluster, setup.profile_bundle, work / "profiles", (setup.microbatch,),
                                             threads=1, parallel=setup.profile_mode == "parallel",
                                             repeats=setup.rounds, keypair=None)  # insecure daemons
        took = time.perf_counter() - started
    finally:
        stop_processes(controls, timeout_s=30)
    if failures:
        raise BenchError(f"profiling failed: {failures}")
    console.print(f"  profiled {len(profiles)} device(s) in {took:.0f} s ({setup.profile_mode})")
    return apply_profiles(cluster, profiles), {p.device: p for p in profiles}


def plan_and_run(setup: Setup, bed: Any, label: str, cluster: Any, profiles: dict[str, Any],
                 solver: str = "ours") -> dict[str, Any]:
    """Plan (ours or a baseline) from the measured profiles, compile, run on the testbed, compare."""
    from edgepipe.agent.client.trace import run_from_results, write_trace
    from edgepipe.compiler.build import candidate_cuts, compile_model, load_model, spec_for
    from edgepipe.planner.baselines import all_baselines
    from edgepipe.planner.cluster import problem_for
    from edgepipe.planner.simulate import steady_state
    from edgepipe.planner.solver import solve
    from testbed_pipeline import run_on_bed

    work = setup.out / label
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(setup.model)
    spec = spec_for(loaded, candidate_cuts(loaded))
    problem = problem_for(cluster, spec, setup.microbatch)
    # One device per stage: run_on_bed starts one agent per stage (no replicas yet).
    plan = solve(problem, max_replicas=1) if solver == "ours" else all_baselines(problem, setup.microbatch)[solver]
    predicted = steady_state(problem, plan)
    if not predicted.fits:
        return {"label": label, "solver": solver, "fits": False, "stages": len(plan.stages)}
    with_comm, with_comm_stage_s = comm_adjusted(problem, plan, profiles)
    result = compile_model(setup.model, work / "bundles", plan=plan)
    batches, expected = reference(setup, result.model_path)
    run = run_on_bed(bed, result.bundle_dirs, [s.device for s in plan.stages], batches, workdir=work)
    if setup.traces is not None:
        setup.traces.mkdir(parents=True, exist_ok=True)
        plan_dict = plan.to_dict()
        write_trace(setup.traces / f"{label}.json",
                    run_from_results(run.results, setup.microbatch, run.handed_at, plan_dict))
    worst = max(float(np.abs(o - e).max()) for o, e in zip(run.outputs, expected))
    measured_compute = run.stage_compute_mean_s
    return {
        "label": label, "solver": solver, "fits": True, "stages": len(plan.stages),
        "devices": run.stage_devices, "cuts": [s.cut_in for s in plan.stages[1:]],
        "predicted_throughput": predicted.throughput, "measured_throughput": run.throughput,
        "error_pct": error_pct(predicted.throughput, run.throughput),
        "predicted_with_comm": with_comm, "error_with_comm_pct": error_pct(with_comm, run.throughput),
        "predicted_stage_s": list(predicted.stage_s), "predicted_stage_with_comm_s": with_comm_stage_s,
        "predicted_compute_s": [s.compute_s for s in plan.stages],
        "measured_compute_s": measured_compute, "measured_compute_median_s": run.stage_compute_s,
        "compute_error_pct": [error_pct(s.compute_s, m) for s, m in zip(plan.stages, measured_compute)],
        "profile_max_spread": {d: profiles[d].max_spread(setup.microbatch) for d in run.stage_devices},
        "comm_share": {d: profiles[d].comm.share if profiles[d].comm else None for d in run.stage_devices},
        "peak_rss_bytes": run.peak_rss_bytes, "oom_kills": run.oom_kills,
        "max_abs_diff": worst, "correct": worst <= TOLERANCE,
    }


def error_pct(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured if measured > 0 else math.nan


_REFERENCE: dict[tuple, tuple[list[np.ndarray], list[np.ndarray]]] = {}


def reference(setup: Setup, model_path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The batches every configuration runs (one warm-up + count) and the whole model's outputs for
    them, computed once per model in one ONNX Runtime session."""
    from edgepipe.compiler.verify import cpu_session

    key = (str(model_path), setup.microbatch, setup.count)
    if key not in _REFERENCE:
        whole = cpu_session(model_path, threads=os.cpu_count() or 2)
        node = whole.get_inputs()[0]
        rng = np.random.default_rng(0)
        shape = tuple(d for d in node.shape[1:])
        batches = [rng.standard_normal((setup.microbatch, *shape)).astype(np.float32)
                   for _ in range(setup.count + 1)]
        _REFERENCE[key] = (batches, [whole.run(None, {node.name: b})[0] for b in batches[1:]])
    return _REFERENCE[key]


def on_testbed(setup: Setup, label: str, cluster_text: str) -> tuple[Any, Path]:
    """Write the cluster file for ``label``; return a Testbed for it (not yet up) and the file."""
    from testbed import Testbed

    work = setup.out / label
    work.mkdir(parents=True, exist_ok=True)
    path = work / "cluster.toml"
    path.write_text(cluster_text)
    return Testbed(path, name=f"bc-{uuid.uuid4().hex[:6]}"), path


def scaling(setup: Setup, counts: list[int]) -> list[dict[str, Any]]:
    """N equal devices sharing the machine's cores; ideal = N x one device of the same share."""
    cores = os.cpu_count() or 2
    rows = []
    for n in counts:
        cpu = round(min(1.0, cores / n), 3)
        devices = "".join(device_toml(f"d{i}", "board", cpu, "2 GiB", "1 Gbps") for i in range(n))
        label = f"scaling-{n}"
        bed, path = on_testbed(setup, label, f'[cluster]\nname = "scale-{n}"\n' + type_toml("board") + devices)
        console.print(f"[{label}] {n} device(s) x {cpu} core")
        with bed:
            cluster, profiles = profile_devices(setup, bed, path, setup.out / label)
            one_cluster = dataclasses.replace(cluster, devices=cluster.devices[:1])
            one = plan_and_run(setup, bed, f"scaling-1of{n}", one_cluster, profiles)
            many = plan_and_run(setup, bed, label, cluster, profiles)
        ideal = n * one["measured_throughput"]
        rows.append({"devices": n, "cpu_each": cpu, "one_device": one, "pipeline": many, "ideal": ideal,
                     "efficiency": many["measured_throughput"] / ideal})
    return rows


HETERO = [  # name, type, cpu share, memory: fast, medium, slow, very slow (the paper's mix, scaled)
    ("fast", "fast", 0.8, "1 GiB"),
    ("medium", "medium", 0.5, "2 GiB"),
    ("slow", "slow", 0.4, "512 MiB"),
    ("very-slow", "very-slow", 0.2, "2 GiB"),
]


def hetero(setup: Setup) -> list[dict[str, Any]]:
    types = "".join(type_toml(t) for _, t, _, _ in HETERO)
    devices = "".join(device_toml(n, t, cpu, mem, "1 Gbps") for n, t, cpu, mem in HETERO)
    bed, path = on_testbed(setup, "hetero", '[cluster]\nname = "hetero"\n' + types + devices)
    console.print("[hetero] fast, medium, slow, very slow")
    with bed:
        cluster, profiles = profile_devices(setup, bed, path, setup.out / "hetero")
        return [plan_and_run(setup, bed, f"hetero-{solver}", cluster, profiles, solver)
                for solver in ("ours", "even-split", "pipedream", "memory-proportional")]


def bandwidth(setup: Setup, rates: list[str]) -> list[dict[str, Any]]:
    """The same 4 devices at each rate. They are profiled once, on 1 Gbps links: compute does not
    depend on the link, and a control request carrying the profiling bundle (~35 MB for ViT-B) over
    a 5 Mbps link would take a minute (links are the planner's configured rates, as before)."""
    cpu = 0.5

    def cluster_text(rate: str) -> str:
        devices = "".join(device_toml(f"d{i}", "board", cpu, "2 GiB", rate) for i in range(4))
        return f'[cluster]\nname = "bw"\nclient_bandwidth = "{rate}"\n' + type_toml("board") + devices

    bed, path = on_testbed(setup, "bw-profile", cluster_text("1 Gbps"))
    console.print("[bandwidth] profiling 4 devices x 0.5 core on 1 Gbps links")
    with bed:
        _, profiles = profile_devices(setup, bed, path, setup.out / "bw-profile")
    rows = []
    for rate in rates:
        label = f"bw-{rate.replace(' ', '')}"
        bed, path = on_testbed(setup, label, cluster_text(rate))
        console.print(f"[{label}] 4 devices x 0.5 core at {rate}")
        with bed:
            cluster = measured_cluster(path, list(profiles.values()))
            rows.append({"bandwidth": rate, **plan_and_run(setup, bed, label, cluster, profiles)})
    return rows


def measured_cluster(cluster_path: Path, profiles: list[Any]) -> Any:
    """The planner's cluster of ``cluster_path`` with compute times from ``profiles``."""
    from edgepipe.compiler.planning import apply_profiles
    from edgepipe.planner.cluster import load_cluster

    return apply_profiles(load_cluster(cluster_path), profiles)


def _setup(model: str, microbatch: int, count: int, out: Path, profile_mode: str, rounds: int,
           traces: Path | None) -> Setup:
    import emulate
    from edgepipe.compiler.build import candidate_cuts, load_model
    from edgepipe.compiler.profiling import write_profile_bundle

    problem = emulate.host_problem()
    if problem:
        console.print(f"error: {problem}")
        raise typer.Exit(2)
    if profile_mode not in PROFILE_MODES:
        console.print(f"error: --profile-mode {profile_mode!r}: choose {' or '.join(PROFILE_MODES)}")
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model)
    bundle = out / "profile-bundle"
    write_profile_bundle(loaded.model, candidate_cuts(loaded), bundle, loaded.identity)
    return Setup(model, microbatch, count, out, profile_mode, rounds, bundle, traces)


def _finish(as_json: Path | None, setup: Setup, results: dict[str, Any], load_before: float) -> None:
    rows = _all_rows(results)
    errors = [abs(r["error_pct"]) for r in rows]
    errors_comm = [abs(r["error_with_comm_pct"]) for r in rows]
    compute = [abs(e) for r in rows for e in r["compute_error_pct"]]
    median = statistics.median
    results.update({"command": " ".join(sys.argv), "model": setup.model, "microbatch": setup.microbatch,
                    "count": setup.count, "profile_mode": setup.profile_mode, "profile_rounds": setup.rounds,
                    "machine": {"cpus": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release()},
                    "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
                    "summary": {"rows": len(rows),
                                "median_abs_error_pct": median(errors) if errors else None,
                                "max_abs_error_pct": max(errors, default=None),
                                "median_abs_error_with_comm_pct": median(errors_comm) if errors_comm else None,
                                "max_abs_error_with_comm_pct": max(errors_comm, default=None),
                                "max_abs_compute_error_pct": max(compute, default=None)},
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    if as_json:
        as_json.parent.mkdir(parents=True, exist_ok=True)
        as_json.write_text(json.dumps(results, indent=2, default=str))
    _print(results)


def _all_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows the prediction is judged on: each scaling pipeline, each hetero partitioner, each
    bandwidth. (The scaling table's "one device" runs are the ideal's baseline, measured on a
    testbed whose other devices are idle while they were profiling beside it: reported, not judged.)"""
    rows = [r["pipeline"] for r in results.get("scaling", [])]
    rows += [r for key in ("hetero", "bandwidth") for r in results.get(key, []) if r.get("fits")]
    return rows


def _print(results: dict[str, Any]) -> None:
    if "scaling" in results:
        t = Table(title=f"Scaling: {results['model']} on N equal devices sharing {os.cpu_count()} cores")
        for c in ("N", "core each", "one device", "(pred. error)", "ideal (N x one)", "pipeline", "efficiency",
                  "predicted", "pred. error", "+comm error", "worst stage compute error", "correct"):
            t.add_column(c, justify="right")
        for r in results["scaling"]:
            p, o = r["pipeline"], r["one_device"]
            t.add_row(str(r["devices"]), f"{r['cpu_each']:.2f}", f"{o['measured_throughput']:.2f}",
                      f"{o['error_pct']:+.1f}%", f"{r['ideal']:.2f}", f"{p['measured_throughput']:.2f}",
                      f"{100 * r['efficiency']:.0f}%", f"{p['predicted_throughput']:.2f}", f"{p['error_pct']:+.1f}%",
                      f"{p['error_with_comm_pct']:+.1f}%", _worst(p["compute_error_pct"]), str(p["correct"]))
        console.print(t)
    for key, title in (("hetero", "Heterogeneous devices: our plan vs baselines, all measured"),
                       ("bandwidth", "Bandwidth sweep: 4 devices x 0.5 core")):
        if key not in results:
            continue
        t = Table(title=title)
        for c in ("config", "stages", "devices", "predicted", "measured", "error", "+comm error",
                  "worst stage compute error", "ours ÷ this", "correct"):
            t.add_column(c, justify="right")
        ours = results[key][0].get("measured_throughput") if key == "hetero" else None
        for r in results[key]:
            name = r.get("bandwidth") or r["solver"]
            if not r["fits"]:
                t.add_row(name, str(r["stages"]), "-", "does not fit", "-", "-", "-", "-", "-", "-")
                continue
            ratio = f"{ours / r['measured_throughput']:.2f}x" if ours else "-"
            t.add_row(name, str(r["stages"]), ",".join(r["devices"]), f"{r['predicted_throughput']:.2f}",
                      f"{r['measured_throughput']:.2f}", f"{r['error_pct']:+.1f}%", f"{r['error_with_comm_pct']:+.1f}%",
                      _worst(r["compute_error_pct"]), ratio, str(r["correct"]))
        console.print(t)
    summary = results.get("summary")
    if summary and summary["rows"]:
        s = summary
        console.print(f"{s['rows']} rows: median |throughput error| {s['median_abs_error_pct']:.1f}% "
                      f"(max {s['max_abs_error_pct']:.1f}%); with comm costs "
                      f"{s['median_abs_error_with_comm_pct']:.1f}% (max {s['max_abs_error_with_comm_pct']:.1f}%); "
                      f"worst stage compute error {s['max_abs_compute_error_pct']:.1f}%")


def _worst(errors: list[float]) -> str:
    return f"{max(errors, key=abs):+.1f}%" if errors else "-"


ModelOpt = Annotated[str, typer.Option(help="Registry model.")]
MbOpt = Annotated[int, typer.Option(help="Microbatch size.")]
CountOpt = Annotated[int, typer.Option(help="Microbatches measured per configuration (after 1 warm-up).")]
OutOpt = Annotated[Path, typer.Option(help="Work directory.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results here.")]
ModeOpt = Annotated[str, typer.Option(help="Profile the devices all at once (parallel: as they compute at run "
                                      "time on the shared cores) or one after another (sequential).")]
RoundsOpt = Annotated[int, typer.Option(help="Profiling rounds (timed runs per piece).")]
TracesOpt = Annotated[Path | None, typer.Option(help="Write each run's Chrome/Perfetto trace into this directory.")]


@app.command("scaling")
def scaling_cmd(model: ModelOpt = "vit_base_patch16_224", microbatch: MbOpt = 4, count: CountOpt = 6,
                devices: str = "1,2,4,8", out: OutOpt = Path("build/bench-cluster"), as_json: JsonOpt = None,
                profile_mode: ModeOpt = "parallel", rounds: RoundsOpt = 5, traces: TracesOpt = None) -> None:
    """Throughput on 1, 2, 4, 8 equal devices, against N x one device."""
    load = os.getloadavg()[0]
    setup = _setup(model, microbatch, count, out, profile_mode, rounds, traces)
    _finish(as_json, setup, {"scaling": scaling(setup, [int(n) for n in devices.split(",")])}, load)


@app.command("hetero")
def hetero_cmd(model: ModelOpt = "vit_base_patch16_224", microbatch: MbOpt = 4, count: CountOpt = 6,
               out: OutOpt = Path("build/bench-cluster"), as_json: JsonOpt = None,
               profile_mode: ModeOpt = "parallel", rounds: RoundsOpt = 5, traces: TracesOpt = None) -> None:
    """Fast, medium, slow and very slow devices: our plan and three baselines, measured."""
    load = os.getloadavg()[0]
    setup = _setup(model, microbatch, count, out, profile_mode, rounds, traces)
    _finish(as_json, setup, {"hetero": hetero(setup)}, load)


@app.command("bandwidth")
def bandwidth_cmd(model: ModelOpt = "vit_base_patch16_224", microbatch: MbOpt = 4, count: CountOpt = 6,
                  rates: str = "1 Gbps,100 Mbps,20 Mbps,5 Mbps", out: OutOpt = Path("build/bench-cluster"),
                  as_json: JsonOpt = None, profile_mode: ModeOpt = "parallel", rounds: RoundsOpt = 5,
                  traces: TracesOpt = None) -> None:
    """The same 4 devices on ever slower links: the plan adapts, measured follows predicted."""
    load = os.getloadavg()[0]
    setup = _setup(model, microbatch, count, out, profile_mode, rounds, traces)
    _finish(as_json, setup, {"bandwidth": bandwidth(setup, rates.split(","))}, load)


@app.command("all")
def all_cmd(model: ModelOpt = "vit_base_patch16_224", microbatch: MbOpt = 4, count: CountOpt = 6,
            out: OutOpt = Path("build/bench-cluster"), as_json: JsonOpt = None,
            profile_mode: ModeOpt = "parallel", rounds: RoundsOpt = 5, traces: TracesOpt = None) -> None:
    """Scaling, heterogeneity and bandwidth in one run (the JSON is rewritten after each part, so a
    failing part keeps the others' results; its error is recorded under "errors")."""
    load = os.getloadavg()[0]
    setup = _setup(model, microbatch, count, out, profile_mode, rounds, traces)
    results: dict[str, Any] = {}
    parts = (("scaling", lambda: scaling(setup, [1, 2, 4, 8])), ("hetero", lambda: hetero(setup)),
             ("bandwidth", lambda: bandwidth(setup, ["1 Gbps", "100 Mbps", "20 Mbps", "5 Mbps"])))
    for name, part in parts:
        try:
            results[name] = part()
        except Exception as exc:  # keep the other parts: record and go on
            console.print(f"error in {name}: {type(exc).__name__}: {exc}")
            results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        if as_json:
            as_json.parent.mkdir(parents=True, exist_ok=True)
            as_json.write_text(json.dumps(results, indent=2, default=str))
    _finish(as_json, setup, results, load)


if __name__ == "__main__":
    app()
