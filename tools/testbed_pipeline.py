"""Run a compiled pipeline inside the testbed and measure it: the benchmarks' shared runner.

One agent per stage, each started inside its planned device (network namespace, tbf-shaped link,
cgroup CPU quota and memory limit); the client runs in the root namespace. Returns throughput
(steady state, pipeline fill excluded), every output (for checking against the whole model), the
per-stage compute from the agents' records (median and the profiler's robust mean), each agent's
peak memory and the results themselves (for a trace: agent/client/trace.py).

``profile_on_bed`` has the devices profile themselves first (``edgepipe-agent control`` in each
device, profiled through the network from the root namespace, as ``edgepipe-compile --profile``
does), so a benchmark predicts from what the devices measured.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from edgepipe.agent.client import Client
from edgepipe.agent.device.profiler import robust_summary
from edgepipe.agent.formats.bundle import read_manifest
from edgepipe.agent.local import PipelineKeys, stop_processes
from testbed import Testbed

DATA_PORT, RESULTS_PORT, CONTROL_PORT = 5550, 5551, 5560
AGENT = str(Path(sys.executable).parent / "edgepipe-agent")


@dataclass(frozen=True)
class PipelineRun:
    throughput: float  # samples/s between the first and the last result after the warm-up
    outputs: list[np.ndarray]
    stage_compute_s: list[float]  # per stage, median ONNX Runtime time of one microbatch
    stage_devices: list[str]
    peak_rss_bytes: list[int] = field(default_factory=list)
    cgroup_peak_bytes: list[int] = field(default_factory=list)
    oom_kills: list[int] = field(default_factory=list)
    stage_compute_mean_s: list[float] = field(default_factory=list)  # outliers rejected, as profiles
    results: list[Any] = field(default_factory=list)  # the client's Result objects
    handed_at: list[float] = field(default_factory=list)  # when each result was handed over


def run_on_testbed(cluster_path: Path, bundle_dirs: list[Path], stage_devices: list[str],
                   batches: list[np.ndarray], threads: int = 1, warmup: int = 1,
                   timeout_s: float = 600.0, workdir: Path | None = None, secure: bool = True) -> PipelineRun:
    """Bring up a testbed for ``cluster_path`` and run the pipeline on it (``run_on_bed``)."""
    with Testbed(cluster_path, name=f"bench-{uuid.uuid4().hex[:8]}") as bed:
        return run_on_bed(bed, bundle_dirs, stage_devices, batches, threads, warmup, timeout_s, workdir, secure)


def run_on_bed(bed: Testbed, bundle_dirs: list[Path], stage_devices: list[str], batches: list[np.ndarray],
               threads: int = 1, warmup: int = 1, timeout_s: float = 600.0, workdir: Path | None = None,
               secure: bool = True) -> PipelineRun:
    """Serve ``bundle_dirs`` on ``stage_devices`` of a testbed that is up and push ``batches``
    through (the first ``warmup`` batches are sent first and not timed); the agents stop after.
    ``secure=False`` runs every hop in plaintext (--insecure), for measuring what CurveZMQ costs."""
    workdir = Path(workdir or bundle_dirs[0].parent).resolve()
    first = read_manifest(bundle_dirs[0]).inputs[0]
    n = len(stage_devices)
    keys = PipelineKeys.make(workdir / "keys", n)  # secure, as a real deployment is
    procs: dict[int, subprocess.Popen] = {}
    try:
        ready = [workdir / f"ready-{i}.json" for i in range(n)]
        for i in reversed(range(n)):  # each agent needs the next one's address
            name = stage_devices[i]
            ready[i].unlink(missing_ok=True)
            argv = [AGENT, "serve", str(Path(bundle_dirs[i]).resolve()), "--listen", bed.endpoint(name, DATA_PORT),
                    "--threads", str(threads), "--ready-file", str(ready[i]), "--log-level", "warning",
                    "--max-batch", str(max(len(b) for b in batches)),
                    *(keys.serve_args(i) if secure else ["--insecure"])]
            if i + 1 < n:
                argv += ["--next", bed.endpoint(stage_devices[i + 1], DATA_PORT)]
            else:
                argv += ["--results", bed.endpoint(name, RESULTS_PORT)]
            procs[i] = bed.run_in(name, argv, stderr=subprocess.PIPE, text=True)
        _wait_ready(ready, list(procs.values()))
        entry, exit_ = bed.endpoint(stage_devices[0], DATA_PORT), bed.endpoint(stage_devices[-1], RESULTS_PORT)
        handed: list[float] = []
        security = keys.client_kwargs() if secure else {"insecure": True}
        with Client(entry, exit_, timeout_s=timeout_s, window=n + 2, **security) as client:
            for batch in batches[:warmup]:
                client.run({first.name: batch})
            results = []
            for result in client.results({first.name: b} for b in batches[warmup:]):
                handed.append(time.time())
                results.append(result)
        done = [r for r in results]
        arrivals = sorted(r.trace[-1].send for r in done if r.trace)
        samples = sum(len(b) for b in batches[warmup + 1:])
        # Steady state: from the first result to the last, the samples of all but the first.
        span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else float("nan")
        compute = [statistics.median(r.trace[i].compute_s for r in done) for i in range(n)]
        mean = [robust_summary([r.trace[i].compute_s for r in done]).mean for i in range(n)]
        run = PipelineRun(
            throughput=samples / span if span and span > 0 else float("nan"),
            outputs=[next(iter(r.outputs.values())) for r in done],
            stage_compute_s=compute,
            stage_devices=list(stage_devices),
            peak_rss_bytes=[_status(procs[i].pid).get("VmHWM", 0) for i in range(n)],
            cgroup_peak_bytes=[bed.peak_memory(name) for name in stage_devices],
            oom_kills=[bed.oom_kills(name) for name in stage_devices],
            stage_compute_mean_s=mean, results=results, handed_at=handed,
        )
    finally:
        stop_processes(list(procs.values()), timeout_s=60)
    return run


def start_controls(bed: Testbed, devices: list[str], workdir: Path, port: int = CONTROL_PORT,
                   threads: int = 1) -> list[subprocess.Popen]:
    """``edgepipe-agent control`` in each device (the profiling daemon, insecure), started and ready;
    profile them with ``keypair=None``."""
    procs = []
    try:
        for d in devices:
            ready = workdir / f"control-{d}.json"
            ready.unlink(missing_ok=True)
            log = (workdir / f"control-{d}.log").open("w")
            # --insecure: the testbed is an isolated network this run created, and what is measured is
            # the devices' compute, not the control channel (edgepipe-compile --profile is secure)
            procs.append(bed.run_in(d, [AGENT, "control", "--listen", bed.endpoint(d, port), "--device", d,
                                        "--threads", str(threads), "--ready-file", str(ready), "--insecure",
                                        "--state-dir", str(workdir / f"state-{d}")],
                                    stdout=log, stderr=subprocess.STDOUT))
        _wait_ready([workdir / f"control-{d}.json" for d in devices], procs)
    except BaseException:
        stop_processes(procs, timeout_s=30)
        raise
    return procs


def _status(pid: int) -> dict[str, int]:
    """Memory lines of /proc/PID/status, in bytes. (A cgroup's own peak also counts page cache, e.g.
    the bundle files read for their hashes, which the kernel reclaims under the limit.)"""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile") and rest.strip().endswith("kB"):
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def _wait_ready(ready_files: list[Path], procs: list[subprocess.Popen], timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in ready_files):
        for proc in procs:
            if proc.poll() is not None:
                tail = proc.stderr.read()[-500:] if proc.stderr else ""
                raise RuntimeError(f"an agent exited with {proc.returncode}: {tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"agents not ready after {timeout_s:.0f} s")
        time.sleep(0.2)
