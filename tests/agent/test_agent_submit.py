"""`edgepipe-submit` as a user runs it: a real subprocess against real agents."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from agent_testlib import POISON, build_identity_chain, build_slow_pipeline, toy_input, toy_reference, wait_for
from edgepipe.agent.client import Client
from edgepipe.agent.formats.endpoints import save_endpoints
from edgepipe.agent.local import LocalPipeline

SUBMIT = str(Path(sys.executable).parent / "edgepipe-submit")


def _submit(pipe: LocalPipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SUBMIT, *pipe.submit_args(), *args], capture_output=True, text=True, timeout=120)


def test_random_batches_report_throughput_latency_and_stages(toy_pipeline: LocalPipeline,
                                                             toy_bundles: list[Path]) -> None:
    result = _submit(toy_pipeline, "--bundle", str(toy_bundles[0]), "--random", "-b", "4", "-n", "6",
                     "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["requests"], report["samples"], report["failed"]) == (6, 24, 0)
    assert 0 < report["latency_p50_ms"] <= report["latency_p95_ms"] <= report["latency_p99_ms"]
    assert report["throughput_samples_s"] > 0 and len(report["stage_compute_ms"]) == 3
    assert report["command"].startswith("edgepipe-submit tcp://127.0.0.1:")


def test_table_output(toy_pipeline: LocalPipeline) -> None:
    result = _submit(toy_pipeline, "--shape", "16", "-b", "2", "-n", "3")
    assert result.returncode == 0, result.stderr
    assert "throughput" in result.stdout and "p50 / p95 / p99" in result.stdout
    assert "stage 2 median compute" in result.stdout


def test_npy_input_and_npz_output_in_order(toy_pipeline: LocalPipeline, tmp_path: Path) -> None:
    data = toy_input(10, 3)
    np.save(tmp_path / "in.npy", data)
    result = _submit(toy_pipeline, "--npy", str(tmp_path / "in.npy"), "-b", "4",
                     "--save", str(tmp_path / "o.npz"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["requests"] == 3  # 4 + 4 + 2
    saved = np.load(tmp_path / "o.npz")
    ref = toy_reference(data)
    np.testing.assert_allclose(saved["out"], ref["out"], atol=1e-5)
    np.testing.assert_array_equal(saved["label"], ref["label"])


def test_failed_requests_are_reported_and_set_the_exit_code(toy_pipeline: LocalPipeline,
                                                            tmp_path: Path) -> None:
    data = toy_input(6, 4)
    data[3, 0] = POISON
    np.save(tmp_path / "in.npy", data)
    result = _submit(toy_pipeline, "--npy", str(tmp_path / "in.npy"), "-b", "2", "--warmup", "0", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert (report["requests"], report["failed"], report["samples"]) == (3, 1, 4)
    assert "failed at stage 1: ONNX Runtime failed" in report["errors"][0]


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--npy", "/nonexistent/in.npy"], 2, "/nonexistent/in.npy: not a readable .npy file"),
    (["--npy", "x.npy", "--images", "dir"], 2, "give only one of --random, --npy/--input, --images"),
    (["--shape", "3,two"], 2, "--shape '3,two'"),
    (["--shape", "16", "-n", "2", "--save", "out.npy"], 1, "returns 2 outputs (out, label); save to a .npz"),
])
def test_bad_options_are_one_line_errors(toy_pipeline: LocalPipeline, tmp_path: Path, args: list[str],
                                         code: int, message: str) -> None:
    args = [str(tmp_path / a) if a == "out.npy" else a for a in args]
    result = _submit(toy_pipeline, *args)
    assert result.returncode == code
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("edgepipe-submit: error: ") and message in line


def test_malformed_endpoint_is_a_one_line_error() -> None:
    result = subprocess.run([SUBMIT, "tcp://127.0.0.1:9", "dev2:5551", "--shape", "16", "--insecure"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "edgepipe-submit: error: EXIT 'dev2:5551' has no transport; did you mean tcp://dev2:5551?"]


def test_unreachable_pipeline_is_a_one_line_error() -> None:
    args = ["tcp://127.0.0.1:9", "tcp://127.0.0.1:9", "--shape", "16", "--timeout-s", "0.5", "--insecure"]
    result = subprocess.run([SUBMIT, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    (warning, line) = result.stderr.strip().splitlines()
    assert "warning: --insecure" in warning
    # the time is what the client actually waited: at least the timeout, more on a loaded machine
    assert re.search(r"no answer from the entry tcp://127\.0\.0\.1:9 for \d+\.\d s \(is the first agent running\?",
                     line), line


def test_secure_by_default_without_keys_is_a_one_line_error() -> None:
    result = subprocess.run([SUBMIT, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", "--shape", "16", "--key",
                             "/nonexistent/client.key_secret"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("edgepipe-submit: error: --key: /nonexistent/client.key_secret: no such "
                                     "secret key file (create one with `edgepipe-agent keygen`)")
    result = subprocess.run([SUBMIT, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", "--shape", "16"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "EDGEPIPE_KEYS": "/nonexistent"})
    assert result.returncode == 2 and "client.key_secret: no such secret key file" in result.stderr


def test_endpoints_file_names_addresses_keys_and_the_input(toy_pipeline: LocalPipeline, tmp_path: Path) -> None:
    endpoints = toy_pipeline.write_endpoints(tmp_path / "endpoints.json")
    result = subprocess.run([SUBMIT, "--endpoints", str(endpoints), "--key", str(toy_pipeline.client_key_file),
                             "-b", "3", "-n", "4", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["requests"], report["samples"], report["failed"]) == (4, 12, 0)
    keys_dir = tmp_path / "keys"  # the client key found in the key directory, as on a real client machine
    keys_dir.mkdir()
    (keys_dir / "client.key_secret").write_bytes(toy_pipeline.client_key_file.read_bytes())
    (keys_dir / "client.key_secret").chmod(0o600)
    result = subprocess.run([SUBMIT, "--endpoints", str(endpoints), "-n", "2", "--json"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "EDGEPIPE_KEYS": str(keys_dir)})
    assert result.returncode == 0, result.stderr


def test_client_from_endpoints(toy_pipeline: LocalPipeline, tmp_path: Path) -> None:
    endpoints = toy_pipeline.write_endpoints(tmp_path / "endpoints.json")
    with Client.from_endpoints(endpoints, toy_pipeline.client_keypair) as client:
        x = toy_input(2, 5)
        np.testing.assert_allclose(client.run(x)["out"], toy_reference(x)["out"], atol=1e-5)
        assert client.generation == 1 and client.endpoints_path == endpoints


def test_ctrl_c_prints_the_report_of_what_arrived(tmp_path: Path) -> None:
    dirs = build_slow_pipeline(tmp_path / "slow", matmuls=16)
    with LocalPipeline(dirs, log_dir=tmp_path / "logs", log_level="debug") as pipe:
        proc = subprocess.Popen([SUBMIT, *pipe.submit_args(), "--shape", "16", "-b", "1", "-n", "40",
                                 "--window", "2", "--warmup", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            assert wait_for(lambda: pipe.log_text(1).count("passed on ") + pipe.log_text(1).count("sent ") >= 3,
                            timeout_s=120)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted:" in out and "of 40 requests done" in out and "throughput" in out
    assert "Traceback" not in err


def test_images_folder_is_preprocessed_like_timm(tmp_path: Path) -> None:
    from PIL import Image

    colors = [(255, 0, 0), (0, 128, 255), (10, 20, 30)]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate(colors):
        Image.new("RGB", (48 + 16 * i, 40), color).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    dirs = build_identity_chain(tmp_path / "id", 1, (3, 32, 32))
    with LocalPipeline(dirs, log_dir=tmp_path / "logs") as pipe:
        result = _submit(pipe, "--images", str(folder), "--image-size", "32", "--bundle", str(dirs[0]),
                         "-b", "2", "--save", str(tmp_path / "out.npy"), "--json")
    assert result.returncode == 0, result.stderr
    out = np.load(tmp_path / "out.npy")
    assert out.shape == (3, 3, 32, 32)
    want = (np.array(colors, np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(out.mean(axis=(2, 3)), want, atol=1e-5)


def test_client_follows_a_newer_generation_of_its_endpoints_file(toy_bundles: list[Path], tmp_path: Path) -> None:
    """The whole deployment is replaced (a re-plan after a lost device would do this): the client
    notices its entry is gone, re-reads its endpoints file, finds a newer generation, reconnects and
    sends what was outstanding again. Every result arrives once, correct."""
    path = tmp_path / "endpoints.json"
    old = LocalPipeline(toy_bundles, max_batch=8, log_dir=tmp_path / "old", heartbeat_s=0.2).start()
    try:
        old.write_endpoints(path)
        with LocalPipeline(toy_bundles, max_batch=8, log_dir=tmp_path / "new", heartbeat_s=0.2,
                           extra_client_keys=[old.client_keypair.public_text]) as new, \
                Client.from_endpoints(path, old.client_keypair, heartbeat_s=0.2) as client:
            inputs = [toy_input(2, 60 + i) for i in range(12)]
            seqs = [client.submit(x) for x in inputs[:3]]
            client.result(seqs[0])
            for agent in old.agents:  # the old deployment disappears, with requests in flight
                old.kill(agent.index)
            endpoints = new.endpoints()
            save_endpoints(path, dataclasses.replace(endpoints, deployment=old.deployment, generation=2))
            seqs += [client.submit(x) for x in inputs[3:]]
            outputs = [client.result(s).outputs for s in seqs[1:]]
            assert client.generation == 2 and client.entry == new.entry
    finally:
        old.stop()
    for x, out in zip(inputs[1:], outputs, strict=True):
        np.testing.assert_allclose(out["out"], toy_reference(x)["out"], atol=1e-5)
