"""Helpers for the fleet tests: real `edgepipe-agent daemon` processes on loopback (each with its own
key and state directory, the tests' workstation key authorised), cluster files naming them, the
`edgepipe-fleet` CLI as a subprocess, and the whole model run in ONNX Runtime as the reference."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from fleet_harness import (  # noqa: F401 - re-exported for the tests
    Daemon,
    Keys,
    events_of,
    make_keys,
    start_daemon,
    start_daemon_in,
    start_supervisor,
    stop_daemon,
    stop_supervisor,
    wait_event,
    write_cluster,
)

BIN = Path(sys.executable).parent
TINY = "vit_tiny_patch16_224"


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def copy_build(src: Path, dst: Path) -> Path:
    """A build directory of its own (stage bundles and compile.json) that a test may deploy and change."""
    dst.mkdir(parents=True, exist_ok=True)
    for stage in sorted(src.glob("stage-*")):
        target = dst / stage.name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(stage, target)
    return dst


def fleet(*args: str, keys: Keys | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "edgepipe-fleet"), *args]
    if keys is not None:
        cmd += ["--key", str(keys.workstation_file)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def cli_compile(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "edgepipe-compile"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def fleet_json(*args: str, keys: Keys) -> dict[str, Any]:
    result = fleet(*args, "--json", keys=keys)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def whole_model(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def run_requests(endpoints_path: Path, batches: Sequence[np.ndarray], keypair) -> list[np.ndarray]:
    """Every batch through the deployment named by an endpoints file (as a client with ``keypair``);
    outputs in order."""
    from edgepipe.agent.client import Client
    from edgepipe.agent.formats.endpoints import load_endpoints

    ep = load_endpoints(endpoints_path)
    name = ep.inputs[0].name
    with Client.from_endpoints(endpoints_path, keypair) as client:
        return [out[ep.outputs[0].name].copy() for out in client.map({name: b} for b in batches)]


def wait_until(predicate, timeout_s: float = 60.0, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


# -- failover -------------------------------------------------------------------------------------

def failover_and_take_back(build: Path, keys: Keys, model_path: Path, victim: str, kill, restart,
                           batches: int = 24, tolerance: float = 1e-4) -> dict[str, Any]:
    """Supervise ``build``; once standby bundles are ready, send ``batches`` requests and lose the
    device ``victim`` (``kill()``) after the 5th result; every request must get exactly one result
    equal to the whole model's; then bring it back (``restart()``) and check it is taken back.
    Returns the timings and events."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    from follow import follow

    events = build / "events.jsonl"
    supervisor = start_supervisor(build, keys, events, "--take-back-after-s", "2")
    try:
        wait_event(events, "standby_ready", supervisor)
        rng = np.random.default_rng(7)
        inputs = [rng.standard_normal((2, 3, 224, 224), dtype=np.float32) for _ in range(batches)]
        killed: dict[str, float] = {}

        def on_result(index: int, _generation: int) -> None:
            if len(killed) == 0 and index >= 4:
                killed["t"] = time.time()
                kill()

        run = follow(build / "endpoints.json", inputs, keys.client, window=2, pace_s=0.05, on_result=on_result)
        assert not run.errors, run.errors
        assert sorted(run.outputs) == list(range(batches))  # every request answered, once
        for i, x in enumerate(inputs):
            np.testing.assert_allclose(run.outputs[i], whole_model(model_path, x), atol=tolerance)
        lost = wait_event(events, "lost", supervisor)
        failover = wait_event(events, "failover", supervisor)
        after = [t for t, _, g in run.arrivals if g > 1]
        restart()
        taken = wait_event(events, "taken_back", supervisor, after=failover["t"])
        again = follow(build / "endpoints.json", inputs[:4], keys.client, window=2)
        for i, x in enumerate(inputs[:4]):
            np.testing.assert_allclose(again.outputs[i], whole_model(model_path, x), atol=tolerance)
        return {"killed": killed["t"], "lost": lost, "failover": failover, "taken_back": taken,
                "first_new_result": min(after) if after else None, "run": run, "again": again}
    finally:
        stop_supervisor(supervisor)
