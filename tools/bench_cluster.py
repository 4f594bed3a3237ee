"""Pipeline benchmarks on the emulated edge cluster (issue 6): scaling, heterogeneity, bandwidth.

Every configuration is planned with the planner from a cluster description, compiled into verified
bundles, served by real agents inside the testbed's devices (network namespace, tbf link, cgroup CPU
quota and memory limit) and measured from a client in the root namespace; every output is checked
against the whole model. Predictions come from the planner's cost model with device speeds
calibrated once at the start (the whole model timed on one core, scaled by each device's CPU share).

    .venv/bin/python tools/bench_cluster.py scaling                 # ViT-B on 1, 2, 4, 8 equal devices
    .venv/bin/python tools/bench_cluster.py hetero                  # ours vs even / PipeDream / memory
    .venv/bin/python tools/bench_cluster.py bandwidth               # 1 Gbps .. 5 Mbps
    .venv/bin/python tools/bench_cluster.py all --json build/bench-cluster.json

Needs root (the testbed). The machine's 2 cores are shared out among the devices, so use a quiet machine.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import tomllib
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
console = Console(width=150)
TOLERANCE = 1e-4
RESULTS: dict[str, Any] = {}


@dataclass(frozen=True)
class Setup:
    model: str
    microbatch: int
    count: int
    out: Path
    core_gflops: float  # calibrated: effective GFLOPS of one full core on this model


def device_toml(name: str, type_: str, cpu: float, memory: str, bandwidth: str) -> str:
    return (f'[[device]]\nname = "{name}"\ntype = "{type_}"\nmemory = "{memory}"\nbandwidth = "{bandwidth}"\n'
            f"cpu = {cpu}\n")


def type_toml(name: str, gflops: float) -> str:
    return f'[[type]]\nname = "{name}"\ngflops = {gflops:.4f}\n'


def calibrate(model: str, microbatch: int) -> float:
    """GFLOPS one core sustains on this model: the whole model timed with one ORT thread."""
    from edgepipe.agent.device.profiler import random_feeds, time_runs
    from edgepipe.compiler.build import candidate_cuts, load_model, spec_for
    from edgepipe.compiler.verify import cpu_session

    loaded = load_model(model)
    flops = sum(s.flops for s in spec_for(loaded, candidate_cuts(loaded)).segments)
    session = cpu_session(loaded.path, threads=1)
    feeds = random_feeds([_spec(i) for i in session.get_inputs()], microbatch)
    seconds = time_runs(session, feeds, repeats=3, warmup=1)
    return flops * microbatch / seconds / 1e9


def _spec(node: Any) -> Any:
    from edgepipe.agent.formats.bundle import TensorSpec

    return TensorSpec(node.name, "float32", tuple(d if isinstance(d, int) else "batch" for d in node.shape))


def plan_and_run(setup: Setup, label: str, cluster_text: str, solver: str = "ours") -> dict[str, Any]:
    """Plan (ours or a baseline), compile, run on the testbed, and compare with the prediction."""
    from edgepipe.compiler.build import candidate_cuts, compile_model, load_model, spec_for
    from edgepipe.planner.baselines import all_baselines
    from edgepipe.planner.cluster import cluster_from_dict, problem_for
    from edgepipe.planner.simulate import steady_state
    from edgepipe.planner.solver import solve
    from testbed_pipeline import run_on_testbed

    work = setup.out / label
    work.mkdir(parents=True, exist_ok=True)
    cluster_path = work / "cluster.toml"
    cluster_path.write_text(cluster_text)
    loaded = load_model(setup.model)
    spec = spec_for(loaded, candidate_cuts(loaded))
    problem = problem_for(cluster_from_dict(tomllib.loads(cluster_text), str(cluster_path)), spec, setup.microbatch)
    # One device per stage: run_on_testbed starts one agent per stage (no replicas yet).
    plan = solve(problem, max_replicas=1) if solver == "ours" else all_baselines(problem, setup.microbatch)[solver]
    predicted = steady_state(problem, plan)
    if not predicted.fits:
        return {"label": label, "solver": solver, "fits": False, "stages": len(plan.stages)}
    result = compile_model(setup.model, work / "bundles", plan=plan)
    batches, expected = reference(setup, result.model_path)
    run = run_on_testbed(cluster_path, result.bundle_dirs, [s.device for s in plan.stages], batches)
    worst = max(float(np.abs(o - e).max()) for o, e in zip(run.outputs, expected))
    return {
        "label": label, "solver": solver, "fits": True, "stages": len(plan.stages),
        "devices": run.stage_devices, "cuts": [s.cut_in for s in plan.stages[1:]],
        "predicted_throughput": predicted.throughput, "measured_throughput": run.throughput,
        "error_pct": 100.0 * (predicted.throughput - run.throughput) / run.throughput,
        "predicted_stage_s": list(predicted.stage_s), "measured_compute_s": run.stage_compute_s,
        "peak_rss_bytes": run.peak_rss_bytes, "oom_kills": run.oom_kills,
        "max_abs_diff": worst, "correct": worst <= TOLERANCE,
    }


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


def scaling(setup: Setup, counts: list[int]) -> list[dict[str, Any]]:
    """N equal devices sharing the machine's cores; ideal = N x one device of the same share."""
    cores = os.cpu_count() or 2
    rows = []
    for n in counts:
        cpu = round(min(1.0, cores / n), 3)
        gflops = setup.core_gflops * cpu
        devices = "".join(device_toml(f"d{i}", "board", cpu, "2 GiB", "1 Gbps") for i in range(n))
        cluster = f'[cluster]\nname = "scale-{n}"\n' + type_toml("board", gflops) + devices
        single = f'[cluster]\nname = "one-{n}"\n' + type_toml("board", gflops) + device_toml("d0", "board", cpu,
                                                                                               "2 GiB", "1 Gbps")
        one = plan_and_run(setup, f"scaling-1of{n}", single)
        many = plan_and_run(setup, f"scaling-{n}", cluster)
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
    types = "".join(type_toml(t, setup.core_gflops * cpu) for _, t, cpu, _ in HETERO)
    devices = "".join(device_toml(n, t, cpu, mem, "1 Gbps") for n, t, cpu, mem in HETERO)
    cluster = '[cluster]\nname = "hetero"\n' + types + devices
    return [plan_and_run(setup, f"hetero-{solver}", cluster, solver)
            for solver in ("ours", "even-split", "pipedream", "memory-proportional")]


def bandwidth(setup: Setup, rates: list[str]) -> list[dict[str, Any]]:
    rows = []
    for rate in rates:
        cpu = 0.5
        devices = "".join(device_toml(f"d{i}", "board", cpu, "2 GiB", rate) for i in range(4))
        cluster = (f'[cluster]\nname = "bw"\nclient_bandwidth = "{rate}"\n'
                   + type_toml("board", setup.core_gflops * cpu) + devices)
        rows.append({"bandwidth": rate, **plan_and_run(setup, f"bw-{rate.replace(' ', '')}", cluster)})
    return rows


def _setup(model: str, microbatch: int, count: int, out: Path) -> Setup:
    import emulate

    problem = emulate.host_problem()
    if problem:
        console.print(f"error: {problem}")
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    gflops = calibrate(model, microbatch)
    console.print(f"calibrated: one core sustains {gflops:.1f} GFLOPS on {model} at microbatch {microbatch}")
    return Setup(model, microbatch, count, out, gflops)


def _finish(as_json: Path | None, setup: Setup, results: dict[str, Any]) -> None:
    results.update({"command": " ".join(sys.argv), "model": setup.model, "microbatch": setup.microbatch,
                    "count": setup.count, "core_gflops": setup.core_gflops,
                    "machine": {"cpus": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release()},
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    if as_json:
        as_json.parent.mkdir(parents=True, exist_ok=True)
        as_json.write_text(json.dumps(results, indent=2, default=str))
    _print(results)


def _print(results: dict[str, Any]) -> None:
    if "scaling" in results:
        t = Table(title=f"Scaling: {results['model']} on N equal devices sharing {os.cpu_count()} cores")
        for c in ("N", "core each", "one device", "ideal (N x one)", "pipeline", "efficiency", "predicted",
                  "pred. error", "correct"):
            t.add_column(c, justify="right")
        for r in results["scaling"]:
            p = r["pipeline"]
            t.add_row(str(r["devices"]), f"{r['cpu_each']:.2f}", f"{r['one_device']['measured_throughput']:.2f}",
                      f"{r['ideal']:.2f}", f"{p['measured_throughput']:.2f}", f"{100 * r['efficiency']:.0f}%",
                      f"{p['predicted_throughput']:.2f}", f"{p['error_pct']:+.0f}%", str(p["correct"]))
        console.print(t)
    for key, title in (("hetero", "Heterogeneous devices: our plan vs baselines, all measured"),
                       ("bandwidth", "Bandwidth sweep: 4 devices x 0.5 core")):
        if key not in results:
            continue
        t = Table(title=title)
        for c in ("config", "stages", "devices", "predicted", "measured", "error", "ours ÷ this", "correct"):
            t.add_column(c, justify="right")
        ours = results[key][0].get("measured_throughput") if key == "hetero" else None
        for r in results[key]:
            name = r.get("bandwidth") or r["solver"]
            if not r["fits"]:
                t.add_row(name, str(r["stages"]), "-", "does not fit", "-", "-", "-", "-")
                continue
            ratio = f"{ours / r['measured_throughput']:.2f}x" if ours else "-"
            t.add_row(name, str(r["stages"]), ",".join(r["devices"]), f"{r['predicted_throughput']:.2f}",
                      f"{r['measured_throughput']:.2f}", f"{r['error_pct']:+.0f}%", ratio, str(r["correct"]))
        console.print(t)


ModelOpt = Annotated[str, typer.Option(help="Registry model.")]
MbOpt = Annotated[int, typer.Option(help="Microbatch size.")]
CountOpt = Annotated[int, typer.Option(help="Microbatches measured per configuration (after 1 warm-up).")]
OutOpt = Annotated[Path, typer.Option(help="Work directory.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results here.")]


@app.command("scaling")
def scaling_cmd(model: ModelOpt = "vit_base_patch16_224", microbatch: MbOpt = 4, count: CountOpt = 6,
                devices: str = "1,2,4,8", out: OutOpt = Path("build/bench-cluster"), as_json: JsonOpt = None) -> None:
    """Throughput on 1, 2, 4, 8 equal devices, against N x one device."""
    setup = _setup(model, microbatch, count, out)
    _finish(as_json, setup, {"scaling": scaling(setup, [int(n) for n in devices.split(",")])})


@app.command("hetero")
def hetero_cmd(model: ModelOpt = "vit_base_patch16_224", microbatch: MbOpt = 4, count: CountOpt = 6,
               out: OutOpt = Path("build/bench-cluster"), as_json: JsonOpt = None) -> None:
    """Fast, medium, slow and very slow devices: our plan and three baselines, measured."""
    setup = _setup(model, microbatch, count, out)
    _finish(as_json, setup, {"hetero": hetero(setup)})


@app.command("bandwidth")
def bandwidth_cmd(model: ModelOpt = "vit_base_patch16_224", microbatch: MbOpt = 4, count: CountOpt = 6,
                  rates: str = "1 Gbps,100 Mbps,20 Mbps,5 Mbps", out: OutOpt = Path("build/bench-cluster"),
                  as_json: JsonOpt = None) -> None:
    """The same 4 devices on ever slower links: the plan adapts, measured follows predicted."""
    setup = _setup(model, microbatch, count, out)
    _finish(as_json, setup, {"bandwidth": bandwidth(setup, rates.split(","))})


@app.command("all")
def all_cmd(model: ModelOpt = "vit_base_patch16_224", microbatch: MbOpt = 4, count: CountOpt = 6,
            out: OutOpt = Path("build/bench-cluster"), as_json: JsonOpt = None) -> None:
    """Scaling, heterogeneity and bandwidth in one run."""
    setup = _setup(model, microbatch, count, out)
    _finish(as_json, setup, {"scaling": scaling(setup, [1, 2, 4, 8]), "hetero": hetero(setup),
                             "bandwidth": bandwidth(setup, ["1 Gbps", "100 Mbps", "20 Mbps", "5 Mbps"])})


if __name__ == "__main__":
    app()
