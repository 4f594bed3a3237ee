"""`edgepipe-compile` as a newcomer meets it: errors, exit codes, help, piped tables (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from compiler_testlib import masked_layers_model, skip_to_end_model

TINY = "vit_tiny_patch16_224"
CLI = [sys.executable, "-m", "edgepipe.compiler.cli"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=600, cwd=cwd)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "message"), [
    (["-o", "out", "--stages", "3"], "give a model name (see --list-models) or --onnx FILE"),
    ([TINY, "--onnx", "m.onnx", "-o", "out"], "give either a model name or --onnx FILE, not both"),
    ([TINY, "-o", "out", "--stages", "0"], "--stages must be at least 1, got 0"),
    ([TINY, "-o", "out", "--stages", "-2"], "--stages must be at least 1, got -2"),
    ([TINY, "--list-cuts", "--max-tensors", "0"], "--max-tensors must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in one_error_line(proc)
    assert not (tmp_path / "out").exists()


def test_a_model_without_an_output_directory_writes_nothing(tmp_path: Path) -> None:
    proc = run_cli(TINY, cwd=tmp_path)
    assert proc.returncode == 2
    assert "say where the bundles go: -o DIR (e.g. -o build/vit_tiny_patch16_224)" in one_error_line(proc)
    assert list(tmp_path.iterdir()) == []  # no ./build beside pip's


def test_help_has_no_bool_metavars_and_no_stray_spaces() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "<bool>" not in proc.stdout
    assert " ." not in proc.stdout.replace("...", "")
    for flag in ("--list-cuts", "--json", "--no-verify", "--help"):
        assert flag in proc.stdout
    words = " ".join(proc.stdout.replace("│", " ").split())  # the help panel wraps lines
    assert "(a label means: cut in front of that module)" in words


def test_piped_list_cuts_is_not_cut_at_80_columns_and_explains_labels(vit_tiny_model: Path) -> None:
    proc = run_cli(TINY, "--list-cuts")  # stdout is a pipe here
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "bytes/sample" in line)
    assert "next segment weights" in header and len(header) > 80
    assert "label = cut in front of that module" in proc.stdout
    assert "…" not in proc.stdout  # nothing truncated


def test_unlabelled_cuts_are_described(tmp_path: Path) -> None:
    path = masked_layers_model(tmp_path / "masked.onnx")
    out = json.loads(run_cli("--onnx", str(path), "--list-cuts", "--json").stdout)
    rows = {tuple(r["tensors"]): r for r in out["cuts"]}
    assert rows[("h0",)]["label"] == "@h0" or rows[("h0",)]["label"].startswith("@")
    assert rows[("h0",)]["where"].startswith(("right after tensor h0", "in front of MatMul node layer1_matmul"))
    assert rows[("h0",)]["forwarded"] == ["mask"] and "bias" in rows[("h0",)]["rebuilt"]


def test_onnx_file_compile_says_it_compiled_a_file_not_an_export(tmp_path: Path) -> None:
    path = masked_layers_model(tmp_path / "masked.onnx")
    proc = run_cli("--onnx", str(path), "-o", str(tmp_path / "b"), "--stages", "3")
    assert proc.returncode == 0, proc.stderr
    assert "(ONNX file, sha256" in proc.stdout and "fresh export" not in proc.stdout
    assert "rebuilds" in proc.stdout and "from the forwarded mask instead of receiving" in proc.stdout
    assert "max |Δ| = 0" in proc.stdout


def test_fixed_batch_onnx_file_is_reported_as_such(tmp_path: Path) -> None:
    path = masked_layers_model(tmp_path / "fixed.onnx", batch=1)
    proc = run_cli("--onnx", str(path), "-o", str(tmp_path / "b"), "--stages", "2")
    assert proc.returncode == 0, proc.stderr
    assert "fixed batch size of 1" in proc.stderr and "accept only batches of 1" in proc.stderr
    assert "batch 1: max |Δ|" in proc.stdout  # verified at the batch it really runs
    summary = json.loads((tmp_path / "b" / "compile.json").read_text())
    assert summary["fixed_batch"] == 1 and summary["verification"]["batch"] == 1


def test_a_lopsided_split_is_never_silent(tmp_path: Path) -> None:
    path = skip_to_end_model(tmp_path / "skip.onnx")
    proc = run_cli("--onnx", str(path), "-o", str(tmp_path / "b"), "--stages", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    warnings = json.loads(proc.stdout)["balance"]["warnings"]
    assert any("tensor early" in w and "--max-tensors 2" in w for w in warnings), warnings
    table = run_cli("--onnx", str(path), "-o", str(tmp_path / "c"), "--stages", "3")
    assert "warning: stage 1 holds" in table.stderr and "tensor early" in table.stderr
