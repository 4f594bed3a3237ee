"""A model no single device can hold, run across several: ViT-Huge on emulated 1 GiB devices.

Plans ViT-Huge (2.35 GiB of fp32 weights) for a cluster of equal devices capped at --memory each
(the planner refuses the model on one such device and says why), compiles the planned bundles,
starts one agent per device inside the testbed (network namespace, tbf-shaped link, cgroup CPU
quota and memory limit), runs microbatches through the pipeline from the root namespace, checks
every output against the whole model run in one ONNX Runtime session, and reports throughput and
each agent's peak memory as the kernel's cgroup accounting saw it. Needs root (the testbed).

    .venv/bin/python tools/bench_memory.py                      # ViT-Huge, 5 devices x 1 GiB
    .venv/bin/python tools/bench_memory.py --model vit_base_patch16_224 --devices 3 --memory "256 MiB"
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
console = Console(width=150)


def cluster_toml(name: str, devices: int, memory: str, cpu: float, bandwidth: str, gflops: float) -> str:
    from bench_cluster import device_toml, type_toml

    return (f'[cluster]\nname = "{name}"\n' + type_toml("board", gflops)
            + "".join(device_toml(f"board-{i}", "board", cpu, memory, bandwidth) for i in range(devices)))


@app.command()
def main(
    model: Annotated[str, typer.Option(help="Registry model.")] = "vit_huge_patch14_224",
    devices: Annotated[int, typer.Option(help="Emulated devices in the cluster.")] = 5,
    memory: Annotated[str, typer.Option(help="Memory limit of each device.")] = "1 GiB",
    bandwidth: Annotated[str, typer.Option(help="Each device's link.")] = "1 Gbps",
    microbatch: Annotated[int, typer.Option(help="Samples per request.")] = 1,
    count: Annotated[int, typer.Option(help="Microbatches measured (after one warm-up).")] = 6,
    out: Annotated[Path, typer.Option(help="Build directory.")] = Path("build/bench-memory"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run a model too big for any one device across several memory-capped emulated devices."""
    import emulate
    from bench_cluster import calibrate
    from edgepipe.agent.formats.bundle import read_manifest
    from edgepipe.compiler.build import candidate_cuts, compile_model, load_model, spec_for
    from edgepipe.compiler.verify import cpu_session
    from edgepipe.planner.cluster import cluster_from_dict, problem_for
    from edgepipe.planner.solver import solve
    from testbed_pipeline import run_on_testbed

    problem_host = emulate.host_problem()
    if problem_host:
        console.print(f"error: {problem_host}")
        raise typer.Exit(2)
    cpu = round(min(1.0, (os.cpu_count() or 2) / devices), 2)
    threads = 1
    out.mkdir(parents=True, exist_ok=True)
    # Device speed for the prediction: one core's GFLOPS on this model, scaled by the CPU share.
    gflops = calibrate(model, microbatch) * cpu
    cluster_path = out / "cluster.toml"
    cluster_path.write_text(cluster_toml("bench-memory", devices, memory, cpu, bandwidth, gflops=gflops))

    # 1. One device cannot hold the model: ask the planner, which says why.
    import tomllib

    loaded = load_model(model)
    spec = spec_for(loaded, candidate_cuts(loaded))
    one = tomllib.loads(cluster_toml("one", 1, memory, cpu, bandwidth, gflops))
    try:
        solve(problem_for(cluster_from_dict(one, "one-device"), spec, microbatch))
        single_device = "fits (unexpected: increase the model or lower --memory)"
    except ValueError as exc:
        single_device = str(exc)

    # 2. Plan for the cluster and compile the planned bundles (verified against the whole model).
    from edgepipe.planner.cluster import load_cluster

    # One device per stage: run_on_testbed starts one agent per stage (no replicas yet).
    plan = solve(problem_for(load_cluster(cluster_path), spec, microbatch), max_replicas=1)
    predicted = plan.throughput
    result = compile_model(model, out / "bundles", plan=plan)
    stage_devices = [s.device for s in plan.stages]

    # 3. Reference outputs from the whole model in one session (root namespace, no limit).
    first = read_manifest(result.bundle_dirs[0]).inputs[0]
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((microbatch, *first.shape[1:])).astype(np.float32) for _ in range(count + 1)]
    whole = cpu_session(result.model_path, threads=os.cpu_count() or 2)
    expected = [whole.run(None, {first.name: b})[0] for b in batches]
    del whole

    # 4. The pipeline in the testbed, page cache dropped so weights are charged to the devices.
    emulate.drop_page_cache()
    run = run_on_testbed(cluster_path, result.bundle_dirs, stage_devices, batches, threads=threads,
                         workdir=out)
    worst = max(float(np.abs(o - e).max()) for o, e in zip(run.outputs, expected[1:]))
    rows = [{"stage": i, "device": name, "weight_bytes": read_manifest(result.bundle_dirs[i]).weight_bytes,
             "peak_rss_bytes": run.peak_rss_bytes[i], "cgroup_peak_bytes": run.cgroup_peak_bytes[i],
             "oom_kills": run.oom_kills[i]} for i, name in enumerate(stage_devices)]
    report = {
        "command": " ".join(sys.argv), "model": model, "devices": devices, "memory": memory, "cpu_per_device": cpu,
        "bandwidth": bandwidth, "microbatch": microbatch, "count": count,
        "whole_model_weight_bytes": sum(r["weight_bytes"] for r in rows),
        "single_device": single_device, "stages": len(stage_devices),
        "throughput_samples_s": run.throughput, "predicted_samples_s": predicted,
        "error_pct": 100.0 * (predicted - run.throughput) / run.throughput, "max_abs_diff": worst, "per_stage": rows,
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"{model} on {len(stage_devices)} emulated devices ({memory}, {cpu} core, {bandwidth} each)")
    for col in ("stage", "device", "weights", "agent peak RSS", "cgroup peak (incl. page cache)", "OOM kills"):
        table.add_column(col, justify="right")
    mib = 2**20
    for r in rows:
        table.add_row(str(r["stage"]), r["device"], f"{r['weight_bytes'] / mib:.0f} MiB",
                      f"{r['peak_rss_bytes'] / mib:.0f} MiB", f"{r['cgroup_peak_bytes'] / mib:.0f} MiB",
                      str(r["oom_kills"]))
    console.print(table)
    console.print(f"one device: {single_device}")
    console.print(f"predicted {predicted:.3f} samples/s, error {report['error_pct']:+.0f}%")
    console.print(f"throughput {run.throughput:.3f} samples/s (steady state) over {count} microbatches of "
                  f"{microbatch}; max |pipeline - whole model| = {worst:.3g}")


if __name__ == "__main__":
    app()
