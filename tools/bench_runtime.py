"""Benchmark the runtime: per-hop overhead against raw pyzmq and with/without CurveZMQ, 2-stage
pipeline efficiency, and what CurveZMQ costs a pipeline on a 1 Gbps testbed link.

1. Per-hop overhead. Three chains of N processes run side by side, messages alternating between
   them in blocks: agents serving an identity stage (y = x + 0) with CurveZMQ (the default), the
   same agents in plaintext (--insecure), and raw pyzmq relays (PULL/PUSH, recv_multipart/
   send_multipart with copy=False, nothing else), on ViT-sized activations (197x768 and 257x1280
   float32: 0.6 and 1.3 MB). One message in flight; medians of the round trip. Reported per hop:
     - inside the agent, outside ONNX Runtime: (send - recv) - compute, from the agents' traces;
     - added over raw pyzmq: (agent round trip - ONNX Runtime time - raw round trip) / N;
     - CurveZMQ: (secure round trip - plaintext round trip) / (N + 1 links).
2. Pipeline efficiency. The model compiled into 2 stages, served by 2 agents with one ONNX Runtime
   thread each, against the ideal on 2 cores: two single-thread processes each running the whole
   model at the same time (their summed throughput). Rounds alternate ideal and pipeline. The
   headline is steady state (first to last completion); "with fill" counts from the first send, so
   a 2-stage pipeline of n microbatches can reach at most n / (n + 1) of it.

3. CurveZMQ on a link (needs root: tools/testbed.py). The model compiled into 2 stages served on 2
   emulated devices joined by 1 Gbps links, rounds alternating secure and plaintext pipelines;
   throughput in steady state, and the ratio (target: secure within 3% of plaintext).

    .venv/bin/python tools/bench_runtime.py                          # all parts, ViT-B, prints tables
    .venv/bin/python tools/bench_runtime.py --only hop --json out.json
    .venv/bin/python tools/bench_runtime.py --only efficiency --model vit_small_patch16_224
    .venv/bin/python tools/bench_runtime.py --only hop,testbed --rounds 3    # CurveZMQ's cost, side by side
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer
import zmq
from edgepipe.agent.client import Client
from edgepipe.agent.local import LocalPipeline, stop_processes
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)

SIZES = {"0.6 MB 197x768": (197, 768), "1.3 MB 257x1280": (257, 1280)}  # ViT-B, ViT-H activations


def machine() -> dict[str, Any]:
    import onnxruntime

    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "load_avg_at_start": os.getloadavg()}


# ---- bundles ----------------------------------------------------------------------------------

def identity_bundles(root: Path, stages: int, shape: tuple[int, ...]) -> list[Path]:
    """``stages`` bundles computing y = x + 0 on float32 [batch, *shape] (dev-machine helper: uses onnx)."""
    import onnx
    from edgepipe.agent.formats.bundle import (
        DATA_NAME,
        GRAPH_NAME,
        StageManifest,
        TensorSpec,
        file_entries,
        write_manifest,
    )
    from onnx import TensorProto, helper, numpy_helper

    dirs = []
    for k in range(stages):
        out = root / f"stage-{k}"
        out.mkdir(parents=True, exist_ok=True)
        dims = ["batch", *shape]
        graph = helper.make_graph(
            [helper.make_node("Add", [f"t{k}", "zero"], [f"t{k + 1}"])], f"identity{k}",
            [helper.make_tensor_value_info(f"t{k}", TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info(f"t{k + 1}", TensorProto.FLOAT, dims)],
            initializer=[numpy_helper.from_array(np.zeros((1,), np.float32), "zero")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save_model(model, str(out / GRAPH_NAME), save_as_external_data=True, location=DATA_NAME,
                        size_threshold=0)
        spec_in = TensorSpec(f"t{k}", "float32", ("batch", *shape))
        spec_out = TensorSpec(f"t{k + 1}", "float32", ("batch", *shape))
        write_manifest(out, StageManifest(
            model_id="identity", model_sha256="0" * 64, stage_index=k, stage_count=stages,
            inputs=(spec_in,), outputs=(spec_out,),
            files=file_entries(out, [GRAPH_NAME, DATA_NAME]), cut_in=None, cut_out=None, weight_bytes=4))
        dirs.append(out)
    return dirs


# ---- raw pyzmq relay chain ----------------------------------------------------------------------

def relay(listen: str, next_: str | None, results: str | None, ready: Path) -> None:
    """Runs in a child process: forward every message unchanged, as cheaply as pyzmq allows."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 2)
    pull.bind(listen)
    if next_:
        out = ctx.socket(zmq.PUSH)
        out.setsockopt(zmq.SNDHWM, 2)
        out.connect(next_)
    else:
        out = ctx.socket(zmq.ROUTER)
        out.setsockopt(zmq.SNDHWM, 2)
        out.setsockopt(zmq.ROUTER_MANDATORY, 1)  # block at the HWM instead of dropping silently
        out.bind(results)
    info = {"listen": pull.getsockopt(zmq.LAST_ENDPOINT).decode(),
            "results": out.getsockopt(zmq.LAST_ENDPOINT).decode() if not next_ else None}
    Path(f"{ready}.tmp").write_text(json.dumps(info))
    Path(f"{ready}.tmp").replace(ready)
    parent = os.getppid()
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    while True:
        if not poller.poll(500):
            if os.getppid() != parent:
                return  # the benchmark died; do not linger
            continue
        frames = pull.recv_multipart(copy=False)
        if next_:
            out.send_multipart(frames, copy=False)
        else:
            out.send_multipart([b"bench", *frames], copy=False)


def start_relays(n: int, tmp: Path) -> tuple[list[subprocess.Popen], str, str]:
    procs: list[subprocess.Popen] = []
    next_: str | None = None
    results = ""
    try:
        for k in reversed(range(n)):
            ready = tmp / f"relay-{k}.json"
            cmd = [sys.executable, __file__, "--role", "relay", "--relay-listen", "tcp://127.0.0.1:0",
                   "--relay-ready", str(ready)]
            cmd += ["--relay-next", next_] if next_ else ["--relay-results", "tcp://127.0.0.1:0"]
            procs.insert(0, subprocess.Popen(cmd))
            deadline = time.monotonic() + 30
            while not ready.exists():
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"relay {k} did not start")
                time.sleep(0.02)
            info = json.loads(ready.read_text())
            next_ = info["listen"]
            results = info["results"] or results
    except BaseException:
        stop_processes(procs)
        raise
    assert next_ is not None
    return procs, next_, results


def raw_round_trips(push: zmq.Socket, dealer: zmq.Socket, x: np.ndarray, count: int) -> list[float]:
    import msgpack

    times = []
    for i in range(count):
        header = msgpack.packb({"seq": i, "tensors": [["x", "float32", list(x.shape)]]})
        start = time.perf_counter()
        push.send_multipart([header, x], copy=False)
        if not dealer.poll(10000):
            raise RuntimeError("raw relay chain lost a message")
        dealer.recv_multipart(copy=False)
        times.append(time.perf_counter() - start)
    return times


def agent_round_trips(client: Client, x: np.ndarray, count: int) -> list[dict[str, float]]:
    """Per request: round trip, ONNX Runtime time (all stages), time inside agents outside ORT (per
    stage) and transfer time per link (client -> stage 0 -> ... -> client; one clock, one machine)."""
    rows = []
    for _ in range(count):
        sent_wall, start = time.time(), time.perf_counter()
        result = client.result(client.submit(x))
        elapsed, done_wall = time.perf_counter() - start, time.time()
        trace = result.trace
        hops_between = (b.recv - a.send for a, b in itertools.pairwise(trace))
        links = [trace[0].recv - sent_wall, *hops_between,
                 done_wall - trace[-1].send]
        rows.append({"round_trip": elapsed, "ort": sum(r.compute_s for r in trace),
                     "outside": float(np.mean([r.overhead_s for r in trace])), "link": float(np.mean(links))})
    return rows


def bench_hops(hops: int, count: int, blocks: int = 4, warmup: int = 20) -> list[dict[str, Any]]:
    """Raw relays, secure agents and plaintext agents all run at once; blocks of ``count / blocks``
    messages alternate between them so that all three see the same machine load."""
    rows = []
    per_block = max(1, count // blocks)
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for label, shape in SIZES.items():
            x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
            (tmp / f"relays-{shape[1]}").mkdir()
            bundles = identity_bundles(tmp / f"identity-{shape[1]}", hops, shape)
            procs, entry, exit_ = start_relays(hops, tmp / f"relays-{shape[1]}")
            ctx = zmq.Context()
            push, dealer = ctx.socket(zmq.PUSH), ctx.socket(zmq.DEALER)
            try:
                push.setsockopt(zmq.SNDHWM, 2)
                dealer.setsockopt(zmq.ROUTING_ID, b"bench")
                dealer.connect(exit_)
                push.connect(entry)
                time.sleep(0.3)  # the relay's ROUTER drops messages for a client it does not know yet
                logs = tmp / f"logs-{shape[1]}"
                with LocalPipeline(bundles, max_batch=1, log_dir=logs / "curve") as secure, \
                        LocalPipeline(bundles, max_batch=1, log_dir=logs / "plain", insecure=True) as plain, \
                        secure.client(window=1) as curve_client, plain.client(window=1) as plain_client:
                    raw_round_trips(push, dealer, x, warmup)
                    agent_round_trips(curve_client, x, warmup)
                    agent_round_trips(plain_client, x, warmup)
                    raw: list[float] = []
                    agent: list[dict[str, float]] = []
                    clear: list[dict[str, float]] = []
                    for _ in range(blocks):
                        raw += raw_round_trips(push, dealer, x, per_block)
                        agent += agent_round_trips(curve_client, x, per_block)
                        clear += agent_round_trips(plain_client, x, per_block)
            finally:
                push.close(0)
                dealer.close(0)
                ctx.term()
                stop_processes(procs)
            med = {k: float(np.median([a[k] for a in agent])) * 1000 for k in agent[0]}
            med_plain = {k: float(np.median([a[k] for a in clear])) * 1000 for k in clear[0]}
            raw_ms = float(np.median(raw)) * 1000
            rows.append({
                "activation": label, "bytes": x.nbytes, "hops": hops, "messages": len(raw),
                "raw_round_trip_ms": raw_ms, "raw_per_link_ms": raw_ms / (hops + 1),
                "agent_round_trip_ms": med["round_trip"], "ort_ms": med["ort"],
                "outside_ort_per_hop_ms": med["outside"], "agent_per_link_ms": med["link"],
                "added_vs_raw_per_hop_ms": (med["round_trip"] - med["ort"] - raw_ms) / hops,
                "plain_round_trip_ms": med_plain["round_trip"], "plain_per_link_ms": med_plain["link"],
                "plain_outside_ort_per_hop_ms": med_plain["outside"],
                "curve_per_link_ms": (med["round_trip"] - med_plain["round_trip"]) / (hops + 1),
                "curve_link_ratio": med["link"] / med_plain["link"] if med_plain["link"] > 0 else float("nan"),
            })
    return rows


def bench_testbed(model: str, batch: int, count: int, rounds: int, bandwidth: str, cpu: float) -> dict[str, Any]:
    """Secure vs plaintext pipeline throughput over emulated links of ``bandwidth`` (tools/testbed.py)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from edgepipe.compiler.build import compile_model
    from testbed_pipeline import run_on_testbed

    out = Path("build") / f"bench-runtime-{model}-2"
    build = compile_model(model, out, stages=2)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((batch, 3, 224, 224)).astype(np.float32) for _ in range(count + 1)]
    secure, plain, compute = [], [], []
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-tb-") as tmp:
        cluster = Path(tmp) / "cluster.toml"
        devices = "".join(f'\n[[device]]\nname = "d{i}"\ntype = "board"\nmemory = "4 GiB"\n'
                          f'bandwidth = "{bandwidth}"\ncpu = {cpu}\n' for i in range(2))
        cluster.write_text(f'[cluster]\nname = "curve"\n\n[[type]]\nname = "board"\ngflops = 10.0\n{devices}')
        for r in range(rounds):
            for label, runs in (("secure", secure), ("plaintext", plain)):
                console.print(f"round {r + 1}/{rounds}: {label} pipeline on 2 devices, {bandwidth}")
                run = run_on_testbed(cluster, build.bundle_dirs, ["d0", "d1"], batches, workdir=Path(tmp),
                                     secure=label == "secure")
                runs.append(run.throughput)
                compute.append(run.stage_compute_s)
    per_round = [s / p for s, p in zip(secure, plain, strict=True)]
    return {"model": model, "microbatch": batch, "microbatches": count, "rounds": rounds, "bandwidth": bandwidth,
            "device_cpu": cpu, "secure_samples_s": float(np.median(secure)),
            "plaintext_samples_s": float(np.median(plain)), "secure_over_plaintext": float(np.median(per_round)),
            "secure_per_round": secure, "plaintext_per_round": plain, "ratio_per_round": per_round,
            "activation_bytes_per_microbatch": batch * 197 * 768 * 4,
            "stage_compute_ms": [1000 * float(np.median([c[k] for c in compute])) for k in range(2)],
            "bottleneck_busy": float(np.median(secure + plain)) * max(float(np.median([c[k] for c in compute]))
                                                                      for k in range(2)) / batch}


# ---- pipeline efficiency ------------------------------------------------------------------------

def whole_worker(model: str, batch: int, count: int, warmup: int, cpu: int | None) -> None:
    """Runs in a child process: load the whole model single-threaded, wait for "go" on stdin, run."""
    from edgepipe.agent.device.session import session_options

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    import onnxruntime as ort

    session = ort.InferenceSession(model, sess_options=session_options(1), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    for _ in range(warmup):
        session.run(None, {name: x})
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    done = []
    for _ in range(count):
        session.run(None, {name: x})
        done.append(time.perf_counter())
    runs = np.diff([start, *done])
    print(json.dumps({"wall_s": done[-1] - start, "steady_s": done[-1] - done[0],
                      "run_s": float(np.median(runs))}), flush=True)


def whole_model_processes(model_path: Path, batch: int, count: int, processes: int, pin: bool
                          ) -> dict[str, float]:
    """``processes`` single-thread processes running the whole model at the same time. Returns summed
    samples/s over the whole run and in steady state (first to last completion), and the median
    time of one run."""
    procs = []
    try:
        for k in range(processes):
            cmd = [sys.executable, __file__, "--role", "whole", "--whole-model", str(model_path),
                   "--batch", str(batch), "--count", str(count)]
            if pin:
                cmd += ["--whole-cpu", str(k)]
            procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("whole-model worker failed to start")
        for p in procs:  # all start together
            p.stdin.write("go\n")
            p.stdin.flush()
        times = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        stop_processes(procs)
    return {"samples_s": sum(batch * count / t["wall_s"] for t in times),
            "steady_samples_s": sum(batch * (count - 1) / t["steady_s"] for t in times),
            "run_s": float(np.median([t["run_s"] for t in times]))}


def pipeline_throughput(bundles: list[Path], batch: int, count: int, pin: bool, log_dir: Path
                        ) -> dict[str, Any]:
    """Samples/s over the whole run (pipeline fill included) and in steady state (first to last
    completion), and the median ONNX Runtime time of each stage."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
    cpus = ["0", "1"] if pin else None
    with LocalPipeline(bundles, threads=1, cpus=cpus, max_batch=max(batch, 1), log_dir=log_dir) as pipe, \
            pipe.client(window=4, timeout_s=600) as client:
        for _ in client.map([x] * 2):  # warm-up: fills caches, first-run allocations
            pass
        start = time.perf_counter()
        results, done = [], []
        for result in client.results([x] * count):
            results.append(result)
            done.append(time.perf_counter())
    return {"samples_s": batch * count / (done[-1] - start),
            "steady_samples_s": batch * (count - 1) / (done[-1] - done[0]),
            "stage_s": [float(np.median([r.trace[k].compute_s for r in results]))
                        for k in range(len(bundles))]}


def bench_efficiency(model: str, batch: int, count: int, rounds: int, pin: bool) -> dict[str, Any]:
    from edgepipe.compiler.build import compile_model

    out = Path("build") / f"bench-runtime-{model}-2"
    console.print(f"compiling {model} into 2 stages -> {out}")
    build = compile_model(model, out, stages=2)
    ideal, alone, pipe = [], [], []
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        for r in range(rounds):
            console.print(f"round {r + 1}/{rounds}: ideal (2 whole-model processes at once)")
            ideal.append(whole_model_processes(build.model_path, batch, count, 2, pin))
            console.print(f"round {r + 1}/{rounds}: 2-stage pipeline")
            pipe.append(pipeline_throughput(build.bundle_dirs, batch, count, pin, Path(tmp) / f"logs-{r}"))
            console.print(f"round {r + 1}/{rounds}: one whole-model process alone")
            alone.append(whole_model_processes(build.model_path, batch, max(2, count // 2), 1, pin))

    def med(values: list[float]) -> float:
        return float(np.median(values))

    per_round = [p["steady_samples_s"] / i["steady_samples_s"] for p, i in zip(pipe, ideal, strict=True)]
    stage_s = [med([p["stage_s"][k] for p in pipe]) for k in range(2)]
    pipeline_tp = med([p["steady_samples_s"] for p in pipe])
    return {
        "model": model, "microbatch": batch, "microbatches": count, "rounds": rounds, "pinned": pin,
        "ideal_samples_s": med([i["steady_samples_s"] for i in ideal]),
        "pipeline_samples_s": pipeline_tp,
        "efficiency": med(per_round), "efficiency_per_round": per_round,
        "ideal_samples_s_per_round": [i["steady_samples_s"] for i in ideal],
        "pipeline_samples_s_per_round": [p["steady_samples_s"] for p in pipe],
        "stage_compute_ms_per_round": [[1000 * v for v in p["stage_s"]] for p in pipe],
        "efficiency_with_fill": med([p["samples_s"] / i["samples_s"]
                                     for p, i in zip(pipe, ideal, strict=True)]),
        "twice_alone_samples_s": 2 * med([a["steady_samples_s"] for a in alone]),
        "efficiency_vs_twice_alone": pipeline_tp / (2 * med([a["steady_samples_s"] for a in alone])),
        "whole_run_ms_concurrent": 1000 * med([i["run_s"] for i in ideal]),
        "whole_run_ms_alone": 1000 * med([a["run_s"] for a in alone]),
        "stage_compute_ms": [1000 * v for v in stage_s],
        "bottleneck_busy": pipeline_tp * max(stage_s) / batch,
        "balance_bound": sum(stage_s) / (2 * max(stage_s)),
    }


# ---- CLI ----------------------------------------------------------------------------------------

def print_hops(rows: list[dict[str, Any]]) -> None:
    first = rows[0]
    table = Table(title=f"Per-hop overhead, {first['hops']} hops, medians of {first['messages']} messages per chain")
    for col in ("activation", "raw pyzmq round trip", "agents round trip: CURVE / plaintext", "ONNX Runtime",
                "in agent, outside ORT, per hop: CURVE / plain", "per link: raw / plain / CURVE",
                "CURVE per link", "added vs raw per hop"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["activation"], f"{r['raw_round_trip_ms']:.2f} ms",
                      f"{r['agent_round_trip_ms']:.2f} / {r['plain_round_trip_ms']:.2f} ms", f"{r['ort_ms']:.2f} ms",
                      f"{r['outside_ort_per_hop_ms']:.3f} / {r['plain_outside_ort_per_hop_ms']:.3f} ms",
                      f"{r['raw_per_link_ms']:.2f} / {r['plain_per_link_ms']:.2f} / {r['agent_per_link_ms']:.2f} ms",
                      f"+{r['curve_per_link_ms']:.2f} ms ({r['curve_link_ratio']:.1f}x)",
                      f"{r['added_vs_raw_per_hop_ms']:.3f} ms")
    Console().print(table)


def print_testbed(e: dict[str, Any]) -> None:
    table = Table(title=f"CurveZMQ on a {e['bandwidth']} link: {e['model']}, 2 stages on 2 emulated devices "
                        f"({e['device_cpu']} CPU each), {e['microbatches']} microbatches of {e['microbatch']}, "
                        f"{e['rounds']} rounds (medians)")
    for col in ("", "samples/s", "per round"):
        table.add_column(col, justify="right")
    table.add_row("plaintext (--insecure)", f"{e['plaintext_samples_s']:.3f}",
                  ", ".join(f"{v:.3f}" for v in e["plaintext_per_round"]))
    table.add_row("CurveZMQ (default)", f"{e['secure_samples_s']:.3f}",
                  ", ".join(f"{v:.3f}" for v in e["secure_per_round"]))
    table.add_row("secure / plaintext", f"{e['secure_over_plaintext']:.1%}",
                  ", ".join(f"{v:.1%}" for v in e["ratio_per_round"]))
    Console().print(table)
    stages = " / ".join(f"{v:.0f}" for v in e["stage_compute_ms"])
    busy = e["bottleneck_busy"]
    Console().print(f"stage compute per microbatch (median): {stages} ms; slowest stage busy {busy:.0%}")


def print_efficiency(e: dict[str, Any]) -> None:
    title = (f"Pipeline efficiency, {e['model']}, {e['microbatches']} microbatches of {e['microbatch']}, "
             f"{e['rounds']} rounds (medians)")
    table = Table(title=title)
    table.add_column("")
    table.add_column("samples/s", justify="right")
    table.add_column("pipeline / this", justify="right")
    rounds = ", ".join(f"{v:.0%}" for v in e["efficiency_per_round"])
    table.add_row("ideal: 2 whole-model processes at once, 1 thread each", f"{e['ideal_samples_s']:.3f}",
                  f"{e['efficiency']:.1%} (rounds: {rounds}; with fill {e['efficiency_with_fill']:.1%})")
    table.add_row("2 x one whole-model process alone", f"{e['twice_alone_samples_s']:.3f}",
                  f"{e['efficiency_vs_twice_alone']:.1%}")
    table.add_row("pipeline: 2 agents, 1 thread each", f"{e['pipeline_samples_s']:.3f}", "")
    Console().print(table)
    pairs = ", ".join(f"{p:.2f}/{i:.2f}" for p, i in zip(e["pipeline_samples_s_per_round"],
                                                       e["ideal_samples_s_per_round"], strict=True))
    Console().print(f"per round, pipeline/ideal samples/s: {pairs}")
    stages = " / ".join(f"{v:.0f}" for v in e["stage_compute_ms"])
    Console().print(f"whole model per microbatch: {e['whole_run_ms_alone']:.0f} ms alone, "
                    f"{e['whole_run_ms_concurrent']:.0f} ms with the other core busy; pipeline stages "
                    f"{stages} ms; bottleneck stage busy {e['bottleneck_busy']:.1%}; "
                    f"balance bound {e['balance_bound']:.1%}")


@app.command()
def main(
    only: str | None = typer.Option(None, "--only", help="Run only these parts (comma-separated): hop, efficiency, "
                                    "testbed."),
    bandwidth: str = typer.Option("1 Gbps", "--bandwidth", help="Link rate for the testbed part."),
    device_cpu: float = typer.Option(0.9, "--device-cpu", help="CPU share of each emulated device (testbed part)."),
    hops: int = typer.Option(3, "--hops", min=1, help="Agents (and raw relays) in the overhead chain."),
    messages: int = typer.Option(200, "--messages", min=10, help="Messages per overhead measurement."),
    model: str = typer.Option("vit_base_patch16_224", "--model", help="Model for the efficiency part."),
    batch: int = typer.Option(4, "--batch", min=1, help="Microbatch for the efficiency part."),
    count: int = typer.Option(16, "--count", min=2, help="Microbatches per efficiency measurement."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Alternating ideal/pipeline rounds."),
    pin: bool = typer.Option(False, "--pin", help="Pin each agent / worker to its own CPU."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    role: str | None = typer.Option(None, "--role", hidden=True),
    relay_listen: str | None = typer.Option(None, "--relay-listen", hidden=True),
    relay_next: str | None = typer.Option(None, "--relay-next", hidden=True),
    relay_results: str | None = typer.Option(None, "--relay-results", hidden=True),
    relay_ready: Path | None = typer.Option(None, "--relay-ready", hidden=True),
    whole_model: str | None = typer.Option(None, "--whole-model", hidden=True),
    whole_cpu: int | None = typer.Option(None, "--whole-cpu", hidden=True),
) -> None:
    """Measure per-hop runtime overhead vs raw pyzmq, and 2-stage pipeline efficiency vs the ideal.

    Example: .venv/bin/python tools/bench_runtime.py --json build/bench-runtime.json
    """
    if role == "relay":
        relay(relay_listen, relay_next, relay_results, relay_ready)
        return
    if role == "whole":
        whole_worker(whole_model, batch, count, 1, whole_cpu)
        return
    parts = {"hop", "efficiency", "testbed"} if only is None else {p.strip() for p in only.split(",") if p.strip()}
    if not parts or parts - {"hop", "efficiency", "testbed"}:
        typer.echo(f"bench_runtime: error: --only {only!r}: choose from hop, efficiency, testbed", err=True)
        raise typer.Exit(2)
    result: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]), "machine": machine()}
    if "hop" in parts:
        result["hops"] = bench_hops(hops, messages)
        print_hops(result["hops"])
    if "efficiency" in parts:
        result["efficiency"] = bench_efficiency(model, batch, count, rounds, pin)
        print_efficiency(result["efficiency"])
    if "testbed" in parts:
        result["testbed"] = bench_testbed(model, batch, count, rounds, bandwidth, device_cpu)
        print_testbed(result["testbed"])
    m = result["machine"]
    load = m["load_avg_at_start"][0]
    Console().print(f"machine: {m['cpu']}, {m['cores']} cores, load {load:.2f} at start; "
                    f"ORT {m['onnxruntime']}, libzmq {m['libzmq']}\ncommand: {result['command']}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app()
