"""`edgepipe-submit --report PLAN.json` against a real 2-stage vit_tiny pipeline planned from
measured profiles: predicted vs measured per stage and for throughput."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from edgepipe.agent.local import LocalPipeline
from profiling_testlib import cli


@pytest.fixture(scope="module")
def pipeline(planned: Path):
    stages = sorted((planned / "out").glob("stage-*"))
    with LocalPipeline(stages, log_dir=planned / "logs") as pipe:
        yield pipe


def submit(pipe: LocalPipeline, plan: Path, *args: str):
    return cli("edgepipe-submit", *pipe.submit_args(), "--bundle", str(Path(pipe.bundle_dirs[0])),
               "--report", str(plan), *args)


def test_report_compares_every_stage_and_throughput(pipeline: LocalPipeline, planned: Path) -> None:
    plan = json.loads((planned / "out" / "plan.json").read_text())
    result = submit(pipeline, planned / "out" / "plan.json", "-b", "2", "-n", "6", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    prediction = report["prediction"]
    assert [r["device"] for r in prediction["stages"]] == [s["device"] for s in plan["stages"]]
    for row, stage in zip(prediction["stages"], plan["stages"], strict=True):
        assert row["predicted_compute_ms"] == pytest.approx(stage["compute_s"] * 1000)
        assert row["measured_compute_ms"] > 0 and row["measured_send_ms"] >= 0 and row["measured_wait_ms"] >= 0
        assert math.isfinite(row["compute_error_pct"])
    assert prediction["predicted_throughput"] == pytest.approx(plan["throughput"])
    measured = prediction["measured_throughput"]  # steady state, from the last stage's send times
    assert math.isfinite(measured) and measured > 0
    assert prediction["throughput_error_pct"] == pytest.approx((plan["throughput"] - measured) / measured * 100)
    assert prediction["measured_bottleneck"] in (0, 1) and prediction["warnings"] == []


def test_report_table_names_the_bottleneck_and_warns_on_microbatch(pipeline: LocalPipeline, planned: Path) -> None:
    result = submit(pipeline, planned / "out" / "plan.json", "-b", "1", "-n", "4")
    assert result.returncode == 0, result.stderr
    assert "predicted vs measured" in result.stdout and "throughput" in result.stdout
    assert "measured bottleneck: stage" in result.stdout
    assert "the plan is for microbatch 2, the run used 1" in result.stdout


def test_report_refuses_a_file_that_is_not_a_plan(pipeline: LocalPipeline, tmp_path: Path) -> None:
    bogus = tmp_path / "plan.json"
    bogus.write_text('{"format": "edgepipe.problem"}')
    result = submit(pipeline, bogus)
    assert result.returncode == 2 and "not an edgepipe.plan file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
