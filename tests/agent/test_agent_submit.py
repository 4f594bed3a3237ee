"""`edgepipe-submit` as a user runs it: a real subprocess against real agents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from agent_testlib import POISON, build_identity_chain, toy_input, toy_reference
from edgepipe.agent.local import LocalPipeline

SUBMIT = str(Path(sys.executable).parent / "edgepipe-submit")


def _submit(pipe: LocalPipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SUBMIT, pipe.entry, pipe.exit, *args], capture_output=True, text=True, timeout=120)


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
    result = subprocess.run([SUBMIT, "tcp://127.0.0.1:9", "dev2:5551", "--shape", "16"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "edgepipe-submit: error: cannot connect to dev2:5551: Invalid argument (addr='dev2:5551')"]


def test_unreachable_pipeline_is_a_one_line_error() -> None:
    args = ["tcp://127.0.0.1:9", "tcp://127.0.0.1:9", "--shape", "16", "--timeout-s", "0.5"]
    result = subprocess.run([SUBMIT, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "accepted no request for 0.5 s (is the first agent running?)" in line


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
