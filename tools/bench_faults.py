"""Benchmark the data plane under faults (issue 10): how fast a fault is noticed, how fast the stream
resumes, and that nothing is lost, duplicated or computed twice.

Each scenario runs on a fresh pipeline of real agent processes (a model compiled into 3 stages,
secure, default heartbeats of 0.5 s) with a client streaming microbatches continuously in its own
thread; every result is checked against the unsplit model.

- ``kill0``/``kill1``/``kill2``: kill -9 of that stage, restarted 2 s later (same ports, same key).
- ``pause``: the middle stage stopped (SIGSTOP) for 10 s, then continued.
- ``flood``: a second client (a valid key) sends 50-byte messages as fast as it can for 20 s; a
  normal client's median latency (one request at a time) during the flood vs unloaded. On one
  2-core machine the flooding process itself takes most of a core from the pipeline, which an
  attacker on its own machine would not; ``flood2k`` paces the flood at 2,000 messages/s (some 65
  times the flood that stalled version 1) to show the pipeline's own cost; ``flood_own_cpu`` (root)
  gives the flooder CPU of its own, as an attacker's machine would: cgroup v1 quotas of 1.5 cores
  for the pipeline and its normal client (unloaded and flooded alike) and 0.5 core for the flooder.

Measured: time to detect (the fault to the first log line of a neighbour declaring the stage down),
time from the restart (or the end of the pause) to the next result, results lost and duplicated
(given to the caller twice; the client also counts copies it dropped), and per stage the number of
computations (the stages that were not killed must compute every request exactly once).

A scenario is a function ``(Bench) -> dict`` in SCENARIOS: add one (e.g. the fleet's "permanent
loss of a device with re-plan") by writing it and registering its name; ``Bench`` gives the
pipeline, the streaming client's record and the helpers.

    flock /work/notes/bench.lock .venv/bin/python tools/bench_faults.py --json build/bench-faults.json
    .venv/bin/python tools/bench_faults.py --scenarios kill1,pause --model vit_small_patch16_224
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import typer
from edgepipe.agent.client import ClientError, Result
from edgepipe.agent.local import LocalPipeline
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)

DETECT_TARGET_S, RESTART_TARGET_S, PAUSE_TARGET_S, FLOOD_TARGET = 2.0, 3.0, 1.0, 2.0


@dataclass
class Arrival:
    index: int  # which input of the pool
    at: float  # time.time() the result (or failure) arrived
    ok: bool  # equal to the unsplit model's output
    latency_s: float


@dataclass
class Bench:
    """What a scenario works with: the running pipeline, the client streaming into it (in its own
    thread) and what has arrived so far."""

    pipe: LocalPipeline
    inputs: list[np.ndarray]
    references: list[np.ndarray]
    input_name: str
    window: int = 4
    arrivals: list[Arrival] = field(default_factory=list)
    client_events: list[tuple[float, str]] = field(default_factory=list)
    submitted: int = 0
    duplicates_dropped: int = 0
    resends: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    _thread: threading.Thread | None = None

    def start_stream(self, window: int | None = None) -> None:
        self.window = window or self.window
        self._thread = threading.Thread(target=self._stream, name="client", daemon=True)
        self._thread.start()

    def stop_stream(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(300)

    def _stream(self) -> None:
        def batches():  # endless, until stopped
            k = 0
            while not self.stop.is_set():
                self.submitted += 1
                yield {self.input_name: self.inputs[k % len(self.inputs)]}
                k += 1

        try:
            with self.pipe.client(window=self.window) as client:
                for k, outcome in enumerate(client.results(batches(), errors="return")):
                    now = time.time()
                    if isinstance(outcome, Result):
                        (got,) = outcome.outputs.values()
                        ok = float(np.abs(got - self.references[k % len(self.inputs)]).max()) <= 1e-4
                        self.arrivals.append(Arrival(k, now, ok, outcome.latency_s))
                    else:
                        self.arrivals.append(Arrival(k, now, False, float("nan")))
                self.duplicates_dropped = client.duplicates
                self.resends = client.resends
        except ClientError as exc:
            self.error = str(exc)

    def wait_results(self, count: int, after: float, timeout_s: float = 120.0) -> float | None:
        """Time of the first result after ``after``, once ``count`` have arrived after it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            later = [a.at for a in self.arrivals if a.at > after]
            if len(later) >= count:
                return later[0]
            time.sleep(0.02)
        return None

    def detection(self, stage: int, since: float) -> tuple[float | None, str]:
        """Seconds from ``since`` to the first line, in any other stage's log or the client's, that
        declares stage ``stage`` down; and the line."""
        found: list[tuple[float, str]] = []
        for agent in self.pipe.agents:
            if agent.index == stage:
                continue
            for line in agent.log_path.read_text(errors="replace").splitlines():
                if f"stage {stage} on " in line and "declared down" in line:
                    at = _log_time(line)
                    if at is not None and at >= since:
                        found.append((at, line.split("] ", 1)[-1]))
        found += [(at, msg) for at, msg in self.client_events
                  if at >= since and f"stage {stage} on " in msg and ("declared down" in msg or "silent" in msg)]
        if not found:
            return None, ""
        at, line = min(found)
        return at - since, line

    def outcome(self) -> dict[str, Any]:
        """Lost, wrong and duplicated results of the whole stream (call after stop_stream)."""
        indices = [a.index for a in self.arrivals]
        return {"results": len(self.arrivals), "lost": sum(1 for a in self.arrivals if np.isnan(a.latency_s)),
                "wrong": sum(1 for a in self.arrivals if not a.ok and not np.isnan(a.latency_s)),
                "duplicated": len(indices) - len(set(indices)), "duplicates_dropped_by_client": self.duplicates_dropped,
                "client_resends": self.resends, "client_error": self.error}


def _log_time(line: str) -> float | None:
    try:
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return stamp.timestamp()


def computations(pipe: LocalPipeline) -> list[int | None]:
    """Per stage, ``computed`` of its last incarnation's exit line (call after pipe.stop())."""
    counts = []
    for stage in range(len(pipe.bundle_dirs)):
        lines = [ln for ln in pipe.log_text(stage).splitlines() if " exit requests_in=" in ln]
        counts.append(int(lines[-1].split("computed=")[1].split()[0]) if lines else None)
    return counts


# ---- scenarios ---------------------------------------------------------------------------------

def kill_and_restart(stage: int) -> Callable[[Bench], dict[str, Any]]:
    def scenario(bench: Bench) -> dict[str, Any]:
        bench.start_stream()
        bench.wait_results(10, 0)
        fault = time.time()
        bench.pipe.kill(stage)
        time.sleep(2.0)
        restart = time.time()
        bench.pipe.restart(stage)
        ready = time.time()
        next_result = bench.wait_results(5, restart)
        detect_s, line = bench.detection(stage, fault)
        bench.wait_results(40, restart)
        bench.stop_stream()
        return {"fault": f"kill -9 of stage {stage}, restarted 2 s later", "detect_s": detect_s,
                "detected_by": line, "restart_to_ready_s": ready - restart,
                "restart_to_next_result_s": None if next_result is None else next_result - restart,
                "fault_to_next_result_s": None if next_result is None else next_result - fault,
                "killed_stage": stage}
    return scenario


def pause(bench: Bench, stage: int = 1, seconds: float = 10.0) -> dict[str, Any]:
    bench.start_stream()
    bench.wait_results(10, 0)
    fault = time.time()
    bench.pipe.pause(stage)
    time.sleep(seconds)
    resumed = time.time()
    bench.pipe.resume(stage)
    next_result = bench.wait_results(5, resumed)
    detect_s, line = bench.detection(stage, fault)
    bench.wait_results(40, resumed)
    bench.stop_stream()
    return {"fault": f"stage {stage} paused (SIGSTOP) for {seconds:g} s", "detect_s": detect_s, "detected_by": line,
            "resume_to_next_result_s": None if next_result is None else next_result - resumed}


def flood(bench: Bench, seconds: float = 20.0, unloaded_s: float = 10.0, rate: float = 0.0,
          on_flooder: Callable[[int], None] | None = None) -> dict[str, Any]:
    bench.start_stream(window=1)  # one request at a time: its latency is the pipeline's, not a queue's
    time.sleep(unloaded_s)
    flood_start = time.time()
    flooder = subprocess.Popen([sys.executable, __file__, "--role", "flood", "--flood-entry", bench.pipe.entry,
                                "--flood-server-key", bench.pipe.stage_keys(0)[0],
                                "--flood-key-file", str(bench.pipe.client_key_files[1]),
                                "--flood-seconds", str(seconds), "--flood-rate", str(rate)],
                               stdout=subprocess.PIPE, text=True)
    if on_flooder is not None:
        on_flooder(flooder.pid)
    sent = json.loads(flooder.communicate(timeout=seconds + 120)[0] or "{}").get("sent", 0)
    flood_end = time.time()
    time.sleep(3)
    bench.stop_stream()
    status = bench.pipe.status(0)
    unloaded = [a.latency_s for a in bench.arrivals if a.at < flood_start and a.ok]
    flooded = [a.latency_s for a in bench.arrivals if flood_start <= a.at <= flood_end and a.ok]
    unloaded_ms, flooded_ms = float(np.median(unloaded)) * 1000, float(np.median(flooded)) * 1000
    pace = f"at {rate:g} messages/s" if rate else "as fast as it can"
    return {"fault": f"a client floods the entry with 50-byte messages {pace} for {seconds:g} s",
            "flood_messages": sent, "flood_messages_per_s": sent / seconds,
            "entry_rejected": status["rejected"], "entry_dropped": status["dropped"],
            "latency_unloaded_median_ms": unloaded_ms, "latency_flood_median_ms": flooded_ms,
            "latency_ratio": flooded_ms / unloaded_ms, "results_during_flood": len(flooded)}


def flood_role(entry: str, server_key: str, key_file: Path, seconds: float, rate: float) -> None:
    """Runs in its own process: 50-byte messages to the entry, as fast as it takes them (rate 0) or
    at ``rate`` messages per second."""
    import msgpack
    import zmq
    from edgepipe.agent.formats.keys import load_keypair
    from edgepipe.agent.transport import ClientAuth, connect_data

    ctx = zmq.Context()
    sock = connect_data(ctx, entry, auth=ClientAuth(load_keypair(key_file), server_key.encode()))
    garbage = b"\x93" + bytes(49)

    def request(seq: int) -> bytes:  # a readable request id but no tensor: answered (at a bounded rate)
        header = {"v": 2, "kind": "data", "client": "", "seq": seq, "tensors": []}
        header["client"] = "f" * (50 - len(msgpack.packb({**header, "client": "f"})) + 1)
        return msgpack.packb(header)

    started = time.monotonic()
    sent, seq, deadline = 0, 0, started + seconds
    while time.monotonic() < deadline:
        if rate and sent > rate * (time.monotonic() - started):
            time.sleep(0.001)
            continue
        seq += 1
        message = [request(seq)] if seq % 2 else [garbage]
        try:
            sock.send_multipart(message, flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            sock.poll(10, zmq.POLLOUT)
        with contextlib.suppress(zmq.Again):
            while sock.poll(0):  # drop whatever comes back
                sock.recv_multipart(zmq.NOBLOCK)
    sock.close(0)
    ctx.term()
    print(json.dumps({"sent": sent}))


@contextlib.contextmanager
def cpu_group(name: str, cores: float) -> Iterator[Callable[[int], None]]:
    """A cgroup of ``cores`` CPUs; yields ``join(pid)``. Every process that joined is moved back to
    the root group before the group is removed (removing it kills what is still inside)."""
    import emulate  # tools/: cgroup v1 helpers of the testbed

    emulate.create_cgroup(name, cpu=cores, cpuset=None, memory_bytes=None)
    joined: list[int] = []

    def join(pid: int) -> None:
        for procs in emulate.cgroup_procs_files(name):
            procs.write_text(str(pid))
        joined.append(pid)

    try:
        yield join
    finally:
        for pid in joined:
            for controller in emulate.CONTROLLERS:
                with contextlib.suppress(OSError):  # the process may have exited
                    (emulate.CGROUP_ROOT / controller / "cgroup.procs").write_text(str(pid))
        emulate.remove_cgroup(name)


def flood_own_cpu(bench: Bench, pipeline_cores: float = 1.5, flooder_cores: float = 0.5) -> dict[str, Any]:
    """The flood from a process with CPU of its own: the pipeline (agents and this benchmark's normal
    client) shares ``pipeline_cores``, the flooder has ``flooder_cores``, before and during the flood."""
    group = f"edgepipe-flood-{os.getpid()}"
    with cpu_group(f"{group}-pipeline", pipeline_cores) as join_pipeline, \
            cpu_group(f"{group}-flooder", flooder_cores) as join_flooder:
        for pid in (os.getpid(), *(agent.process.pid for agent in bench.pipe.agents)):
            join_pipeline(pid)
        row = flood(bench, on_flooder=join_flooder)
    return {**row, "fault": row["fault"] + f" (flooder {flooder_cores:g} core, pipeline {pipeline_cores:g} cores)"}


SCENARIOS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "kill0": kill_and_restart(0),
    "kill1": kill_and_restart(1),
    "kill2": kill_and_restart(2),
    "pause": pause,
    "flood": flood,
    "flood2k": lambda bench: flood(bench, rate=2000.0),
    "flood_own_cpu": flood_own_cpu,
}
NEEDS_ROOT = {"flood_own_cpu"}


# ---- running ------------------------------------------------------------------------------------

class _ClientLog(logging.Handler):
    def __init__(self, events: list[tuple[float, str]]) -> None:
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((record.created, record.getMessage()))


def run_scenario(name: str, build: Any, batch: int, log_root: Path) -> dict[str, Any]:
    import onnxruntime as ort
    from edgepipe.agent.formats.bundle import read_manifest

    first = read_manifest(build.bundle_dirs[0]).inputs[0]
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((batch, *first.shape[1:])).astype(np.float32) for _ in range(8)]
    whole = ort.InferenceSession(str(build.model_path), providers=["CPUExecutionProvider"])
    references = [whole.run(None, {whole.get_inputs()[0].name: x})[0] for x in inputs]
    log_dir = log_root / name
    with LocalPipeline(build.bundle_dirs, max_batch=batch, log_dir=log_dir, clients=2, control=True) as pipe:
        bench = Bench(pipe, inputs, references, first.name)
        handler = _ClientLog(bench.client_events)
        logging.getLogger("edgepipe.client").addHandler(handler)
        try:
            measured = SCENARIOS[name](bench)
        finally:
            logging.getLogger("edgepipe.client").removeHandler(handler)
            bench.stop_stream()
        codes = pipe.stop()
    outcome = bench.outcome()
    counts = computations(pipe)
    killed = measured.get("killed_stage")
    others = [c for s, c in enumerate(counts) if s != killed]
    return {"scenario": name, **measured, **outcome, "computed_per_stage": counts,
            "recomputed_elsewhere": sum(c - outcome["results"] for c in others if c is not None),
            "exit_codes": codes, "logs": str(log_dir)}


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "load_avg_at_start": os.getloadavg()}


def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Faults (3 stages, heartbeats 0.5 s; targets: detect <= 2 s, resume <= 3 s after a restart, "
                        "<= 1 s after a pause, flood latency <= 2x)")
    for col in ("scenario", "detect", "restart/resume -> next result", "lost / dup / wrong", "computed per stage",
                "notes"):
        table.add_column(col, justify="right" if col not in ("scenario", "notes") else "left")

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} s"

    for r in rows:
        resume = r.get("restart_to_next_result_s", r.get("resume_to_next_result_s"))
        notes = ""
        if r["scenario"].startswith("flood"):
            notes = (f"{r['flood_messages_per_s']:.0f} msg/s; median latency {r['latency_unloaded_median_ms']:.0f} -> "
                     f"{r['latency_flood_median_ms']:.0f} ms ({r['latency_ratio']:.2f}x)")
        elif "restart_to_ready_s" in r:
            notes = f"restart to ready {r['restart_to_ready_s']:.2f} s"
        table.add_row(r["scenario"], s(r.get("detect_s")), s(resume),
                      f"{r['lost']} / {r['duplicated']} / {r['wrong']}", str(r["computed_per_stage"]) +
                      f" of {r['results']}", notes)
    Console(width=200).print(table)


@app.command()
def main(
    scenarios: str = typer.Option(",".join(SCENARIOS), "--scenarios", help="Comma-separated: " + ", ".join(SCENARIOS)),
    model: str = typer.Option("vit_tiny_patch16_224", "--model", help="Registry model, compiled into --stages."),
    stages: int = typer.Option(3, "--stages", min=3, help="Pipeline stages (kill0..kill2 need 3)."),
    batch: int = typer.Option(2, "--batch", min=1, help="Samples per microbatch."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results here."),
    role: str | None = typer.Option(None, "--role", hidden=True),
    flood_entry: str = typer.Option("", "--flood-entry", hidden=True),
    flood_server_key: str = typer.Option("", "--flood-server-key", hidden=True),
    flood_key_file: Path | None = typer.Option(None, "--flood-key-file", hidden=True),
    flood_seconds: float = typer.Option(20.0, "--flood-seconds", hidden=True),
    flood_rate: float = typer.Option(0.0, "--flood-rate", hidden=True),
) -> None:
    """Fault scenarios on a real pipeline: detection, resumption, exactly-once, flood resistance."""
    if role == "flood":
        flood_role(flood_entry, flood_server_key, flood_key_file, flood_seconds, flood_rate)
        return
    names = [n.strip() for n in scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        typer.echo(f"bench_faults: error: unknown scenario(s) {', '.join(unknown)} (known: {', '.join(SCENARIOS)})",
                   err=True)
        raise typer.Exit(2)
    import emulate  # tools/

    if (problem := emulate.host_problem()) is not None and NEEDS_ROOT & set(names):
        console.print(f"skipping {', '.join(sorted(NEEDS_ROOT & set(names)))}: {problem}")
        names = [n for n in names if n not in NEEDS_ROOT]
    from edgepipe.compiler.build import compile_model

    out = Path("build") / f"bench-faults-{model}-{stages}"
    console.print(f"compiling {model} into {stages} stages -> {out}")
    build = compile_model(model, out, stages=stages)
    result: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]), "machine": machine(),
                              "model": model, "stages": stages, "batch": batch, "rows": []}
    with tempfile.TemporaryDirectory(prefix="edgepipe-faults-") as tmp:
        for name in names:
            console.print(f"scenario {name} ...")
            result["rows"].append(run_scenario(name, build, batch, Path(tmp)))
            if json_path:  # keep what is done if a later scenario fails
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result["rows"])
    m = result["machine"]
    Console().print(f"machine: {m['cpu']}, {m['cores']} cores, load {m['load_avg_at_start'][0]:.2f} at start\n"
                    f"command: {result['command']}")


if __name__ == "__main__":
    app()
