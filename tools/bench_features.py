"""Issue 13 acceptance on the emulated testbed: what activation compression, int8 weights and stage
replication buy, each configuration planned, built, served and measured side by side in one run.

    compress   ViT-L on 4 equal devices at 5 and 20 Mbps: the best fp32 plan against the planner's plan
               within --max-error (compressed hops, int8 stages); target >= 2x at 5 Mbps; the outputs'
               measured error against the whole fp32 model is reported
    replicate  1 fast + 3 identical slow devices on slow links (5 Mbps, like boards on Wi-Fi): the best
               pipeline-only plan against the plan with replicated stages (each replica's link carries
               only its share of the microbatches); target >= 1.3x
    paper      16 devices, 4 kinds x 4 with CPU shares in the ratios of planner/examples/paper-testbed.toml,
               at 1 Gbps and 5 Mbps: our plan without and with the new features against even split and
               PipeDream-style; target > 4.16x over PipeDream (the paper's best)
    all        the three, one after another

    flock /work/notes/bench.lock .venv/bin/python tools/bench_features.py all --json build/bench-features.json
    .venv/bin/python tools/bench_features.py compress --plan-only      # plan and predict only (no build, no testbed)

Every device is a testbed namespace (tools/testbed.py: tbf-shaped link, cgroup CPU share); the client
runs in the root namespace. The first device of each cluster is the "gateway": it keeps a 1 Gbps link
(the camera or data source sits there), so the client's raw input hop does not cap every plan alike;
every other device has the scenario's rate. Device speeds for the planner come from one calibration
at the start (the whole model timed on one core, fp32 and int8 weights, scaled by each CPU share), as
in tools/bench_cluster.py. Needs root for the testbed (not for --plan-only), and the data plane v2
runtime (`serve --codec`, replicated `--next`) and the planner v2 (error budgets, replicas).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import tomllib
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
console = Console(width=170)
RESULTS: dict[str, Any] = {}
LARGE = "vit_large_patch16_224"
# Lets the planner use int8 weights on a few ViT-L stages (each costs about 0.9998 in cosine, and the
# planner adds angles conservatively); the deployed pipeline's measured error is reported beside it.
DEFAULT_BUDGET = "cosine=0.99"
GATEWAY_RATE = "1 Gbps"
DATA_PORT, RESULTS_PORT = 5550, 5551
AGENT = str(Path(sys.executable).parent / "edgepipe-agent")
PAPER_TOML = Path(__file__).parents[1] / "planner" / "examples" / "paper-testbed.toml"
FANOUT = "fan-out"  # a hand-made replicated plan (replicate scenario)


# --- configurations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRow:
    name: str
    kind: str
    cpu: float  # fraction of one core
    memory: str
    bandwidth: str


@dataclass(frozen=True)
class Case:
    """One configuration measured: a cluster and how it is planned."""

    scenario: str
    label: str
    devices: tuple[DeviceRow, ...]
    planner: str = "ours"  # "ours" or a baseline name (planner/baselines.py)
    max_error: str | None = None  # error budget for our planner (None: no lossy choice)
    max_replicas: int | None = 1  # 1: pipeline only; None: as many as the planner likes


@dataclass(frozen=True)
class Setup:
    model: str
    microbatch: int
    count: int
    out: Path
    core_gflops: float  # fp32: effective GFLOPS of one full core on this model (calibrated)
    int8_core_gflops: float  # the same with int8 weights
    samples: int  # calibration samples for the measured errors
    secure: bool
    plan_only: bool
    measurements: Any = None  # compiler.compression.LossyMeasurements (for budgets)
    heartbeat_s: float | None = None  # serve/Client --heartbeat-s (None: the agent's default)
    extra: dict[str, Any] = field(default_factory=dict)


def compress_cases(rate: str, budget: str) -> list[Case]:
    devices = tuple(DeviceRow(f"board-{i}", "board", 0.5, "4 GiB", GATEWAY_RATE if i == 0 else rate)
                    for i in range(4))
    scenario = f"compress@{rate}"
    return [Case(scenario, "fp32 (best plan, no lossy choice)", devices),
            Case(scenario, f"compressed (--max-error {budget})", devices, max_error=budget)]


def replicate_cases(slow_rate: str) -> list[Case]:
    devices = (DeviceRow("fast", "fast", 0.8, "4 GiB", GATEWAY_RATE),
               *(DeviceRow(f"slow-{i}", "slow", 0.4, "4 GiB", slow_rate) for i in range(3)))
    scenario = f"replicate@{slow_rate}"
    return [Case(scenario, "pipeline only", devices, max_replicas=1),
            Case(scenario, "with replication", devices, max_replicas=None),
            Case(scenario, "fast -> 3 slow replicas (forced)", devices, planner=FANOUT)]


def paper_devices(rate: str, cores: float) -> tuple[DeviceRow, ...]:
    """The paper testbed's 16 boards, each CPU share proportional to its kind's speed in
    paper-testbed.toml, all together ``cores`` cores."""
    raw = tomllib.loads(PAPER_TOML.read_text())
    types = {t["name"]: t for t in raw["type"]}

    def speed(name: str) -> float:
        t = types[name]
        return float(t["gflops"]) if "gflops" in t else speed(t["reference"]) * float(t.get("speed", 1.0))

    total = sum(speed(d["type"]) for d in raw["device"])
    return tuple(DeviceRow(d["name"], d["type"], round(cores * speed(d["type"]) / total, 4), d["memory"],
                           GATEWAY_RATE if i == 0 else rate) for i, d in enumerate(raw["device"]))


def paper_cases(rate: str, budget: str, cores: float) -> list[Case]:
    devices = paper_devices(rate, cores)
    scenario = f"paper@{rate}"
    return [Case(scenario, "even split", devices, planner="even-split"),
            Case(scenario, "PipeDream-style", devices, planner="pipedream"),
            Case(scenario, "ours (pipeline, fp32)", devices),
            Case(scenario, f"ours + replicas + --max-error {budget}", devices, max_error=budget, max_replicas=None)]


def cluster_toml(case: Case, setup: Setup) -> str:
    """The planner's cluster file plus the testbed's cpu keys; each kind's GFLOPS = its CPU share of
    the calibrated core."""
    from bench_cluster import device_toml, type_toml

    kinds: dict[str, float] = {}
    for d in case.devices:
        kinds.setdefault(d.kind, d.cpu)
    # The client's own link is fast; the planner then counts the input hop at the first device's rate
    # (min of the two), which is what the testbed's shaping of that device does.
    text = (f'[cluster]\nname = "{case.scenario.replace("@", "-").replace(" ", "")}"\n'
            f'client_bandwidth = "{GATEWAY_RATE}"\n')
    text += "".join(type_toml(kind, setup.core_gflops * cpu) for kind, cpu in kinds.items())
    return text + "".join(device_toml(d.name, d.kind, d.cpu, d.memory, d.bandwidth) for d in case.devices)


# --- calibration and planning -------------------------------------------------------------------


def calibrate_int8(model: str, microbatch: int, workdir: Path) -> float:
    """GFLOPS one core sustains on ``model`` with int8 weights (the whole model quantized the way
    stages are), to set each kind's int8 speed for the planner."""
    from edgepipe.agent.device.profiler import random_feeds, time_runs
    from edgepipe.agent.formats.bundle import TensorSpec
    from edgepipe.compiler.build import candidate_cuts, load_model, spec_for
    from edgepipe.compiler.compression import cpu_session
    from edgepipe.compiler.quantize import quantize_onnx

    loaded = load_model(model)
    flops = sum(s.flops for s in spec_for(loaded, candidate_cuts(loaded)).segments)
    path = workdir / "calibrate-int8" / "model.onnx"
    if not path.is_file():
        quantize_onnx(loaded.path, path)
    session = cpu_session(path, threads=1)
    specs = [TensorSpec(i.name, "float32", tuple(d if isinstance(d, int) else "batch" for d in i.shape))
             for i in session.get_inputs()]
    feeds = random_feeds(specs, microbatch)
    return flops * microbatch / time_runs(session, feeds, repeats=3, warmup=1) / 1e9


def make_problem(case: Case, setup: Setup, cluster_path: Path) -> Any:
    import dataclasses

    from edgepipe.compiler.build import candidate_cuts, load_model, spec_for
    from edgepipe.compiler.compression import attach_to_problem
    from edgepipe.planner.cluster import cluster_from_dict, problem_for
    from edgepipe.planner.problem import Int8Speed, parse_error_budget

    loaded = load_model(setup.model)
    spec = spec_for(loaded, candidate_cuts(loaded))
    cluster = cluster_from_dict(tomllib.loads(cluster_path.read_text()), str(cluster_path))
    problem = problem_for(cluster, spec, setup.microbatch)
    ratio = setup.int8_core_gflops / setup.core_gflops
    types = tuple(dataclasses.replace(t, int8=Int8Speed(gflops=t.gflops * ratio)) if t.gflops else t
                  for t in problem.device_types)
    problem = dataclasses.replace(problem, device_types=types)
    if case.max_error is not None:
        problem = attach_to_problem(problem, setup.measurements, parse_error_budget(case.max_error))
    return problem


def plan_case(case: Case, setup: Setup, problem: Any) -> Any:
    from edgepipe.planner.baselines import all_baselines
    from edgepipe.planner.solver import solve

    if case.planner == "ours":
        return solve(problem, max_replicas=case.max_replicas)
    if case.planner == FANOUT:
        return fanout_plan(problem, setup.microbatch)
    return all_baselines(problem, setup.microbatch)[case.planner]


def fanout_plan(problem: Any, microbatch: int) -> Any:
    """The configuration replication is meant for, built by hand: the first device computes a prefix
    and fans out to every other device, which all replicate the rest. The cut balances compute only
    (the first device's prefix against the replicas' suffix shared by speed): today's cost model
    charges the first device's sends to its replicas one after another, so the solver does not pick
    this (the fan-out model is being changed on another branch); measuring it shows what it gives."""
    from edgepipe.planner.cost import Placement, make_plan

    first, rest = problem.devices[0].name, tuple(d.name for d in problem.devices[1:])
    n = len(problem.model.segments)
    best = None
    for cut in range(1, n):
        plan = make_plan(problem, microbatch, [Placement((first,), 0, cut), Placement(rest, cut, n)],
                         solver="fan-out (forced)")
        head, tail = plan.stages
        compute = max(head.compute_s, tail.compute_s / len(rest))
        if best is None or compute < best[0]:
            best = (compute, plan)
    return best[1]


# --- running a plan on the testbed --------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    throughput: float
    outputs: list[np.ndarray]
    seconds: float
    arrivals: list[float] = field(default_factory=list)  # seconds after the first result
    stages: list[dict[str, float]] = field(default_factory=list)  # per stage, from the trace records


def stage_wiring(plan: Any) -> list[dict[str, Any]]:
    """Per stage: its replica devices and weights and its output codec (plan v2; v1 plans: one
    device, raw)."""
    rows = []
    for s in plan.stages:
        replicas = getattr(s, "replicas", None)
        devices = [r.device for r in replicas] if replicas else [s.device]
        weights = [r.weight for r in replicas] if replicas else [1.0]
        rows.append({"devices": devices, "weights": weights, "codec_out": getattr(s, "codec_out", "raw"),
                     "int8_weights": bool(getattr(s, "int8_weights", False))})
    return rows


def run_plan(cluster_path: Path, bundle_dirs: list[Path], wiring: list[dict[str, Any]], batches: list[np.ndarray],
             secure: bool, workdir: Path, threads: int = 1, timeout_s: float = 900.0,
             serve_args: tuple[str, ...] = (), heartbeat_s: float | None = None) -> Run:
    """Serve every stage on each of its replica devices (data plane v2: `--next` once per downstream
    replica, `--codec` on the output hop, CurveZMQ keys unless insecure) and push ``batches`` through
    (the first one untimed)."""
    from edgepipe.agent.client import Client
    from edgepipe.agent.formats.bundle import read_manifest
    from edgepipe.agent.formats.keys import generate_keypair
    from testbed import Testbed

    keys_dir = workdir / "keys"
    devices = sorted({d for row in wiring for d in row["devices"]})
    keys = {}
    if secure:
        for name in ["client", *devices]:
            pair, public, secret = generate_keypair(keys_dir, name, overwrite=True)
            keys[name] = (pair, public, secret)
    first = read_manifest(bundle_dirs[0]).inputs[0]
    started = time.perf_counter()
    with Testbed(cluster_path, name=f"feat-{uuid.uuid4().hex[:6]}") as bed:
        procs, ready, logs = [], [], []
        for k in reversed(range(len(wiring))):
            row = wiring[k]
            for device in row["devices"]:
                ready_file = workdir / f"ready-{k}-{device}.json"
                ready_file.unlink(missing_ok=True)
                argv = [AGENT, "serve", str(Path(bundle_dirs[k]).resolve()),
                        "--listen", bed.endpoint(device, DATA_PORT), "--threads", str(threads),
                        "--ready-file", str(ready_file), "--log-level", "warning",
                        "--max-batch", str(max(len(b) for b in batches)), "--device", device,
                        "--codec", row["codec_out"] if k + 1 < len(wiring) else "raw", *serve_args]
                if heartbeat_s is not None:
                    argv += ["--heartbeat-s", f"{heartbeat_s:g}"]
                if k + 1 < len(wiring):
                    nxt = wiring[k + 1]
                    for peer, weight in zip(nxt["devices"], nxt["weights"]):
                        argv += ["--next", bed.endpoint(peer, DATA_PORT), "--next-weight", f"{weight:.6g}"]
                        if secure:
                            argv += ["--next-key", str(keys[peer][1])]
                else:
                    argv += ["--results", bed.endpoint(device, RESULTS_PORT)]
                if secure:
                    argv += ["--key", str(keys[device][2])]
                    upstream = ["client"] if k == 0 else wiring[k - 1]["devices"]
                    for peer in upstream:
                        argv += ["--allow", str(keys[peer][1])]
                    if k + 1 == len(wiring):
                        argv += ["--allow-client", str(keys["client"][1])]
                else:
                    argv.append("--insecure")
                # A log file, not a pipe: nobody reads an agent's stderr while it runs, and a full pipe
                # would block the agent in its next log call.
                log_path = workdir / f"agent-{k}-{device}.log"
                with open(log_path, "w") as log:
                    procs.append(bed.run_in(device, argv, stdout=subprocess.DEVNULL, stderr=log))
                logs.append(log_path)
                ready.append(ready_file)
        wait_ready(ready, procs, logs)
        entry = [bed.endpoint(d, DATA_PORT) for d in wiring[0]["devices"]]
        exit_ = [bed.endpoint(d, RESULTS_PORT) for d in wiring[-1]["devices"]]
        beat: dict[str, Any] = {} if heartbeat_s is None else {"heartbeat_s": heartbeat_s}
        auth: dict[str, Any] = {"insecure": True, **beat}
        if secure:
            auth = {"keypair": keys["client"][0], "entry_key": [keys[d][0].public for d in wiring[0]["devices"]],
                    "exit_key": [keys[d][0].public for d in wiring[-1]["devices"]],
                    **beat}
        # Enough in flight to keep every device busy: replicas count, not only stages.
        with Client(entry, exit_, window=2 * len(devices) + 2, **auth) as client:
            client.run({first.name: batches[0]})  # warm-up, not timed
            results = list(client.results({first.name: b} for b in batches[1:]))
    arrivals = sorted(r.received_at for r in results)
    samples = sum(len(b) for b in batches[2:])  # steady state: first result to last, all but the first's
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else float("nan")
    return Run(samples / span if span > 0 else float("nan"), [next(iter(r.outputs.values())) for r in results],
               time.perf_counter() - started, [t - arrivals[0] for t in arrivals], stage_times(results))


def stage_times(results: list[Any]) -> list[dict[str, float]]:
    """Per stage, medians over the timed results from the stages' own records (each on its own
    device's clock, so only differences within a record): waiting before compute (the input queue),
    compute, and compute end to handing the result to the next hop's socket (encode, credit)."""
    import statistics

    stages = max((len(r.trace) for r in results), default=0)
    rows = []
    for k in range(stages):
        recs = [r.trace[k] for r in results if len(r.trace) > k]
        rows.append({"queue_s": statistics.median(x.compute_start - x.recv for x in recs),
                     "compute_s": statistics.median(x.compute_end - x.compute_start for x in recs),
                     "out_s": statistics.median(x.send - x.compute_end for x in recs)})
    return rows


def wait_ready(ready_files: list[Path], procs: list[subprocess.Popen], logs: list[Path],
               timeout_s: float = 600.0) -> None:
    """Until every agent has written its ready file; an agent that exits or a timeout raises with the
    end of the agent's log (ViT-L stages on a fraction of a core take a while to load)."""
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in ready_files):
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"agent {log.stem} exited with {proc.returncode}: {log.read_text()[-500:]}")
        if time.monotonic() > deadline:
            late = [p.stem for p in ready_files if not p.exists()]
            raise RuntimeError(f"agents not ready after {timeout_s:.0f} s: {', '.join(late)}")
        time.sleep(0.2)


# --- one case end to end ------------------------------------------------------------------------


def measure_case(case: Case, setup: Setup) -> dict[str, Any]:
    from edgepipe.compiler.build import compile_model
    from edgepipe.compiler.compression import output_error
    from edgepipe.compiler.plan_check import LossyOptions
    from edgepipe.planner.problem import parse_error_budget
    from edgepipe.planner.simulate import steady_state

    work = setup.out / slug(case.scenario) / slug(case.label)
    work.mkdir(parents=True, exist_ok=True)
    cluster_path = work / "cluster.toml"
    cluster_path.write_text(cluster_toml(case, setup))
    problem = make_problem(case, setup, cluster_path)
    plan = plan_case(case, setup, problem)
    predicted = steady_state(problem, plan)
    wiring = stage_wiring(plan)
    row: dict[str, Any] = {
        "scenario": case.scenario, "label": case.label, "planner": case.planner, "max_error": case.max_error,
        "stages": len(plan.stages), "devices": sum(len(w["devices"]) for w in wiring), "wiring": wiring,
        "cuts": [s.cut_in for s in plan.stages[1:]], "fits": predicted.fits,
        "predicted_throughput": predicted.throughput,
        "predicted_error": None if getattr(plan, "predicted_error", None) is None else {
            "max_abs_diff": plan.predicted_error.max_abs_diff, "cosine": plan.predicted_error.cosine,
            "top1_agreement": plan.predicted_error.top1_agreement},
    }
    if not predicted.fits or setup.plan_only:
        return row
    lossy = LossyOptions(max_error=parse_error_budget(case.max_error), calibration_samples=setup.samples) \
        if case.max_error else None
    # Same cuts, int8 stages and codecs (a baseline at both rates, say): the same bundles and error.
    key = (setup.model, tuple(row["cuts"]), tuple(w["int8_weights"] for w in wiring),
           tuple(w["codec_out"] for w in wiring[:-1]), case.max_error)
    if key not in _BUILDS:
        _BUILDS[key] = compile_model(setup.model, work / "bundles", plan=plan, lossy=lossy)
    built = _BUILDS[key]
    row["bundles"] = str(built.out_dir)
    row["deployed_error"] = None if built.accuracy is None else built.accuracy.measured.to_dict()
    batches, expected = reference(setup, built.model_path)
    run = run_plan(cluster_path, built.bundle_dirs, wiring, batches, setup.secure, work,
                   serve_args=setup.extra.get("serve_args", ()), heartbeat_s=setup.heartbeat_s)
    row["false_downs"] = count_declared_down(work)
    measured = output_error(expected, [np.concatenate(run.outputs)], classifier=True)
    row.update({"measured_throughput": run.throughput,
                "prediction_error_pct": 100.0 * (row["predicted_throughput"] - run.throughput) / run.throughput,
                "measured_error": measured.to_dict(), "run_seconds": run.seconds, "arrivals_s": run.arrivals,
                "second_half_throughput": second_half(run.arrivals, setup.microbatch),
                "predicted_stages": [{"compute_s": s.compute_s, "send_s": s.send_s, "time_s": s.time_s}
                                     for s in plan.stages],
                "measured_stages": run.stages})
    return row


def count_declared_down(work: Path) -> int:
    """Neighbours the agents declared down during the run (all were alive: a busy slow link delays
    heartbeats past the silence limit; downstream ones move messages to other replicas)."""
    return sum(log.read_text(errors="replace").count("declared down") for log in work.glob("agent-*.log"))


def second_half(arrivals: list[float], microbatch: int) -> float:
    """Throughput over the later half of the results only: a check that the pipeline (replicas
    included) had reached its steady state, which first-to-last averages over."""
    half = arrivals[len(arrivals) // 2:]
    span = half[-1] - half[0] if len(half) > 1 else 0.0
    return (len(half) - 1) * microbatch / span if span > 0 else float("nan")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


_REFERENCE: dict[tuple, tuple[list[np.ndarray], list[np.ndarray]]] = {}
_BUILDS: dict[tuple, Any] = {}  # compile results by what they contain


def reference(setup: Setup, model_path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The batches every case runs (one warm-up + count) and the whole fp32 model's outputs for the
    timed ones, computed once."""
    from edgepipe.compiler.compression import cpu_session

    key = (str(model_path), setup.microbatch, setup.count)
    if key not in _REFERENCE:
        whole = cpu_session(model_path, threads=os.cpu_count() or 2)
        node = whole.get_inputs()[0]
        rng = np.random.default_rng(0)
        batches = [rng.standard_normal((setup.microbatch, *node.shape[1:])).astype(np.float32)
                   for _ in range(setup.count + 1)]
        outputs = [whole.run(None, {node.name: b})[0] for b in batches[1:]]
        _REFERENCE[key] = (batches, [np.concatenate(outputs)])
    batches, (stacked,) = _REFERENCE[key]
    return batches, [stacked]


def run_cases(cases: list[Case], setup: Setup) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        console.print(f"[bold]{case.scenario}[/bold]: {case.label} ...", highlight=False)
        try:
            rows.append(measure_case(case, setup))
        except Exception as exc:  # one failing configuration must not lose the others' results
            rows.append({"scenario": case.scenario, "label": case.label, "failed": f"{type(exc).__name__}: {exc}"})
            console.print(f"[red]failed:[/red] {exc}", highlight=False)
    return rows


# --- report -------------------------------------------------------------------------------------

TARGETS = [("compress@5 Mbps", "compressed", "fp32", 2.0), ("replicate@5 Mbps", "with", "pipeline", 1.3),
           ("replicate@5 Mbps", "fast ->", "pipeline", 1.3), ("paper@5 Mbps", "ours +", "PipeDream", 4.16),
           ("paper@1 Gbps", "ours +", "PipeDream", 4.16)]


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario with a target: the new feature's throughput over its comparison's."""
    found = []
    for scenario, new, old, target in TARGETS:
        pick = [r for r in rows if r.get("scenario") == scenario]
        a = next((r for r in pick if r["label"].startswith(new)), None)
        b = next((r for r in pick if r["label"].startswith(old)), None)
        if not a or not b:
            continue
        key = "measured_throughput" if "measured_throughput" in a and "measured_throughput" in b \
            else "predicted_throughput"
        ratio = a.get(key, float("nan")) / b.get(key, float("nan")) if b.get(key) else float("nan")
        found.append({"scenario": scenario, "new": a["label"], "old": b["label"], "basis": key.split("_")[0],
                      "ratio": ratio, "target": target, "met": bool(ratio >= target)})
    return found


def print_rows(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Issue 13 features on the emulated testbed (samples/s; error of the logits vs fp32)")
    for col in ("scenario", "configuration", "stages", "devices", "hops", "int8 stages", "predicted", "measured",
                "max|Δ|", "cosine", "top-1"):
        table.add_column(col, justify="left" if col in ("scenario", "configuration", "hops") else "right")
    for r in rows:
        if "failed" in r:
            table.add_row(r["scenario"], r["label"], *["-"] * 8, r["failed"][:40])
            continue
        wiring = r.get("wiring", [])
        error = r.get("measured_error") or r.get("deployed_error") or {}
        table.add_row(
            r["scenario"], r["label"], str(r["stages"]), str(r["devices"]),
            ",".join(w["codec_out"] for w in wiring[:-1]) or "-",
            str(sum(w["int8_weights"] for w in wiring)),
            f"{r['predicted_throughput']:.3f}" if r.get("fits") else "does not fit",
            f"{r['measured_throughput']:.3f}" if "measured_throughput" in r else "-",
            f"{error['max_abs_diff']:.3g}" if error else "-", f"{error['cosine']:.6f}" if error else "-",
            f"{error['top1_agreement']:.0%}" if error and error.get("top1_agreement") is not None else "-")
    console.print(table)
    for s in speedups(rows):
        verdict = "[green]met[/green]" if s["met"] else "[red]not met[/red]"
        console.print(f"{s['scenario']}: {s['new']} / {s['old']} = {s['ratio']:.2f}x ({s['basis']}; target "
                      f">= {s['target']}x) {verdict}", highlight=False)


# --- commands -----------------------------------------------------------------------------------


def make_setup(model: str, microbatch: int, count: int, out: Path, samples: int, secure: bool, plan_only: bool,
               budgets: bool, calibration_from: Path | None = None) -> Setup:
    import emulate
    from bench_cluster import calibrate
    from edgepipe.compiler.build import candidate_cuts, load_model
    from edgepipe.compiler.calibration import registry_calibration
    from edgepipe.compiler.compression import measure_lossy

    RESULTS.update({"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                    "load_average_before": os.getloadavg(), "machine": machine()})
    if not plan_only:
        problem = emulate.host_problem()
        if problem:
            console.print(f"error: {problem} (or use --plan-only)")
            raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    if calibration_from is not None:  # an earlier run's speeds: predictions comparable with that run's
        earlier = json.loads(calibration_from.read_text())
        if earlier.get("model") != model or earlier.get("microbatch") != microbatch:
            console.print(f"error: {calibration_from} calibrated {earlier.get('model')} at microbatch "
                          f"{earlier.get('microbatch')}, not {model} at {microbatch}")
            raise typer.Exit(2)
        core, core_int8 = float(earlier["core_gflops"]), float(earlier["int8_core_gflops"])
    else:
        console.print(f"calibrating {model} on one core (fp32 and int8 weights) ...")
        core, core_int8 = calibrate(model, microbatch), calibrate_int8(model, microbatch, out)
    measurements = None
    if budgets:
        console.print("measuring each cut's codecs and each segment's int8 weights (cached) ...")
        loaded = load_model(model)
        measurements = measure_lossy(loaded.model, candidate_cuts(loaded), registry_calibration(model, samples),
                                     loaded.identity.model_sha256)
    return Setup(model, microbatch, count, out, core, core_int8, samples, secure, plan_only, measurements)


def machine() -> dict[str, Any]:
    import platform

    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


def _finish(setup: Setup, rows: list[dict[str, Any]], as_json: Path | None) -> None:
    print_rows(rows)
    RESULTS.update({"model": setup.model, "microbatch": setup.microbatch, "count": setup.count,
                    "core_gflops": setup.core_gflops, "int8_core_gflops": setup.int8_core_gflops,
                    "secure": setup.secure, "plan_only": setup.plan_only, "rows": rows, "speedups": speedups(rows),
                    "heartbeat_s": setup.heartbeat_s, "load_average_after": os.getloadavg(),
                    "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())})
    if as_json is not None:
        as_json.parent.mkdir(parents=True, exist_ok=True)
        as_json.write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
        console.print(f"results written to {as_json}")


ModelOpt = Annotated[str, typer.Option(help="Registry model (ViT-L by the issue; vit_base_patch16_224 is faster).")]
MbOpt = Annotated[int, typer.Option(help="Samples per microbatch.")]
CountOpt = Annotated[int, typer.Option(help="Microbatches measured per configuration (after one warm-up).")]
OutOpt = Annotated[Path, typer.Option(help="Build directory.")]
BudgetOpt = Annotated[str, typer.Option(help="--max-error for the plans that may be lossy.")]
SamplesOpt = Annotated[int, typer.Option(help="Calibration samples for measured errors.")]
SecureOpt = Annotated[bool, typer.Option("--secure/--insecure", help="CurveZMQ on every hop (the default).")]
PlanOnlyOpt = Annotated[bool, typer.Option("--plan-only", help="Plan and predict; build and run nothing.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results here.")]
CoresOpt = Annotated[float, typer.Option(help="Cores shared out among the devices (the machine's by default).")]


@app.command("compress")
def compress_cmd(model: ModelOpt = LARGE, microbatch: MbOpt = 1, count: CountOpt = 6,
                 out: OutOpt = Path("build/bench-features"), budget: BudgetOpt = DEFAULT_BUDGET,
                 samples: SamplesOpt = 8, secure: SecureOpt = True, plan_only: PlanOnlyOpt = False,
                 as_json: JsonOpt = None,
                 credit: Annotated[int | None, typer.Option(help="serve --credit for every stage (messages "
                                                                  "in flight per upstream peer).")] = None) -> None:
    """fp32 plan vs the planner's compressed plan, 4 devices at 5 and 20 Mbps."""
    setup = make_setup(model, microbatch, count, out, samples, secure, plan_only, budgets=True)
    if credit is not None:
        setup = dataclasses.replace(setup, extra={**setup.extra, "serve_args": ("--credit", str(credit))})
        RESULTS["credit"] = credit
    _finish(setup, run_cases(compress_cases("5 Mbps", budget) + compress_cases("20 Mbps", budget), setup), as_json)


@app.command("replicate")
def replicate_cmd(model: ModelOpt = LARGE, microbatch: MbOpt = 1, count: CountOpt = 6,
                  out: OutOpt = Path("build/bench-features"), slow_rate: str = "5 Mbps", samples: SamplesOpt = 8,
                  secure: SecureOpt = True, plan_only: PlanOnlyOpt = False, as_json: JsonOpt = None) -> None:
    """1 fast + 3 identical slow devices: pipeline-only vs replicated."""
    setup = make_setup(model, microbatch, count, out, samples, secure, plan_only, budgets=False)
    _finish(setup, run_cases(replicate_cases(slow_rate), setup), as_json)


@app.command("paper")
def paper_cmd(model: ModelOpt = LARGE, microbatch: MbOpt = 1, count: CountOpt = 4,
              out: OutOpt = Path("build/bench-features"), budget: BudgetOpt = DEFAULT_BUDGET, samples: SamplesOpt = 8,
              cores: CoresOpt = float(os.cpu_count() or 2), secure: SecureOpt = True,
              plan_only: PlanOnlyOpt = False, as_json: JsonOpt = None) -> None:
    """The paper-like 16-device mix at 1 Gbps and 5 Mbps: ours without/with features vs baselines."""
    setup = make_setup(model, microbatch, count, out, samples, secure, plan_only, budgets=True)
    _finish(setup, run_cases(paper_cases("1 Gbps", budget, cores) + paper_cases("5 Mbps", budget, cores), setup),
            as_json)


@app.command("all")
def all_cmd(model: ModelOpt = LARGE, microbatch: MbOpt = 1, count: CountOpt = 4,
            out: OutOpt = Path("build/bench-features"), budget: BudgetOpt = DEFAULT_BUDGET, samples: SamplesOpt = 8,
            cores: CoresOpt = float(os.cpu_count() or 2), secure: SecureOpt = True, plan_only: PlanOnlyOpt = False,
            as_json: JsonOpt = None,
            calibration_from: Annotated[Path | None, typer.Option(
                help="With --plan-only: take the device speeds from an earlier run's --json instead of "
                     "calibrating (predictions comparable with that run's; nothing is measured).")] = None,
            heartbeat_s: Annotated[float | None, typer.Option(
                help="--heartbeat-s for every agent and the client (a neighbour silent for 3 intervals is "
                     "declared down); default: the agent's.")] = None,
            only: Annotated[list[str] | None, typer.Option(
                help="Only configurations whose 'scenario: label' contains this text (repeatable), e.g. "
                     "--only replicate --only 'paper@5 Mbps: ours +'.")] = None) -> None:
    """compress, replicate and paper in one run (one calibration)."""
    if calibration_from is not None and not plan_only:
        console.print("error: --calibration-from needs --plan-only (a measured run calibrates on this machine)")
        raise typer.Exit(2)
    setup = make_setup(model, microbatch, count, out, samples, secure, plan_only, budgets=True,
                       calibration_from=calibration_from)
    setup = dataclasses.replace(setup, heartbeat_s=heartbeat_s)
    cases = (compress_cases("5 Mbps", budget) + compress_cases("20 Mbps", budget) + replicate_cases("5 Mbps")
             + paper_cases("1 Gbps", budget, cores) + paper_cases("5 Mbps", budget, cores))
    if only:
        cases = [c for c in cases if any(o.lower() in f"{c.scenario}: {c.label}".lower() for o in only)]
    _finish(setup, run_cases(cases, setup), as_json)


if __name__ == "__main__":
    app()
