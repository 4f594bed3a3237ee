"""The benchmarks' path, end to end: `edgepipe-agent serve` (the .venv console script) in three emulated
devices, chained over the testbed's TCP, fed by a client in the root namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from edgepipe.agent.client import Client
from edgepipe.agent.formats.bundle import read_manifest
from edgepipe.agent.local import PipelineKeys
from testbed_helpers import cluster_toml, leftovers, needs_host, testbed

pytestmark = [pytest.mark.root, needs_host]

AGENT = str(Path(sys.executable).parent / "edgepipe-agent")
DATA_PORT, RESULTS_PORT = 5550, 5551
MEMORY = 512 * 2**20
TOLERANCE = 1e-4  # as in docs/operations.md: the split model matches the unsplit one to this


def wait_ready(proc: subprocess.Popen, ready: Path, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"agent exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"agent not ready after {timeout_s} s")
        time.sleep(0.1)
    return json.loads(ready.read_text())


def test_vit_tiny_pipeline_across_three_emulated_devices(vit_tiny_build, tmp_path):
    bundles = vit_tiny_build.bundle_dirs
    names = [f"dev{i}" for i in range(len(bundles))]
    cluster = tmp_path / "pipeline.toml"
    cluster.write_text(cluster_toml("pytest-pipeline", [
        {"name": n, "cpu": 0.5, "memory": MEMORY, "bandwidth": "100 Mbps"} for n in names]))
    keys = PipelineKeys.make(tmp_path / "keys", len(bundles))
    with testbed.Testbed(cluster, name=f"pytest-pipe-{uuid.uuid4().hex[:8]}") as bed:
        agents = []
        for i, (name, bundle) in enumerate(zip(names, bundles, strict=True)):
            argv = [AGENT, "serve", str(bundle), "--listen", bed.endpoint(name, DATA_PORT),
                    "--ready-file", str(tmp_path / f"ready-{i}.json"), "--log-level", "warning",
                    *keys.serve_args(i)]
            if i + 1 < len(names):
                argv += ["--next", bed.endpoint(names[i + 1], DATA_PORT)]
            else:
                argv += ["--results", bed.endpoint(name, RESULTS_PORT)]
            agents.append(bed.run_in(name, argv, stderr=subprocess.PIPE, text=True))
        for i, agent in enumerate(agents):
            ready = wait_ready(agent, tmp_path / f"ready-{i}.json")
            assert ready["pid"] == agent.pid  # run_in's pid is the agent itself, not a wrapper

        first = read_manifest(bundles[0]).inputs[0]
        whole = ort.InferenceSession(str(vit_tiny_build.model_path), providers=["CPUExecutionProvider"])
        batch = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
        (want,) = whole.run(None, {whole.get_inputs()[0].name: batch})
        entry, exit_ = bed.endpoint(names[0], DATA_PORT), bed.endpoint(names[-1], RESULTS_PORT)
        with Client(entry, exit_, timeout_s=60.0, **keys.client_kwargs()) as client:
            (got,) = client.run({first.name: batch}).values()
        assert float(np.abs(got - want).max()) <= TOLERANCE

        for name, agent in zip(names, agents, strict=True):
            assert bed.pids(name) == {agent.pid}
            assert 0 < bed.peak_memory(name) <= MEMORY
            assert bed.cpu_time_ns(name) > 0
        state = bed.state
    assert leftovers(state) == []
    # SIGTERM drains and exits cleanly, within the testbed's grace period.
    assert [a.returncode for a in agents] == [0, 0, 0]
