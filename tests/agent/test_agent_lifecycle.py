"""Agent processes start, refuse bad bundles, drain on SIGTERM, and never outlive their pipeline;
the agent runs where torch and onnx cannot be imported."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from agent_testlib import (
    F,
    blocked_imports_env,
    build_slow_pipeline,
    exit_counts,
    free_endpoint,
    process_alive,
    toy_input,
    toy_reference,
    wait_for,
    write_bundle,
)
from edgepipe.agent.formats.bundle import DATA_NAME, TensorSpec
from edgepipe.agent.formats.keys import generate_keypair
from edgepipe.agent.local import LocalPipeline, LocalPipelineError
from onnx import helper

AGENT = str(Path(sys.executable).parent / "edgepipe-agent")


def _agents_running_from(log_dir: Path) -> list[int]:
    """PIDs of any process whose command line mentions ``log_dir`` (our agents' ready files)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(log_dir) in part for part in proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [p for p in found if process_alive(p)]


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    data = bytearray((dst / DATA_NAME).read_bytes())
    data[10] ^= 0xFF
    (dst / DATA_NAME).write_bytes(bytes(data))
    return dst


def test_sigterm_drains_work_already_received(tmp_path: Path) -> None:
    """Requests inside the first agent (one computing, two queued) when SIGTERM arrives are all
    computed, passed on and delivered; every agent exits 0."""
    dirs = build_slow_pipeline(tmp_path / "slow", matmuls=16)
    pipe = LocalPipeline(dirs, log_dir=tmp_path / "logs", log_level="debug").start()
    try:
        with pipe.client(window=4, timeout_s=120) as client:
            inputs = [toy_input(1, seed) for seed in range(3)]
            seqs = [client.submit(x) for x in inputs]
            ids = [f"{client.client_id}/{s}" for s in seqs]
            # SIGTERM once stage 0 holds all three (the first is computing for a while by then).
            assert wait_for(lambda: all(f"received {i} " in pipe.log_text(0) for i in ids))
            stop_sent = time.time()
            codes = pipe.stop()
            results = [client.result(s) for s in seqs]
    finally:
        pipe.stop()
    assert codes == [0, 0]
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result.outputs["z"], x)
    # stage 0 was told to stop before it finished the last two (it computes one at a time)
    assert all(r.trace[0].send > stop_sent for r in results[1:])
    log0 = pipe.log_text(0)
    assert "stopping: draining 3 requests" in log0
    assert log0.index("stopping: draining") < log0.index(f"passed on {ids[-1]}")
    assert exit_counts(log0)["computed"] == 3


def test_stop_leaves_no_process_behind(toy_bundles: list[Path], tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    with LocalPipeline(toy_bundles, log_dir=log_dir) as pipe, pipe.client() as client:
        pids = [a.process.pid for a in pipe.agents]
        assert len(_agents_running_from(log_dir)) == 3
        client.run(toy_input(2, 0))
    assert not any(process_alive(p) for p in pids)
    assert _agents_running_from(log_dir) == []
    assert [a.process.returncode for a in pipe.agents] == [0, 0, 0]
    for i in range(3):
        assert exit_counts(pipe.log_text(i))["requests_in"] == 1


def test_exception_inside_the_pipeline_block_still_stops_every_agent(toy_bundles: list[Path],
                                                                     tmp_path: Path) -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), LocalPipeline(toy_bundles, log_dir=tmp_path) as pipe:
        pids = [a.process.pid for a in pipe.agents]
        raise RuntimeError("boom")
    assert pids and not any(process_alive(p) for p in pids)


def test_failed_start_names_the_agent_and_its_error_and_cleans_up(toy_bundles: list[Path],
                                                                 tmp_path: Path) -> None:
    broken = _corrupt_copy(toy_bundles[1], tmp_path / "broken-stage-1")
    pipe = LocalPipeline([toy_bundles[0], broken, toy_bundles[2]], log_dir=tmp_path / "logs")
    with pytest.raises(LocalPipelineError, match=r"agent 1 .* exited with code 2 .*sha256 mismatch"):
        pipe.start()
    assert len(pipe.agents) == 2  # stage 2 had started, stage 1 failed; stage 0 never started
    assert all(a.process.returncode is not None for a in pipe.agents)
    assert _agents_running_from(tmp_path / "logs") == []


def test_agents_exit_when_the_process_that_started_them_is_killed(toy_bundles: list[Path],
                                                                 tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import json, sys, time
        from edgepipe.agent.local import LocalPipeline
        pipe = LocalPipeline({[str(d) for d in toy_bundles]!r}, log_dir={str(tmp_path / "logs")!r}).start()
        print(json.dumps([a.process.pid for a in pipe.agents]), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(parent.stdout.readline())
        assert all(process_alive(p) for p in pids)
    finally:
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait()
    assert wait_for(lambda: not any(process_alive(p) for p in pids), timeout_s=20)


def test_serve_cli_ready_file_log_lines_and_sigint(toy_bundles: list[Path], tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    device, _, secret = generate_keypair(tmp_path / "keys", "device")
    client, _, _ = generate_keypair(tmp_path / "keys", "client")
    proc = subprocess.Popen([AGENT, "serve", str(toy_bundles[2]), "--listen", "tcp://127.0.0.1:0",
                             "--results", "tcp://127.0.0.1:*", "--ready-file", str(ready), "--key", str(secret),
                             "--allow", str(tmp_path / "keys" / "device.key"), "--allow-client", client.public_text],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(ready.exists, timeout_s=60), proc.stderr.read() if proc.poll() is not None else ""
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid and info["stage_index"] == 2
        assert info["public_key"] == device.public_text and len(info["incarnation"]) == 12
        for key in ("listen", "results"):
            assert info[key].startswith("tcp://127.0.0.1:") and not info[key].endswith((":0", ":*"))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    lines = err.strip().splitlines()
    assert any(" INFO " in ln and " ready stage=2/3 " in ln and f"key={device.public_text}" in ln for ln in lines)
    assert "exit requests_in=0" in lines[-1]
    assert "Traceback" not in err and "INSECURE" not in err


def test_insecure_mode_must_be_asked_for_and_warns(toy_bundles: list[Path], tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([AGENT, "serve", str(toy_bundles[2]), "--listen", "tcp://127.0.0.1:0",
                             "--results", "tcp://127.0.0.1:0", "--ready-file", str(ready), "--insecure"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(ready.exists, timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    (warning,) = [ln for ln in err.splitlines() if "INSECURE" in ln]
    assert " WARNING " in warning and "accept any peer" in warning


def _serve_error(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT, "serve", *args], capture_output=True, text=True, timeout=60)


def test_corrupted_bundle_is_refused_with_one_line_naming_the_file(toy_bundles: list[Path],
                                                                  tmp_path: Path) -> None:
    broken = _corrupt_copy(toy_bundles[0], tmp_path / "broken")
    result = _serve_error(str(broken), "--listen", "tcp://127.0.0.1:0", "--next", "tcp://127.0.0.1:1", "--insecure")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"edgepipe-agent: error: {broken / DATA_NAME}: sha256 mismatch (corrupted or modified after compile)"]


def test_manifest_that_disagrees_with_its_graph_is_refused(tmp_path: Path) -> None:
    spec = TensorSpec("x", "float32", ("batch", F))
    liar = write_bundle(tmp_path / "liar", [helper.make_node("Identity", ["x"], ["y"])], [], [spec],
                        [TensorSpec("y", "float32", ("batch", F))], 0, 1,
                        manifest_inputs=[TensorSpec("x", "float16", ("batch", F))])
    result = _serve_error(str(liar), "--listen", "tcp://127.0.0.1:0", "--results", "tcp://127.0.0.1:0",
                          "--insecure")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "stage.onnx: input 'x' is float32 in the graph, float16 in the manifest" in line


@pytest.mark.parametrize(("extra", "message"), [
    (["--insecure"], "needs --results"),
    (["--insecure", "--results", "tcp://127.0.0.1:0", "--cpus", "zero"], "--cpus 'zero'"),
    (["--insecure", "--results", "tcp://127.0.0.1:0", "--cpus", "999"], "cannot pin to CPUs [999]: Invalid argument"),
    (["--insecure", "--results", "nonsense://x"], "cannot bind nonsense://x"),
    (["--insecure", "--results", "127.0.0.1:5591"], "--results '127.0.0.1:5591' has no transport; did you mean "
                                                    "tcp://127.0.0.1:5591?"),
    (["--insecure", "--results", "tcp://127.0.0.1:0", "--log-level", "loud"], "--log-level 'loud'"),
    (["--insecure", "--results", "tcp://127.0.0.1:0", "--codec", "zip"], "--codec 'zip'"),
    (["--insecure", "--next", "tcp://127.0.0.1:1", "--next", "tcp://127.0.0.1:2", "--next-weight", "1"],
     "2 --next but 1 --next-weight"),
    (["--results", "tcp://127.0.0.1:0", "--key", "/nonexistent/device.key_secret"],
     "/nonexistent/device.key_secret: no such secret key file (create one with `edgepipe-agent keygen`)"),
    (["--results", "tcp://127.0.0.1:0", "--key", "KEYFILE"], "--allow: no keys, so nobody could send to this stage"),
    (["--results", "tcp://127.0.0.1:0", "--key", "KEYFILE", "--allow", "KEYFILE"],
     "--allow-client: no keys, so no client could read results"),
    (["--next", "tcp://127.0.0.1:1", "--key", "KEYFILE", "--allow", "KEYFILE"], "--next-key: no public key for "
                                                                               "tcp://127.0.0.1:1"),
    (["--next", "tcp://127.0.0.1:1", "--next-key", "not-a-key", "--key", "KEYFILE", "--allow", "KEYFILE"],
     "'not-a-key' is neither a 40-character Z85 public key nor a key file"),
])
def test_bad_serve_options_are_one_line_errors(toy_bundles: list[Path], extra: list[str],
                                               message: str, tmp_path: Path) -> None:
    _, _, secret = generate_keypair(tmp_path, "device")
    extra = [str(secret) if a == "KEYFILE" else a for a in extra]
    result = _serve_error(str(toy_bundles[2]), "--listen", "tcp://127.0.0.1:0", *extra)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert message in line and line.startswith("edgepipe-agent: error: "), line


def test_listen_without_transport_gets_a_hint(toy_bundles: list[Path]) -> None:
    result = _serve_error(str(toy_bundles[2]), "--listen", "127.0.0.1:5590", "--results", "tcp://127.0.0.1:0",
                          "--insecure")
    assert result.returncode == 2
    assert result.stderr.strip() == ("edgepipe-agent: error: --listen '127.0.0.1:5590' has no transport; "
                                     "did you mean tcp://127.0.0.1:5590?")


def test_check_command_verifies_a_bundle(toy_bundles: list[Path], tmp_path: Path) -> None:
    ok = subprocess.run([AGENT, "check", str(toy_bundles[0]), "--json"], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0
    info = json.loads(ok.stdout)
    assert info["ok"] and info["stage"] == "0/3" and info["inputs"] == [["x", "float32", ["batch", F]]]
    bad = subprocess.run([AGENT, "check", str(_corrupt_copy(toy_bundles[0], tmp_path / "b"))],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "sha256 mismatch" in bad.stderr


def test_agent_runs_with_torch_and_onnx_unimportable(toy_bundles: list[Path], tmp_path: Path) -> None:
    env = blocked_imports_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "torch is blocked" in probe.stderr  # the block works
    modules = subprocess.run(
        [sys.executable, "-c", "import sys, edgepipe.agent.cli, edgepipe.agent.client.submit, "
         "edgepipe.agent.local; print(' '.join(sorted(sys.modules)))"],
        env=env, capture_output=True, text=True, check=True)
    loaded = modules.stdout.split()
    heavy = [m for m in loaded if m.split(".")[0] in ("torch", "onnx", "onnx_ir", "onnxscript", "timm")
             or m.startswith(("edgepipe.compiler", "edgepipe.planner", "edgepipe.models"))]
    assert heavy == []
    with LocalPipeline(toy_bundles, env=env, log_dir=tmp_path / "logs") as pipe, pipe.client() as client:
        for seed in range(5):
            x = toy_input(1 + seed, seed)
            np.testing.assert_allclose(client.run(x)["out"], toy_reference(x)["out"], atol=1e-5)


def test_sigterm_with_the_next_stage_gone_exits_promptly_and_says_what_it_held(toy_bundles: list[Path],
                                                                                tmp_path: Path) -> None:
    """Stages 1 and 2 are killed; stage 0 holds what the client sent (its custody). On SIGTERM it
    does not wait out the 30 s drain timeout: once the next stage is declared gone it exits with
    code 1 and a line counting what it could not pass on (nothing is dropped silently)."""
    with LocalPipeline(toy_bundles, max_batch=8, log_dir=tmp_path / "logs", heartbeat_s=0.2,
                       log_level="debug") as pipe:
        pipe.kill(2)
        pipe.kill(1)
        with pipe.client(window=3) as client:
            for seed in range(3):
                client.submit(toy_input(1, seed))
            assert wait_for(lambda: pipe.log_text(0).count("computed ") == 3)
            first = pipe.agent(0).process
            started = time.monotonic()
            first.send_signal(signal.SIGTERM)
            code = first.wait(pipe.stop_timeout_s)
            took = time.monotonic() - started
    assert code == 1
    assert took < pipe.stop_timeout_s  # a failure guard, not a timing claim: it did not need the SIGKILL
    line = [ln for ln in pipe.log_text(0).splitlines() if "messages not passed on" in ln][-1]
    assert "3 messages not passed on: the next stage is gone" in line and " WARNING " in line


def test_next_stage_that_never_answers_is_warned_about(toy_bundles: list[Path], tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([AGENT, "serve", str(toy_bundles[0]), "--listen", "tcp://127.0.0.1:0", "--insecure",
                             "--next", free_endpoint(), "--ready-file", str(ready)],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(ready.exists, timeout_s=60)
        time.sleep(6)  # the warning comes once the next stage has been silent for 5 s
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0  # nothing was in flight
    (line,) = [ln for ln in err.splitlines() if "no answer from the next stage" in ln]
    assert " WARNING " in line and "is it running and listening there, and is --next-key its public key?" in line
