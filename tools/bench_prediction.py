"""How close the planner's predictions come to reality, with profiles measured by the agents.

For each stage count N, an emulated cluster of N devices (tools/testbed.py: each device a network
namespace with a fixed CPU share of min(--cpu, --cpu-budget / N) cores, 2 GiB, 1 Gbps) runs
`edgepipe-agent control`; the workstation (root namespace) plans with
`edgepipe-compile MODEL --cluster --profile --probe-links`, which profiles every device through the
network; the control daemons stop, `edgepipe-agent serve` runs the planned stages on their devices,
and `edgepipe-submit --report plan.json` measures the pipeline and compares it with the plan.

    sudo .venv/bin/python tools/bench_prediction.py --stages 2,3 --json build/bench-prediction.json

Each device is its own device type, so each stage is predicted from its own device's profile.
Needs root (network namespaces and cgroups).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import emulate
import typer
from edgepipe.agent.formats.profiles import load_profile
from edgepipe.agent.local import PipelineKeys, stop_processes
from rich.console import Console
from rich.table import Table
from testbed import ClusterSpec, DeviceSpec, Testbed, TestbedError

BIN = Path(sys.executable).parent
CONTROL_PORT, DATA_PORT, RESULTS_PORT = 5560, 5550, 5551


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and carries the end of its log."""


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version()}


def planner_cluster(bed: Testbed, devices: list[str]) -> str:
    """The planner's cluster file for the testbed: one type per device, addresses = control endpoints.
    The types' gflops are placeholders; --profile replaces them with the measured times."""
    text = '[cluster]\nname = "bench-prediction"\nclient_bandwidth = "1 Gbps"\n'
    for name in devices:
        text += f'\n[[type]]\nname = "{name}"\ngflops = 10.0\n'
    for name in devices:
        text += (f'\n[[device]]\nname = "{name}"\ntype = "{name}"\naddress = "{bed.endpoint(name, CONTROL_PORT)}"\n'
                 f'memory = "2 GiB"\nbandwidth = "1 Gbps"\n')
    return text


def wait_ready(proc: subprocess.Popen, ready: Path, log: Path, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (ready.exists() and ready.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:])
            raise BenchError(f"{what} did not start: {tail}")
        time.sleep(0.1)


def run_one(model: str, n: int, cpu: float, microbatch: int, count: int, warmup: int, work: Path,
            log: Console, trace: Path | None = None) -> dict[str, Any]:
    devices = [f"dev{i}" for i in range(n)]
    spec = ClusterSpec(name=f"bp{os.getpid() % 10000}n{n}", source="bench_prediction", warnings=(),
                       devices=tuple(DeviceSpec(d, cpu, None, 2 << 30, 1_000_000_000) for d in devices))
    out = work / f"{n}-stages"
    out.mkdir(parents=True, exist_ok=True)
    with Testbed(spec) as bed:
        cluster = out / "cluster.toml"
        cluster.write_text(planner_cluster(bed, devices))
        controls = []
        for d in devices:
            ready, logf = out / f"control-{d}.json", out / f"control-{d}.log"
            # --insecure: an isolated testbed, and profiling is what is measured here, not the channel
            proc = bed.run_in(d, [str(BIN / "edgepipe-agent"), "control", "--listen", bed.endpoint(d, CONTROL_PORT),
                                  "--device", d, "--ready-file", str(ready), "--insecure",
                                  "--state-dir", str(out / f"state-{d}")], stdout=logf.open("w"),
                              stderr=subprocess.STDOUT)
            controls.append(proc)
            wait_ready(proc, ready, logf, f"control daemon on {d}")
        log.print(f"[{n} stages] profiling {n} devices and links through the network ...")
        started = time.perf_counter()
        compiled = subprocess.run(
            [str(BIN / "edgepipe-compile"), model, "--cluster", str(cluster), "--profile", "--probe-links",
             "--insecure", "--microbatch", str(microbatch), "-o", str(out / "build"), "--no-verify", "--json"],
            capture_output=True, text=True)
        if compiled.returncode != 0:
            raise BenchError(f"edgepipe-compile failed: {compiled.stderr.strip()[-500:]}")
        plan_s = time.perf_counter() - started
        stop_processes(controls, timeout_s=60)  # free the devices' CPU and memory before serving
        plan = json.loads((out / "build" / "plan.json").read_text())
        stages = plan["stages"]
        log.print(f"[{n} stages] plan on {', '.join(s['device'] for s in stages)}; starting agents ...")
        agents = []
        next_listen = None
        keys = PipelineKeys.make(out / "keys", len(stages))  # secure, as a real deployment is
        for i in reversed(range(len(stages))):
            d = stages[i]["device"]
            ready, logf = out / f"agent-{i}.json", out / f"agent-{i}.log"
            argv = [str(BIN / "edgepipe-agent"), "serve", str(out / "build" / f"stage-{i}"),
                    "--listen", bed.endpoint(d, DATA_PORT), "--ready-file", str(ready), "--threads", "1",
                    *keys.serve_args(i)]
            argv += ["--next", next_listen] if next_listen else ["--results", bed.endpoint(d, RESULTS_PORT)]
            proc = bed.run_in(d, argv, stdout=logf.open("w"), stderr=subprocess.STDOUT)
            agents.append(proc)
            wait_ready(proc, ready, logf, f"agent {i} on {d}")
            next_listen = bed.endpoint(d, DATA_PORT)
        log.print(f"[{n} stages] submitting {count} microbatches of {microbatch} ...")
        submit_argv = [str(BIN / "edgepipe-submit"), bed.endpoint(stages[0]["device"], DATA_PORT),
                       bed.endpoint(stages[-1]["device"], RESULTS_PORT), *keys.submit_args(),
                       "--bundle", str(out / "build" / "stage-0"),
                       "-b", str(microbatch), "-n", str(count), "--warmup", str(warmup), "--timeout-s", "300",
                       "--report", str(out / "build" / "plan.json"), "--json"]
        if trace is not None:
            trace.parent.mkdir(parents=True, exist_ok=True)
            submit_argv += ["--trace", str(trace)]
        submitted = subprocess.run(submit_argv, capture_output=True, text=True)
        stop_processes(agents, timeout_s=60)
        if submitted.returncode != 0:
            raise BenchError(f"edgepipe-submit failed: {submitted.stderr.strip()[-500:]}")
        report = json.loads(submitted.stdout)
    profiles = {d: load_profile(out / "build" / "profiles" / f"{d}.json") for d in devices}
    return {"stages": n, "cpu": cpu, "plan_stages": len(stages), "devices": [s["device"] for s in stages],
            "cuts": [s["cut_out"] for s in stages[:-1]], "profile_and_plan_s": plan_s,
            "predicted_throughput": report["prediction"]["predicted_throughput"],
            "measured_throughput": report["prediction"]["measured_throughput"],
            "throughput_error_pct": report["prediction"]["throughput_error_pct"],
            "whole_run_throughput": report["throughput_samples_s"],
            "predicted_bottleneck": report["prediction"]["predicted_bottleneck"],
            "measured_bottleneck": report["prediction"]["measured_bottleneck"],
            "per_stage": report["prediction"]["stages"], "warnings": report["prediction"]["warnings"],
            "profile_max_spread": {d: p.max_spread(microbatch) for d, p in profiles.items()},
            "comm_share": {d: p.comm.share if p.comm else None for d, p in profiles.items()},
            "submit_command": " ".join(submit_argv)}


def main(model: str = typer.Option("vit_base_patch16_224", help="Registry model to pipeline."),
         stages: str = typer.Option("2,3", help="Stage (device) counts to run, comma-separated."),
         cpu: float = typer.Option(0.6, min=0.05, help="Largest CPU share of a device, in cores."),
         cpu_budget: float = typer.Option(1.5, min=0.1, help=(
             "Cores all devices share at most (each gets min(--cpu, budget / N)); the rest is left to "
             "the client and the system, so the devices' quotas are really available.")),
         microbatch: int = typer.Option(4, min=1, help="Microbatch size planned and sent."),
         count: int = typer.Option(12, min=3, help="Measured microbatches per run."),
         warmup: int = typer.Option(2, min=0, help="Microbatches sent first and not measured."),
         repeats: int = typer.Option(1, min=1, help="Runs per stage count (each profiles, plans and measures anew)."),
         json_out: Path = typer.Option(None, "--json", help="Also write the results here as JSON."),
         traces: Path = typer.Option(None, "--traces", help="Write each run's trace (edgepipe-submit --trace) "
                                     "into this directory.")) -> None:
    """Predicted vs measured throughput of pipelines planned from profiles the agents measured.

    \b
    Example: sudo .venv/bin/python tools/bench_prediction.py --stages 2,3 --json build/bench-prediction.json
    """
    console, err = Console(), Console(stderr=True)
    problem = emulate.host_problem()
    if problem is not None:
        err.print(f"error: {problem}", markup=False, highlight=False)
        raise typer.Exit(2)
    try:
        counts = [int(v) for v in stages.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"--stages {stages!r}: expected counts like 2,3") from None
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prediction-") as tmp:
        try:
            for rep in range(repeats):
                for n in counts:
                    trace = traces / f"prediction-{n}-stages-run-{rep}.json" if traces is not None else None
                    row = run_one(model, n, min(cpu, cpu_budget / n), microbatch, count, warmup,
                                  Path(tmp) / f"run-{rep}", err, trace)
                    rows.append({"repeat": rep, **row})
        except (BenchError, TestbedError, emulate.EmulationError, OSError) as exc:
            err.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(1) from None
    result = {"machine": machine(), "command": " ".join([sys.executable, *sys.argv]), "model": model,
              "cpu_max": cpu, "cpu_budget": cpu_budget, "microbatch": microbatch, "count": count, "warmup": warmup,
              "repeats": repeats, "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
              "runs": rows,
              "median_error_pct": {str(n): statistics.median(r["throughput_error_pct"] for r in rows
                                                             if r["stages"] == n) for n in counts}}
    m = result["machine"]
    table = Table(title=f"{model}: predicted vs measured, microbatch {microbatch}; {m['cpu_model']}, {m['cpus']} cpus")
    for col in ("run", "stages", "cores/device", "devices", "cuts", "predicted /s", "measured /s", "error",
                "bottleneck pred / meas", "max profile spread"):
        table.add_column(col, justify="left" if col in ("devices", "cuts") else "right")
    for r in rows:
        table.add_row(str(r["repeat"]), str(r["plan_stages"]), f"{r['cpu']:g}", ",".join(r["devices"]),
                      ",".join(r["cuts"]) or "-",
                      f"{r['predicted_throughput']:.2f}", f"{r['measured_throughput']:.2f}",
                      f"{r['throughput_error_pct']:+.1f}%", f"{r['predicted_bottleneck']} / {r['measured_bottleneck']}",
                      f"{max(r['profile_max_spread'].values(), default=0):.1%}")
    console.print(table)
    stage_table = Table(title="per stage (ms per microbatch)")
    for col in ("run", "stages", "stage", "device", "compute pred", "compute meas", "error", "send pred", "send meas"):
        stage_table.add_column(col, justify="right")
    for r in rows:
        for s in r["per_stage"]:
            stage_table.add_row(str(r["repeat"]), str(r["plan_stages"]), str(s["stage"]), s["device"],
                                f"{s['predicted_compute_ms']:.1f}", f"{s['measured_compute_ms']:.1f}",
                                f"{s['compute_error_pct']:+.1f}%", f"{s['predicted_send_ms']:.1f}",
                                f"{s['measured_send_ms']:.1f}")
    console.print(stage_table)
    for n, error in result["median_error_pct"].items():
        console.print(f"{n} stages: median throughput error over {repeats} run(s): {error:+.1f}%")
    load = result["load_average_1min"]
    console.print(f"load average {load['before']:.2f} -> {load['after']:.2f}; command: {result['command']}",
                  markup=False, highlight=False, soft_wrap=True)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
