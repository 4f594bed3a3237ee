"""edgepipe-plan as a user runs it: a real subprocess, real files, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from edgepipe.planner.explain import devices_label, explain, explain_dict
from edgepipe.planner.plan import load_plan
from edgepipe.planner.problem import Device, DeviceType, Problem, save_problem
from edgepipe.planner.solver import solve
from planner_testlib import EXAMPLES, vit_like

PLAN = str(Path(sys.executable).parent / "edgepipe-plan")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PLAN, *args], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


@pytest.fixture()
def problem_file(tmp_path, paper_problem) -> Path:
    return save_problem(paper_problem, tmp_path / "problem.json")


def test_solve_explain_and_save(problem_file, tmp_path, paper_problem) -> None:
    out = _run(str(problem_file), "-o", str(tmp_path / "plan.json"))
    assert out.returncode == 0, out.stderr
    plan = load_plan(tmp_path / "plan.json")
    assert plan.problem_sha256 == paper_problem.sha256()
    assert plan.solver == "exact-dp" and len(plan.devices) == 16
    text = out.stdout
    assert text.count("◀ bottleneck") == 1
    assert devices_label(plan.stages[plan.bottleneck]) in text
    for name in ("even-split", "pipedream", "memory-proportional", "Proven optimal"):
        assert name in text
    assert f"Plan written to {tmp_path / 'plan.json'}" in text.replace("\n", "")


def test_json_output_matches_the_saved_plan(problem_file, tmp_path) -> None:
    out = _run(str(problem_file), "--json", "-o", str(tmp_path / "plan.json"), "--simulate", "40")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["plan"] == json.loads((tmp_path / "plan.json").read_text())
    info = doc["explain"]
    assert [s["bottleneck"] for s in info["stages"]].count(True) == 1
    assert {b["solver"] for b in info["baselines"]} == {"even-split", "pipedream", "memory-proportional"}
    for row in info["baselines"]:
        assert row["ratio"] == pytest.approx(doc["plan"]["throughput"] / row["throughput"])
    assert doc["simulation"]["n_microbatches"] == 40
    assert doc["simulation"]["throughput"] == pytest.approx(doc["plan"]["throughput"], rel=1e-9)


def test_cluster_file_replaces_the_devices(problem_file) -> None:
    out = _run(str(problem_file), "--cluster", str(EXAMPLES / "home-lab.toml"), "--json", "--no-baselines")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc["plan"]["left_out"]) | {s["device"] for s in doc["plan"]["stages"]} == {
        "laptop", "nuc", "pi-a", "pi-b"}
    assert doc["explain"]["baselines"] == []


def test_what_if_judges_a_saved_plan_under_a_changed_problem(problem_file, tmp_path, paper_problem) -> None:
    assert _run(str(problem_file), "-o", str(tmp_path / "plan.json"), "--no-baselines").returncode == 0
    slow = replace(paper_problem, devices=tuple(replace(d, bandwidth_mbps=2.0) for d in paper_problem.devices))
    slow_file = save_problem(slow, tmp_path / "slow.json")
    out = _run(str(slow_file), "--plan", str(tmp_path / "plan.json"), "--json", "--no-baselines")
    assert out.returncode == 0, out.stderr
    then = json.loads(out.stdout)["plan"]
    before = load_plan(tmp_path / "plan.json")
    assert then["solver"] == "what-if: exact-dp"
    assert [r["device"] for s in then["stages"] for r in s["replicas"]] == list(before.devices)
    assert then["throughput"] < before.throughput
    replanned = json.loads(_run(str(slow_file), "--json", "--no-baselines").stdout)["plan"]
    assert replanned["throughput"] > then["throughput"]


def test_microbatch_override(problem_file) -> None:
    doc = json.loads(_run(str(problem_file), "--microbatch", "4", "--json", "--no-baselines").stdout)
    assert doc["plan"]["microbatch"] == 4


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["{tmp}/missing.json"], 2, "cannot read problem file"),
        (["{tmp}/junk.json"], 2, "not valid JSON"),
        ([], 2, "give a problem file"),
        (["{problem}", "--microbatch", "lots"], 2, "--microbatch: expected a positive integer or 'auto'"),
        (["{problem}", "--method", "fastest"], 2, "--method: expected auto, exact or heuristic"),
        (["{problem}", "--microbatch", "auto"], 2, "microbatch: null, but no size is profiled"),
        (["{problem}", "--cluster", "{tmp}/junk.json"], 2, "not valid TOML"),
        (["{problem}", "--plan", "{tmp}/junk.json"], 2, "not valid JSON"),
        (["{tiny}"], 1, "no plan: segment 'input' needs at least"),
    ],
)
def test_errors_are_one_line_with_an_exit_code(tmp_path, problem_file, args, code, message) -> None:
    (tmp_path / "junk.json").write_text("{nope")
    tiny = Problem(vit_like(blocks=2, width=512), (DeviceType("t", gflops=1.0),), (Device("d", "t", 1000, 1.0),))
    paths = {"tmp": str(tmp_path), "problem": str(problem_file), "tiny": str(save_problem(tiny, tmp_path / "t.json"))}
    out = _run(*(a.format(**paths) for a in args))
    assert out.returncode == code
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_help_teaches_with_examples() -> None:
    out = _run("--help")
    assert out.returncode == 0
    assert "edgepipe-plan vith.problem.json -o plan.json" in out.stdout
    assert "--cluster" in out.stdout and "--plan" in out.stdout


def test_explain_renders_for_people(paper_problem) -> None:
    from rich.console import Console

    plan = solve(paper_problem)
    console = Console(width=200, record=True)
    console.print(explain(paper_problem, plan))
    text = console.export_text()
    assert text.count("◀ bottleneck") == 1
    assert "Proven optimal" in text
    info = explain_dict(paper_problem, plan)
    assert 0 <= info["gap"] <= plan.throughput_slack + 1e-9
    assert info["stages"][0]["from"] == "input" and info["stages"][-1]["to"] == "output"


def _lossy_problem(tmp_path: Path, bandwidth: float = 2.0) -> Path:
    """A small ViT-like model offering fp16/int8 at every inner cut, on four boards with slow NICs."""
    from edgepipe.planner.problem import CutCodec, ErrorEffect

    model = vit_like(blocks=4, width=256, tokens=65)
    last = len(model.segments) - 1
    effect = ErrorEffect(0.002, 0.99999, 1.0)
    segs = tuple(replace(s, codecs=() if i == last else (CutCodec("fp16", s.out_bytes // 2, effect),
                                                         CutCodec("int8", s.out_bytes // 4, effect)))
                 for i, s in enumerate(model.segments))
    problem = Problem(replace(model, segments=segs), (DeviceType("t", gflops=2.0),),
                      tuple(Device(f"d{i}", "t", 2**30, bandwidth) for i in range(4)), microbatch=8)
    return save_problem(problem, tmp_path / "lossy.json")


def test_max_error_compresses_slow_hops_within_the_budget(tmp_path) -> None:
    path = _lossy_problem(tmp_path)
    plain = json.loads(_run(str(path), "--json", "--no-baselines", "--max-replicas", "1").stdout)["plan"]
    assert {s["codec_out"] for s in plain["stages"]} == {"raw"} and plain["predicted_error"] is None
    out = _run(str(path), "--json", "--no-baselines", "--max-replicas", "1", "--max-error", "max_abs=0.01")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    plan = doc["plan"]
    assert {s["codec_out"] for s in plan["stages"][:-1]} - {"raw"}
    assert plan["predicted_error"]["max_abs_diff"] <= 0.01 + 1e-12
    assert plan["max_error"]["max_abs_diff"] == 0.01
    assert plan["throughput"] > plain["throughput"]
    assert [s["codec_out"] for s in doc["explain"]["stages"]] == [s["codec_out"] for s in plan["stages"]]
    text = _run(str(path), "--no-baselines", "--max-replicas", "1", "--max-error", "0.01").stdout
    assert "hop / weights" in text and "Predicted output error: max|Δ| ≤" in text and "(budget: max|Δ| ≤ 0.01)" in text


def test_replicas_and_slack_flags(problem_file) -> None:
    strict = json.loads(_run(str(problem_file), "--json", "--no-baselines", "--max-replicas", "1",
                             "--throughput-slack", "0").stdout)["plan"]
    assert all(len(s["replicas"]) == 1 for s in strict["stages"])
    assert strict["lower_bound_s"] == pytest.approx(strict["stages"][strict["bottleneck"]]["time_s"])
    default = json.loads(_run(str(problem_file), "--json", "--no-baselines").stdout)["plan"]
    assert any(len(s["replicas"]) > 1 for s in default["stages"])
    assert default["throughput"] >= strict["throughput"] / 1.01


def test_piped_output_is_not_cut_to_80_columns(problem_file) -> None:
    out = subprocess.run([PLAN, str(problem_file), "--no-baselines"], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin"})  # no COLUMNS, stdout a pipe
    assert out.returncode == 0, out.stderr
    assert "(rcc-ve-25)" in out.stdout and "…" not in out.stdout
    summary = next(line for line in out.stdout.splitlines() if line.startswith("Predicted:"))
    assert "Proven optimal" in summary  # one line, not wrapped
    assert max(len(line) for line in out.stdout.splitlines()) > 80


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-error", "lots"], "--max-error: max_abs='lots' is not a number"),
        (["--max-error", "psnr=3"], "--max-error: unknown measure 'psnr'"),
        (["--max-replicas", "0"], "--max-replicas: expected an integer >= 1"),
        (["--throughput-slack", "-0.5"], "--throughput-slack: expected a fraction >= 0"),
    ],
)
def test_bad_new_flags_are_one_line_errors(problem_file, args, message) -> None:
    out = _run(str(problem_file), *args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_what_if_refuses_a_plan_whose_codecs_the_problem_does_not_offer(tmp_path, problem_file) -> None:
    lossy = _lossy_problem(tmp_path)
    assert _run(str(lossy), "-o", str(tmp_path / "plan.json"), "--max-error", "0.05", "--max-replicas", "1",
                "--no-baselines").returncode == 0
    assert any(s.codec_out != "raw" for s in load_plan(tmp_path / "plan.json").stages)
    plain = Problem(vit_like(blocks=4, width=256, tokens=65), (DeviceType("t", gflops=2.0),),
                    tuple(Device(f"d{i}", "t", 2**30, 2.0) for i in range(4)), microbatch=8)
    out = _run(str(save_problem(plain, tmp_path / "plain.json")), "--plan", str(tmp_path / "plan.json"))
    assert out.returncode == 2
    assert "--plan: stage" in out.stderr and "offers no codec" in out.stderr
