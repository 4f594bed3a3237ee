"""Deploy and failover on the emulated edge cluster (issues 9 and 10): `edgepipe-fleet` against real
device daemons running inside testbed devices.

    .venv/bin/python tools/bench_deploy.py deploy      # ViT-B onto 4 devices at 100 Mbps: first, again, one cut moved
    .venv/bin/python tools/bench_deploy.py failover    # permanent loss of 1 of 4: detect, fail over, first result
    .venv/bin/python tools/bench_deploy.py all --json build/bench-deploy.json

**deploy**: each repetition starts 4 fresh daemons (empty stores), then times, as the CLI reports
and as wall time of the `edgepipe-fleet deploy` process: the first deploy of a planned 4-stage ViT-B
build; the same build again (nothing to send or restart); a build with one cut moved one block (the
two stages around it change and are sent; the others are kept running); and the first build again
(its files are still on the devices: nothing sent, two stages restarted).

**failover**: one deployment under `edgepipe-fleet supervise` (standby bundles made and pre-sent
first). Each repetition streams requests through `tools/follow.py`, kills every process of the
device that runs the middle stage (a power cut), and measures from the kill: the supervisor naming
the device (detect), the new generation published with every stage ready (failover), the first
result of a client that starts on the new generation as soon as it is published (the re-planned
pipeline's first result), and the first result the streaming client gets from it; results lost and
duplicated over the whole stream; then the device is brought back and taken back before the next
repetition.

Needs root (the testbed). The machine's 2 cores are shared by the devices: run it on a quiet machine,
under `flock /work/notes/bench.lock` when others benchmark too.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))

from fleet_harness import (
    BIN,
    Keys,
    make_keys,
    start_daemon_in,
    start_supervisor,
    stop_daemon,
    stop_supervisor,
    wait_event,
    write_cluster,
)
from follow import follow

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
console = Console(width=150)
TOLERANCE = 1e-4
DEVICES = [f"dev{i}" for i in range(4)]


def testbed_spec(path: Path, bandwidth: str, cpu: float, memory: str) -> Path:
    rows = "".join(f'\n[[device]]\nname = "{d}"\ntype = "board"\nmemory = "{memory}"\nbandwidth = "{bandwidth}"\n'
                   f"cpu = {cpu}\n" for d in DEVICES)
    path.write_text(f'[cluster]\nname = "bd{os.getpid() % 100000}"\n\n[[type]]\nname = "board"\ngflops = 5.0\n'
                    + rows)
    return path


def planner_cluster(path: Path, daemons: list[Any], keys: Keys) -> Path:
    """The planner's view: 5 GFLOPS boards whose memory (130 MB for a stage, runtime excluded) holds
    a quarter of ViT-B but not half, so the plan is a 4-stage pipeline (not the model replicated
    whole) and the 3 devices left after a loss can still hold it."""
    write_cluster(path, daemons, keys)
    text = path.read_text().replace("gflops = 50.0", "gflops = 5.0").replace('memory = "2 GiB"', 'memory = "130 MB"')
    path.write_text(text.replace("[cluster]\n", '[cluster]\nruntime_overhead = "0"\n', 1))
    return path


def fleet(*args: str, keys: Keys) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    result = subprocess.run([str(BIN / "edgepipe-fleet"), *args, "--json", "--key", str(keys.workstation_file)],
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"edgepipe-fleet {' '.join(args)} failed: {result.stderr.strip()[-800:]}")
    return json.loads(result.stdout), wall


def compile_builds(model: str, cluster: Path, work: Path, moved: bool = True) -> tuple[Path, Path | None]:
    """The planned build, and (``moved``) the same with its middle cut one block later."""
    out = work / "build"
    result = subprocess.run([str(BIN / "edgepipe-compile"), model, "--cluster", str(cluster), "-o", str(out),
                             "--microbatch", "1", "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compile failed: {result.stderr.strip()[-800:]}")
    plan = json.loads((out / "plan.json").read_text())
    if len(plan["stages"]) != 4:
        raise RuntimeError(f"the planner chose {len(plan['stages'])} devices; the benchmark needs 4")
    if not moved:
        return out, None
    cuts = [s["cut_in"] for s in plan["stages"][1:]]
    k = len(cuts) // 2
    block = int(cuts[k].split(".")[1])
    other = work / "moved"
    result = subprocess.run([str(BIN / "edgepipe-compile"), model, "--cuts",
                             ",".join([*cuts[:k], f"blocks.{block + 1}", *cuts[k + 1:]]), "-o", str(other), "--json"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compile failed: {result.stderr.strip()[-800:]}")
    return out, other


def swap_stages(build: Path, source: Path) -> None:
    for stage in sorted(source.glob("stage-*")):
        shutil.rmtree(build / stage.name, ignore_errors=True)
        shutil.copytree(stage, build / stage.name)


def deploy_bench(model: str, bandwidth: str, cpu: float, memory: str, reps: int, work: Path) -> dict[str, Any]:
    from testbed import Testbed

    keys = make_keys(work / "keys")
    rows: list[dict[str, Any]] = []
    first = moved = None
    with Testbed(testbed_spec(work / "testbed.toml", bandwidth, cpu, memory)) as bed:
        for rep in range(reps):
            root = work / f"rep{rep}"
            root.mkdir(parents=True, exist_ok=True)
            daemons = [start_daemon_in(bed, keys, root, d) for d in DEVICES]  # fresh: empty stores
            try:
                cluster = planner_cluster(root / "cluster.toml", daemons, keys)
                if first is None:
                    first, moved = compile_builds(model, cluster, work)
                build = _copy_build(first, root)
                shutil.copyfile(cluster, build / "cluster.toml")
                order = [s["device"] for s in json.loads((build / "plan.json").read_text())["stages"]]
                devices = ["--devices", ",".join(order)]  # the moved build has no plan of its own
                for label, source in (("first deploy", None), ("same build again", None),
                                      ("one cut moved (2 stages change)", moved), ("back to the first build", first)):
                    if source is not None:
                        swap_stages(build, source)
                    out, wall = fleet("deploy", str(build), *devices, keys=keys)
                    rows.append({"rep": rep, "case": label, "wall_s": wall, "deploy_s": out["seconds"],
                                 "timings": out["timings"], "sent_bytes": sum(d["sent"] for d in out["devices"]),
                                 "cached_bytes": sum(d["cached"] for d in out["devices"]),
                                 "actions": {d["device"]: d["actions"] for d in out["devices"]}})
                    console.print(f"rep {rep}: {label}: {wall:.1f} s wall, {out['seconds']:.1f} s deploy, "
                                  f"{rows[-1]['sent_bytes'] / 2**20:.1f} MiB sent")
                fleet("stop", str(build), keys=keys)
            finally:
                for daemon in daemons:
                    stop_daemon(daemon)
    return {"rows": rows, "summary": _summarise(rows, ("wall_s", "deploy_s", "sent_bytes"))}


def _copy_build(src: Path, root: Path) -> Path:
    dst = root / "build"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("deployment.json", "endpoints.json", "standby",
                                                            "events.jsonl", "*.log"))
    return dst


def failover_bench(model: str, bandwidth: str, cpu: float, memory: str, reps: int, batches: int,
                   work: Path) -> dict[str, Any]:
    from testbed import Testbed

    keys = make_keys(work / "keys")
    rows: list[dict[str, Any]] = []
    with Testbed(testbed_spec(work / "testbed.toml", bandwidth, cpu, memory)) as bed:
        daemons = {d: start_daemon_in(bed, keys, work, d) for d in DEVICES}
        supervisor = None
        try:
            cluster = planner_cluster(work / "cluster.toml", list(daemons.values()), keys)
            build, _ = compile_builds(model, cluster, work, moved=False)
            fleet("deploy", str(build), keys=keys)
            events = build / "events.jsonl"
            supervisor = start_supervisor(build, keys, events, "--take-back-after-s", "3")
            ready = wait_event(events, "standby_ready", supervisor, timeout_s=1800)
            console.print(f"standby ready: {ready['sent_bytes'] / 2**20:.0f} MiB pre-sent")
            model_path = Path(json.loads((build / "compile.json").read_text())["model_path"])
            rng = np.random.default_rng(0)
            inputs = [rng.standard_normal((1, 3, 224, 224), dtype=np.float32) for _ in range(batches)]
            reference = _reference(model_path, inputs)
            plan = json.loads((build / "plan.json").read_text())
            for rep in range(reps):
                victim = plan["stages"][1 + rep % 2]["device"]  # a middle stage: upstream and downstream survive
                row = _one_loss(bed, build, keys, events, supervisor, daemons, work, victim, inputs, reference)
                row["rep"] = rep
                rows.append(row)
                console.print(f"rep {rep}: lost {victim}: detect {row['detect_s']:.2f} s, failover "
                              f"{row['failover_s']:.2f} s, re-planned pipeline's first result "
                              f"{row['probe_result_s']:.2f} s, stream's first new result "
                              f"{row['stream_result_s']:.2f} s, lost {row['lost']}, duplicated {row['duplicated']}, "
                              f"max |diff| {row['max_abs_diff']:.2g}")
            fleet("stop", str(build), keys=keys)
        finally:
            if supervisor is not None:
                stop_supervisor(supervisor)
            for daemon in daemons.values():
                stop_daemon(daemon)
    return {"rows": rows, "summary": _summarise(rows, ("detect_s", "failover_s", "probe_result_s", "stream_result_s",
                                                       "lost", "duplicated"))}


def _one_loss(bed: Any, build: Path, keys: Keys, events: Path, supervisor: subprocess.Popen,
              daemons: dict[str, Any], work: Path, victim: str, inputs: list[np.ndarray],
              reference: list[np.ndarray]) -> dict[str, Any]:
    from edgepipe.agent.client import Client
    from edgepipe.agent.control_client import find_route
    from edgepipe.agent.formats.endpoints import load_endpoints

    before = load_endpoints(build / "endpoints.json")
    killed: dict[str, float] = {}
    probe: dict[str, float] = {}

    def kill() -> None:
        killed["t"] = time.time()
        for pid in bed.pids(victim):
            os.kill(pid, signal.SIGKILL)

    def probe_new_generation() -> None:
        """A fresh client that starts on the new generation as soon as a daemon publishes it."""
        while "t" not in killed:
            time.sleep(0.01)
        while True:
            newer = find_route(before, keys.client, timeout_s=0.3)
            if newer is not None:
                break
            time.sleep(0.05)
        probe["published"] = time.time()
        with Client.from_endpoints(newer, keys.client) as client:
            client.run({newer.inputs[0].name: inputs[0]})
        probe["result"] = time.time()

    prober = threading.Thread(target=probe_new_generation, daemon=True)
    prober.start()

    def on_result(index: int, _generation: int) -> None:
        if index >= 8 and "t" not in killed:
            kill()

    run = follow(build / "endpoints.json", inputs, keys.client, window=2, pace_s=0.1, on_result=on_result)
    prober.join(120)
    lost = wait_event(events, "lost", supervisor, after=killed["t"])
    failover = wait_event(events, "failover", supervisor, after=killed["t"])
    new = [t for t, _, g in run.arrivals if g > before.generation]
    diffs = [float(np.abs(run.outputs[i] - reference[i]).max()) for i in run.outputs]
    row = {"victim": victim, "detect_s": lost["t"] - killed["t"], "failover_s": failover["t"] - killed["t"],
           "published_s": probe["published"] - killed["t"], "probe_result_s": probe["result"] - killed["t"],
           "stream_result_s": (min(new) - killed["t"]) if new else float("nan"),
           "lost": len(run.errors), "duplicated": run.late,
           "max_abs_diff": max(diffs), "failover_sent_bytes": failover["sent_bytes"], "how": failover["how"]}
    if row["max_abs_diff"] > TOLERANCE:
        raise RuntimeError(f"results differ from the whole model by {row['max_abs_diff']:.3g}")
    # bring the device back (a reboot: its daemon starts again) and wait until it is taken back
    daemons[victim] = start_daemon_in(bed, keys, work, victim)
    wait_event(events, "taken_back", supervisor, after=failover["t"], timeout_s=300)
    time.sleep(2.0)
    return row


def _reference(model_path: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: x})[0] for x in inputs]


def _summarise(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    cases = sorted({r.get("case", "loss") for r in rows}, key=[r.get("case", "loss") for r in rows].index)
    out: dict[str, Any] = {}
    for case in cases:
        chosen = [r for r in rows if r.get("case", "loss") == case]
        out[case] = {k: {"median": statistics.median(r[k] for r in chosen), "min": min(r[k] for r in chosen),
                         "max": max(r[k] for r in chosen)} for k in keys}
        out[case]["n"] = len(chosen)
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "load_average_start": os.getloadavg()}


def _print(results: dict[str, Any]) -> None:
    for name, part in results.items():
        if not isinstance(part, dict) or "summary" not in part:
            continue
        table = Table(title=name)
        first = next(iter(part["summary"].values()))
        keys = [k for k in first if k != "n"]
        table.add_column("case")
        table.add_column("n", justify="right")
        for k in keys:
            table.add_column(f"{k} median (min-max)", justify="right")
        for case, stats in part["summary"].items():
            cells = []
            for k in keys:
                s = stats[k]
                fmt = (lambda v: f"{v / 2**20:.1f} MiB") if k.endswith("bytes") else \
                    (lambda v: f"{v:.2f}") if k.endswith("_s") else (lambda v: f"{v:g}")
                cells.append(f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})")
            table.add_row(case, str(stats["n"]), *cells)
        console.print(table)


ModelOpt = Annotated[str, typer.Option("--model", help="Registry model.")]
BwOpt = Annotated[str, typer.Option("--bandwidth", help="Every device's link.")]
CpuOpt = Annotated[float, typer.Option("--cpu", help="Every device's share of a core.")]
MemOpt = Annotated[str, typer.Option("--memory", help="Every device's memory limit.")]
RepsOpt = Annotated[int, typer.Option("--reps", min=1, help="Repetitions (medians reported).")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write the results here.")]


def _run(parts: list[str], model: str, bandwidth: str, cpu: float, memory: str, reps: int, batches: int,
         as_json: Path | None) -> None:
    results: dict[str, Any] = {"model": model, "bandwidth": bandwidth, "cpu": cpu, "memory": memory,
                               "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        if "deploy" in parts:
            results["deploy"] = deploy_bench(model, bandwidth, cpu, memory, reps, Path(tmp) / "deploy")
        if "failover" in parts:
            results["failover"] = failover_bench(model, bandwidth, cpu, memory, reps, batches, Path(tmp) / "failover")
    results["machine"]["load_average_end"] = os.getloadavg()
    _print(results)
    if as_json is not None:
        as_json.parent.mkdir(parents=True, exist_ok=True)
        as_json.write_text(json.dumps(results, indent=2) + "\n")


@app.command("deploy")
def deploy_cmd(model: ModelOpt = "vit_base_patch16_224", bandwidth: BwOpt = "100 Mbps", cpu: CpuOpt = 0.45,
               memory: MemOpt = "1 GiB", reps: RepsOpt = 3, as_json: JsonOpt = None) -> None:
    """First deploy, unchanged redeploy, one cut moved, and back, onto 4 fresh devices."""
    _run(["deploy"], model, bandwidth, cpu, memory, reps, 0, as_json)


@app.command("failover")
def failover_cmd(model: ModelOpt = "vit_base_patch16_224", bandwidth: BwOpt = "100 Mbps", cpu: CpuOpt = 0.45,
                 memory: MemOpt = "1 GiB", reps: RepsOpt = 3,
                 batches: Annotated[int, typer.Option("--batches", help="Requests per repetition.")] = 40,
                 as_json: JsonOpt = None) -> None:
    """Permanent loss of the device running a middle stage, under supervise."""
    _run(["failover"], model, bandwidth, cpu, memory, reps, batches, as_json)


@app.command("all")
def all_cmd(model: ModelOpt = "vit_base_patch16_224", bandwidth: BwOpt = "100 Mbps", cpu: CpuOpt = 0.45,
            memory: MemOpt = "1 GiB", reps: RepsOpt = 3,
            batches: Annotated[int, typer.Option("--batches", help="Requests per failover repetition.")] = 40,
            as_json: JsonOpt = None) -> None:
    """Both, one after the other."""
    _run(["deploy", "failover"], model, bandwidth, cpu, memory, reps, batches, as_json)


if __name__ == "__main__":
    app()
