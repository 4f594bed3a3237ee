"""`edgepipe-compile` with lossy choices, as a user runs it (real subprocesses, exports, ORT): stages
with int8 weights and compressed hops built by hand or by the planner within --max-error, the
deployed pipeline measured against fp32, a plan over budget refused; a user's checkpoint and
calibration data go through the same path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edgepipe.agent.formats.bundle import load_bundle
from edgepipe.planner import problem as planner_problem

TINY = "vit_tiny_patch16_224"
CLI = [sys.executable, "-m", "edgepipe.compiler.cli"]
# Four equal boards on 5 Mbps links, each too small for the whole fp32 model (100 MiB runtime + 22 MB of
# weights), so the planner must pipeline (not replicate the whole model) and hops carry activations.
SLOW_CLUSTER = "[cluster]\nname = \"slow\"\n\n[[type]]\nname = \"board\"\ngflops = 5.0\n" + "".join(
    f"\n[[device]]\nname = \"d{i}\"\ntype = \"board\"\nmemory = \"116 MiB\"\nbandwidth = \"5 Mbps\"\n"
    for i in range(4))


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_int8_stage_and_compressed_hops_by_hand(tmp_path: Path, vit_tiny_build) -> None:
    out = json.loads(run_cli(TINY, "-o", str(tmp_path), "--stages", "3", "--int8-weights", "1",
                             "--hop-codecs", "fp16,int8", "--calibration-samples", "4", "--json").stdout)
    assert out["verification"]["max_abs_diff"] == {"logits": 0.0}  # slicing itself stays exact
    accuracy = out["accuracy"]
    assert accuracy["int8_stages"] == [1] and accuracy["hop_codecs"] == ["fp16", "int8"]
    assert accuracy["samples"] == 4 and "registry example inputs" in accuracy["calibration"]
    measured = accuracy["measured"]
    assert 0 < measured["max_abs_diff"] < 1 and 0.99 < measured["cosine"] < 1
    assert accuracy["predicted"] is None and accuracy["within_budget"] is None  # no planner, no budget
    assert [row["weights"] for row in out["stages"]] == ["float32", "int8", "float32"]
    manifests = [load_bundle(tmp_path / f"stage-{k}") for k in range(3)]
    assert [m.quantization is not None for m in manifests] == [False, True, False]
    assert out["stages"][1]["params"] == manifests[1].quantization.float_weight_bytes // 4


def test_table_output_shows_the_measured_error(tmp_path: Path, vit_tiny_build) -> None:
    proc = run_cli(TINY, "-o", str(tmp_path), "--stages", "2", "--hop-codecs", "fp16", "--calibration-samples", "2")
    assert "Output error of the deployed pipeline" in proc.stdout and "measured" in proc.stdout
    assert "hop codecs: fp16" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--hop-codecs", "fp16,fp16,fp16"], "3 codecs for 2 hop(s)"),
    (["--hop-codecs", "zip"], "unknown codec 'zip'"),
    (["--int8-weights", "7"], "'7' is not a stage index 0..2"),
    (["--calibration", "nowhere.npy"], "no such file"),
])
def test_bad_lossy_options_are_one_line_errors(tmp_path: Path, vit_tiny_build, args, message) -> None:
    proc = run_cli(TINY, "-o", str(tmp_path), "--stages", "3", *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_users_checkpoint_and_calibration_file(tmp_path: Path, vit_tiny_build) -> None:
    """A local checkpoint (here: other random weights, saved as a user would) and the user's own samples."""
    import timm
    import torch

    torch.manual_seed(7)
    torch.save(timm.create_model(TINY, pretrained=False).state_dict(), tmp_path / "mine.pth")
    np.save(tmp_path / "samples.npy", np.random.default_rng(3).standard_normal((3, 3, 224, 224)).astype(np.float32))
    out = json.loads(run_cli(TINY, "--checkpoint", str(tmp_path / "mine.pth"), "-o", str(tmp_path / "b"),
                             "--stages", "2", "--int8-weights", "all", "--hop-codecs", "int8",
                             "--calibration", str(tmp_path / "samples.npy"), "--json").stdout)
    assert out["model_sha256"] != vit_tiny_build.model_sha256  # the user's weights, not the default ones
    accuracy = out["accuracy"]
    assert accuracy["calibration"] == str(tmp_path / "samples.npy") and accuracy["samples"] == 3
    assert accuracy["int8_stages"] == [0, 1] and accuracy["measured"]["max_abs_diff"] > 0


def test_a_hand_made_pipeline_over_budget_is_refused(tmp_path: Path, vit_tiny_build) -> None:
    proc = run_cli(TINY, "-o", str(tmp_path), "--stages", "3", "--int8-weights", "all", "--hop-codecs", "int8",
                   "--max-error", "max_abs=1e-9", "--calibration-samples", "2", check=False)
    assert proc.returncode != 0
    assert "exceeds --max-error (max_abs=1e-09)" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    summary = json.loads((tmp_path / "compile.json").read_text())  # left for inspection, with the numbers
    assert summary["accuracy"]["within_budget"] is False


def test_the_planner_compresses_slow_hops_within_the_budget(tmp_path: Path, vit_tiny_build) -> None:
    """Four equal devices on 5 Mbps links: the planner sends compressed activations where the budget
    allows, the compile measures the built pipeline and reports measured vs predicted error."""
    cluster = tmp_path / "slow.toml"
    cluster.write_text(SLOW_CLUSTER)
    out = json.loads(run_cli(TINY, "-o", str(tmp_path / "b"), "--cluster", str(cluster), "--microbatch", "4",
                             "--max-error", "max_abs=0.05,cosine=0.999", "--calibration-samples", "4", "--no-int8",
                             "--problem-out", str(tmp_path / "problem.json"), "--json").stdout)
    problem = json.loads((tmp_path / "problem.json").read_text())
    segments = problem["model"]["segments"]
    assert all(set(s["codecs"]) == {"fp16", "int8"} for s in segments[:-1]) and "codecs" not in segments[-1]
    assert not any("int8" in s for s in segments)  # --no-int8: hop codecs only
    assert problem["max_error"] == {"max_abs_diff": 0.05, "cosine": 0.999, "top1_agreement": None}
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    hops = [s["codec_out"] for s in plan["stages"][:-1]]
    assert hops and any(c != "raw" for c in hops)  # 5 Mbps: compressing pays
    accuracy = out["accuracy"]
    assert accuracy["hop_codecs"] == hops and accuracy["within_budget"] is True
    assert accuracy["predicted"] == plan["predicted_error"]
    assert accuracy["measured"]["max_abs_diff"] <= 0.05 and accuracy["measured"]["cosine"] >= 0.999
    # the plan file alone rebuilds the same pipeline, checked against the budget it was made within
    again = json.loads(run_cli(TINY, "-o", str(tmp_path / "c"), "--plan", str(tmp_path / "b" / "plan.json"),
                               "--calibration-samples", "4", "--json").stdout)["accuracy"]
    assert again["hop_codecs"] == hops and again["within_budget"] is True
    assert again["max_error"] == {"max_abs_diff": 0.05, "cosine": 0.999, "top1_agreement": None}
    # same bundles, same samples; ONNX Runtime's parallel reductions may round an fp16 value differently
    assert again["measured"]["max_abs_diff"] == pytest.approx(accuracy["measured"]["max_abs_diff"], rel=0.5)


def test_a_plan_whose_prediction_was_too_optimistic_is_replanned(tmp_path: Path, vit_tiny_build) -> None:
    """Measurements that understate int8 hops 1000-fold make the planner pick them; the deployed
    pipeline measures over budget, so the compile re-plans within a tighter budget and ends within it."""
    import dataclasses

    import tomllib
    from edgepipe.compiler.build import candidate_cuts, compile_model, load_model, spec_for
    from edgepipe.compiler.calibration import registry_calibration
    from edgepipe.compiler.compression import CodecEffect, attach_to_problem, measure_lossy
    from edgepipe.compiler.lossy_cli import build_within_budget
    from edgepipe.compiler.plan_check import LossyOptions
    from edgepipe.planner.cluster import cluster_from_dict, problem_for
    from edgepipe.planner.solver import solve
    from rich.console import Console

    tiny = load_model(TINY)
    cuts = candidate_cuts(tiny)
    measured = measure_lossy(tiny.model, cuts, registry_calibration(TINY, 4), tiny.identity.model_sha256)
    understated = dataclasses.replace(measured, segments=tuple(dataclasses.replace(s, codecs=tuple(
        dataclasses.replace(c, error=dataclasses.replace(c.error, max_abs_diff=c.error.max_abs_diff / 1000))
        if c.codec == "int8" else c for c in s.codecs)) for s in measured.segments))
    assert all(isinstance(c, CodecEffect) for s in understated.segments for c in s.codecs)
    cluster_text = SLOW_CLUSTER
    budget = planner_problem.parse_error_budget("max_abs=0.001")
    understated = dataclasses.replace(understated, segments=tuple(dataclasses.replace(s, int8=None)
                                                                  for s in understated.segments))
    problem = attach_to_problem(problem_for(cluster_from_dict(tomllib.loads(cluster_text), "slow"),
                                            spec_for(tiny, cuts), 4), understated, budget)
    first = solve(problem)
    assert "int8" in [s.codec_out for s in first.stages]  # believed nearly free
    options = LossyOptions(max_error=budget, calibration_samples=4, offer_int8=False)
    out = tmp_path / "b"
    result = build_within_budget(options, first, problem, out,
                                 lambda plan: compile_model(TINY, out, plan=plan, lossy=options),
                                 Console(stderr=True), quiet=True)
    check = result.accuracy
    assert check.within_budget is True and check.measured.max_abs_diff <= 0.001
    assert check.fallback and "exceeds the budget" in check.fallback and "re-planned" in check.fallback
    assert "int8" not in check.hop_codecs
    assert json.loads((out / "compile.json").read_text())["accuracy"]["fallback"] == check.fallback
