"""`edgepipe-compile` as a user runs it: a real subprocess, real export, real ORT verification."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edgepipe.agent.formats.bundle import load_bundle

TINY = "vit_tiny_patch16_224"
CLI = [sys.executable, "-m", "edgepipe.compiler.cli"]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_list_cuts_json_names_every_block(vit_tiny_build) -> None:
    out = json.loads(run_cli(TINY, "--list-cuts", "--json").stdout)
    labels = [c["label"] for c in out["cuts"]]
    assert [f"blocks.{i}" for i in range(12)] == [lbl for lbl in labels if lbl.count(".") == 1
                                                   and lbl.startswith("blocks.")]
    assert out["model_sha256"] == vit_tiny_build.model_sha256  # same cached export as the fixture


def test_explicit_cuts_compile_and_verify_exactly(tmp_path: Path, vit_tiny_build) -> None:
    out = json.loads(run_cli(TINY, "-o", str(tmp_path), "--cuts", "blocks.8,blocks.4", "--json").stdout)
    assert [c["label"] for c in out["cuts"]] == ["blocks.4", "blocks.8"]
    assert out["verification"]["max_abs_diff"] == {"logits": 0.0}
    assert [load_bundle(tmp_path / f"stage-{k}").cut_in for k in range(3)] == [None, "blocks.4", "blocks.8"]


def test_stages_are_balanced_over_blocks(vit_tiny_build) -> None:
    labels = [c.label for c in vit_tiny_build.cuts]
    assert labels == ["blocks.4", "blocks.8"]  # 12 equal blocks + small ends -> 4/4/4
    assert vit_tiny_build.verification.passed and vit_tiny_build.verification.worst == 0.0


def test_table_output_and_fewer_stages_replace_stale_bundles(tmp_path: Path, vit_tiny_build) -> None:
    run_cli(TINY, "-o", str(tmp_path), "--stages", "3", "--no-verify")
    proc = run_cli(TINY, "-o", str(tmp_path), "--stages", "2")
    assert "stage bundle(s)" in proc.stdout and "max |Δ| = 0" in proc.stdout
    assert sorted(p.name for p in tmp_path.glob("stage-*")) == ["stage-0", "stage-1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cuts", "blocks.3.attn.qkv"], "not clean"),
        (["--cuts", "no_such_block"], "unknown cut 'no_such_block'"),
        (["--stages", "40"], "only"),
        (["--stages", "2", "--cuts", "blocks.4"], "choose one of"),
    ],
)
def test_bad_requests_fail_with_one_clear_line(tmp_path: Path, args: list[str], message: str, vit_tiny_build) -> None:
    proc = run_cli(TINY, "-o", str(tmp_path), *args, check=False)
    assert proc.returncode == 2  # bad input
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_model_lists_the_registry(tmp_path: Path) -> None:
    proc = run_cli("vit_gigantic", "-o", str(tmp_path), check=False)
    assert proc.returncode == 2 and "unknown model 'vit_gigantic'" in proc.stderr
    assert TINY in proc.stderr


def test_any_onnx_file_goes_through_the_same_path(tmp_path: Path, vit_tiny_build) -> None:
    out = json.loads(run_cli("--onnx", str(vit_tiny_build.model_path), "-o", str(tmp_path), "--stages", "2",
                             "--json").stdout)
    assert out["model_sha256"] == vit_tiny_build.model_sha256
    assert out["verification"]["passed"] is True
    assert len(out["stages"]) == 2


def test_local_checkpoint_is_loaded(tmp_path: Path, vit_tiny_build) -> None:
    import torch
    from edgepipe.agent.device.profiler import random_feeds
    from edgepipe.compiler.verify import run_chain
    from edgepipe.models.registry import build_module, get_model

    module = build_module(get_model(TINY))
    state = module.state_dict()
    state["head.bias"] = torch.full_like(state["head.bias"], 3.0)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"state_dict": state}, ckpt)
    out = json.loads(run_cli(TINY, "--checkpoint", str(ckpt), "-o", str(tmp_path / "b"), "--stages", "2",
                             "--json").stdout)
    assert out["model_sha256"] != vit_tiny_build.model_sha256
    feeds = random_feeds(load_bundle(tmp_path / "b" / "stage-0").inputs, batch=2)
    logits = run_chain([tmp_path / "b" / "stage-0", tmp_path / "b" / "stage-1"], feeds)["logits"]
    with torch.no_grad():
        module.load_state_dict(state)
        expected = module(torch.from_numpy(feeds["pixels"])).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    proc = run_cli(TINY, "--checkpoint", str(tmp_path / "nope.pth"), "-o", str(tmp_path), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_cluster_plans_devices_and_slices_at_the_plan_cuts(tmp_path: Path, vit_tiny_build) -> None:
    from edgepipe.planner.plan import load_plan
    from edgepipe.planner.problem import load_problem

    cluster = Path(__file__).parents[2] / "planner" / "examples" / "home-lab.toml"
    out = json.loads(run_cli(TINY, "-o", str(tmp_path / "b"), "--cluster", str(cluster), "--problem-out",
                             str(tmp_path / "problem.json"), "--json").stdout)
    plan = load_plan(tmp_path / "b" / "plan.json")
    problem = load_problem(tmp_path / "problem.json")
    assert plan.model_sha256 == vit_tiny_build.model_sha256 == problem.model.model_sha256
    # The bundles are cut exactly where the plan says, one per planned device, and verified.
    assert [c["label"] for c in out["cuts"]] == [s.cut_in for s in plan.stages[1:]]
    assert [row["device"] for row in out["stages"]] == [s.device for s in plan.stages]
    assert out["verification"]["passed"] is True
    # The problem's segments are the model's candidate cuts: one per block half plus the ends.
    assert len(problem.model.segments) == len(vit_tiny_build_cut_labels(vit_tiny_build)) + 1


def vit_tiny_build_cut_labels(build) -> list[str]:
    import onnx_ir as ir
    from edgepipe.compiler.cuts import find_cuts
    from edgepipe.compiler.graph import index_graph

    return [c.label for c in find_cuts(index_graph(ir.load(build.model_path).graph))]


def test_bad_cluster_file_is_one_line(tmp_path: Path, vit_tiny_build) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[device]]\nname = "a"\ntype = "nope"\nmemory = "1 GiB"\nbandwidth = "1 Gbps"\n')
    proc = run_cli(TINY, "-o", str(tmp_path / "b"), "--cluster", str(bad), check=False)
    assert proc.returncode == 2 and "bad.toml" in proc.stderr and "Traceback" not in proc.stderr


def test_profile_bundle_shares_pieces_between_identical_blocks(tmp_path: Path, vit_tiny_build) -> None:
    from edgepipe.agent.formats.profiles import load_profile_bundle

    out = json.loads(run_cli(TINY, "--profile-bundle", str(tmp_path / "pb"), "--json").stdout)
    bundle = load_profile_bundle(tmp_path / "pb")
    # One segment in front of every candidate cut: 24 block halves, the stem's cuts, the head's.
    assert out["segments"] == len(bundle.segment_names) == len(vit_tiny_build_cut_labels(vit_tiny_build)) + 1
    # 12 identical blocks, each two halves: the halves are profiled once each.
    halves = [bundle.segment_pieces[bundle.segment_names.index(f"blocks.{i}")] for i in range(12)]
    assert len(set(halves)) == 1
    assert bundle.piece_count <= len(bundle.segment_names) - 24 + 2  # the 24 halves are 2 pieces
