"""Problem and plan files: round trips, and bad input named precisely."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from edgepipe.planner.cost import Placement, make_plan
from edgepipe.planner.plan import Plan, PlanError, Replica, load_plan, save_plan
from edgepipe.planner.problem import (
    CommCost,
    CutCodec,
    Device,
    DeviceType,
    ErrorBudget,
    ErrorEffect,
    Int8Speed,
    Int8Weights,
    Link,
    ModelSpec,
    Problem,
    ProblemError,
    Segment,
    combine_effects,
    error_share,
    error_units,
    load_problem,
    parse_error_budget,
    profiled_microbatches,
    save_problem,
    segment_seconds,
)
from edgepipe.planner.solver import solve
from planner_testlib import vit_like


def _problem(**changes) -> Problem:
    model = ModelSpec("m", "ab" * 32, 100, (Segment("input", 10, 5, 20, 1e9), Segment("blocks.1", 10, 5, 4, 3e9)))
    base = dict(
        model=model,
        device_types=(DeviceType("fast", gflops=10.0), DeviceType("measured", profiles={8: (0.5, 1.5), 16: (0.9, 2.8)}),
                      DeviceType("half", reference="fast", speed=0.5)),
        devices=(Device("a", "fast", 1 << 30, 1000.0, "tcp://10.0.0.1:5555"), Device("b", "measured", 1 << 30, 100.0),
                 Device("c", "half", 1 << 30, 100.0)),
        links=(Link("a", "b", 50.0, 0.002),),
        microbatch=8,
        client_bandwidth_mbps=1000.0,
    )
    base.update(changes)
    return Problem(**base)


def test_problem_json_round_trip(tmp_path) -> None:
    problem = _problem()
    path = save_problem(problem, tmp_path / "p.json")
    again = load_problem(path)
    assert again == problem
    assert again.sha256() == problem.sha256()
    raw = json.loads(path.read_text())
    assert raw["format"] == "edgepipe.problem" and raw["format_version"] == 2
    assert raw["device_types"][1]["profiles"] == {"8": [0.5, 1.5], "16": [0.9, 2.8]}
    # without lossy choices or comm costs, a problem is written as version 1 was, plus two fields
    assert "codecs" not in raw["model"]["segments"][0] and "comm" not in raw["device_types"][0]
    assert raw["max_error"] is None and raw["secure"] is True


def test_segment_seconds_resolves_profile_reference_and_gflops() -> None:
    problem = _problem()
    np.testing.assert_allclose(segment_seconds(problem, "measured", 8), [0.5, 1.5])
    np.testing.assert_allclose(segment_seconds(problem, "fast", 8), [0.8, 2.4])  # flops * 8 / 10e9
    np.testing.assert_allclose(segment_seconds(problem, "half", 8), [1.6, 4.8])  # fast's, at half speed
    with pytest.raises(ProblemError, match=r"'measured': no profile for microbatch 4 \(profiled sizes: 8, 16\)"):
        segment_seconds(problem, "measured", 4)
    assert profiled_microbatches(problem) == (8, 16)  # gflops types work at any size


def test_problem_sha256_changes_with_content() -> None:
    assert _problem().sha256() != _problem(client_bandwidth_mbps=None).sha256()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: replace(p, devices=(*p.devices, Device("a", "fast", 1, 1.0))),
         r"devices\[3\] \('a'\).name: duplicate"),
        (lambda p: replace(p, devices=(Device("x", "nope", 1, 1.0),)),
         r"devices\[0\] \('x'\).type: unknown device type"),
        (lambda p: replace(p, devices=(Device("x", "fast", 0, 1.0),)), r"memory_bytes: must be a positive integer"),
        (lambda p: replace(p, devices=(Device("x", "fast", 5, -1.0),)), r"bandwidth_mbps: must be a positive"),
        (lambda p: replace(p, links=(Link("a", "zz", 1.0),)), r"links\[0\] \('a', 'zz'\).b: unknown device 'zz'"),
        (lambda p: replace(p, links=(Link("a", "b", 1.0), Link("b", "a", 2.0))), r"links\[1\].*duplicate link"),
        (lambda p: replace(p, links=(Link("a", "b", 1.0, -0.1),)), r"latency_s: must be seconds >= 0"),
        (lambda p: replace(p, microbatch=0), r"microbatch: must be an integer >= 1 or null"),
        (lambda p: replace(p, queue_depth=0), r"queue_depth: must be an integer >= 1"),
        (lambda p: replace(p, device_types=(*p.device_types[:2], DeviceType("half", reference="half"))),
         r"reference: cycle half -> half"),
        (lambda p: replace(p, device_types=(DeviceType("fast", gflops=1.0, speed=2.0), *p.device_types[1:])),
         r"speed: is relative to a reference type"),
        (lambda p: replace(p, device_types=(p.device_types[0], DeviceType("measured", profiles={8: (1.0,)}),
                                            p.device_types[2])),
         r"device_types\[1\] \('measured'\).profiles\[8\]: has 1 entries, the model has 2 segments"),
        (lambda p: replace(p, model=replace(p.model, segments=(Segment("input", -1, 0, 0, 0.0),))),
         r"model.segments\[0\] \('input'\).weight_bytes: must be an integer >= 0, got -1"),
        (lambda p: replace(p, model=replace(p.model, segments=(Segment("x", 1, 1, 1, 1.0),) * 2)),
         r"model.segments\[1\] \('x'\).name: duplicate segment name"),
    ],
)
def test_bad_problem_names_the_field(change, message) -> None:
    with pytest.raises(ProblemError, match=message):
        change(_problem())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(format="edgepipe.plan"), r"not an EdgePipe problem file"),
        (lambda r: r.update(format_version=3), r"format_version 3 is not supported"),
        (lambda r: r["devices"][1].pop("memory_bytes"), r"devices\[1\].memory_bytes: missing"),
        (lambda r: r["devices"][0].update(memory_bytes="8 GiB"), r"devices\[0\].memory_bytes: expected an integer"),
        (lambda r: r["device_types"][1]["profiles"].update(big=[1, 2]), r"profiles: key 'big' is not a microbatch"),
        (lambda r: r.update(devices={}), r"devices: expected a list"),
    ],
)
def test_bad_problem_json_names_file_and_field(tmp_path, edit, message) -> None:
    raw = json.loads(_problem().to_json())
    edit(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ProblemError, match=rf"{path}: .*{message}"):
        load_problem(path)


def test_unreadable_problem_file(tmp_path) -> None:
    with pytest.raises(ProblemError, match="cannot read problem file"):
        load_problem(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{nope")
    with pytest.raises(ProblemError, match="not valid JSON"):
        load_problem(tmp_path / "junk.json")


def test_plan_json_round_trip(tmp_path) -> None:
    problem = Problem(vit_like(blocks=2), (DeviceType("t", gflops=50.0),),
                      tuple(Device(f"d{i}", "t", 1 << 30, 1000.0) for i in range(3)), microbatch=4)
    plan = solve(problem)
    again = load_plan(save_plan(plan, tmp_path / "plan.json"))
    assert again == plan
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert raw["format"] == "edgepipe.plan" and raw["format_version"] == 2
    assert raw["stages"][0]["cut_in"] is None and raw["stages"][-1]["cut_out"] is None
    assert raw["problem_sha256"] == problem.sha256()


def test_plan_with_no_bound_or_infinite_rate_round_trips(tmp_path) -> None:
    problem = Problem(vit_like(blocks=1), (DeviceType("t", profiles={1: (0.0,) * 4}),),
                      (Device("d", "t", 1 << 30, 1000.0),), microbatch=1)
    plan = replace(solve(problem), lower_bound_s=math.nan)
    assert plan.throughput == math.inf
    text = plan.to_json()
    assert json.loads(text)["throughput"] is None and json.loads(text)["lower_bound_s"] is None
    again = Plan.from_json(text)
    assert again.throughput == math.inf and math.isnan(again.lower_bound_s)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["stages"][1].update(first_segment=r["stages"][1]["first_segment"] + 1),
         r"stages\[1\].first_segment: must equal stages\[0\].end_segment"),
        (lambda r: r["stages"][1].update(replicas=r["stages"][0]["replicas"], device=r["stages"][0]["device"]),
         r"more than one stage"),
        (lambda r: r["stages"][1].update(device="elsewhere"), r"must be the first replica"),
        (lambda r: r["stages"][0]["replicas"].append({"device": "d9", "weight": 0.5}),
         r"weights must be positive and sum"),
        (lambda r: r["stages"][-1].update(codec_out="fp16"), r"the last stage sends results raw"),
        (lambda r: r["stages"][0].update(codec_out="zip"), r"codec_out: 'zip' is not one of raw, fp16, int8"),
        (lambda r: r.update(bottleneck=99), r"bottleneck: 99 is not a stage index"),
        (lambda r: r.update(format_version=7), r"plan format_version 7 is not supported"),
        (lambda r: r.pop("stages"), r"malformed plan field"),
    ],
)
def test_bad_plan_is_refused(tmp_path, edit, message) -> None:
    problem = Problem(vit_like(blocks=2), (DeviceType("t", gflops=50.0),),
                      tuple(Device(f"d{i}", "t", 1 << 30, 1000.0) for i in range(3)), microbatch=4)
    raw = json.loads(solve(problem, max_replicas=1).to_json())
    assert len(raw["stages"]) >= 2
    edit(raw)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(PlanError, match=message):
        load_plan(path)


def _v2_problem() -> Problem:
    effect = ErrorEffect(0.004, 0.9999, 0.995)
    segs = (Segment("input", 4000, 50, 800, 1e9, (CutCodec("fp16", 400, effect), CutCodec("int8", 220, effect)),
                    Int8Weights(1000, effect)),
            Segment("blocks.1", 4000, 50, 800, 1e9, (), Int8Weights(1000, ErrorEffect(0.01, 0.999, 0.99))),
            Segment("blocks.2", 4000, 50, 40, 1e9))
    fast = DeviceType("fast", gflops=10.0, int8=Int8Speed(gflops=20.0), comm_share=0.5,
                      comm=(CommCost("raw", True, 1e-4, 1e-9, 2e-4, 2e-9),
                            CommCost("fp16", True, 1e-4, 2e-9, 2e-4, 3e-9)))
    half = DeviceType("half", reference="fast", speed=0.5, int8=Int8Speed(profiles={8: (0.1, 0.1, 0.1)}))
    devices = (Device("a", "fast", 1 << 30, 1.0), Device("b", "fast", 1 << 30, 1.0), Device("c", "half", 1 << 30, 1.0))
    return Problem(ModelSpec("m", "", 800, segs), (fast, half), devices, microbatch=8, client_bandwidth_mbps=100.0,
                   max_error=ErrorBudget(max_abs_diff=0.02, cosine=0.999), secure=True)


def test_problem_v2_round_trip_and_v1_files_still_read(tmp_path) -> None:
    problem = _v2_problem()
    again = load_problem(save_problem(problem, tmp_path / "p.json"))
    assert again == problem and again.sha256() == problem.sha256()
    raw = json.loads((tmp_path / "p.json").read_text())
    assert raw["model"]["segments"][0]["codecs"]["fp16"] == {"out_bytes": 400, "max_abs_diff": 0.004,
                                                             "cosine": 0.9999, "top1_agreement": 0.995}
    assert raw["device_types"][0]["comm"]["share"] == 0.5
    # a version 1 file is a version 2 file without the new fields
    v1 = json.loads(_problem().to_json())
    v1["format_version"] = 1
    for key in ("max_error", "secure"):
        v1.pop(key)
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    assert load_problem(tmp_path / "v1.json") == _problem()


def test_comm_costs_copied_verbatim_from_a_device_profile(tmp_path) -> None:
    # the profiler's comm object carries how it measured; the planner reads costs and share only
    raw = json.loads(_v2_problem().to_json())
    raw["device_types"][0]["comm"].update(message_bytes=[1024, 1048576], compute_alone_s=1.0,
                                          compute_with_comm_s=1.2, comm_cpu_s=0.4)
    (tmp_path / "p.json").write_text(json.dumps(raw))
    assert load_problem(tmp_path / "p.json") == _v2_problem()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["model"]["segments"][0]["codecs"].update(zip={"out_bytes": 1, "max_abs_diff": 0, "cosine": 1}),
         r"model.segments\[0\] \('input'\).codecs: unknown codec 'zip'"),
        (lambda r: r["model"]["segments"][2].update(codecs={"fp16": {"out_bytes": 1, "max_abs_diff": 0, "cosine": 1}}),
         r"segments\[2\].*codecs.fp16: the last segment's output goes to the client raw"),
        (lambda r: r["model"]["segments"][0]["codecs"]["fp16"].update(cosine=1.5),
         r"codecs.fp16.cosine: must be a number in \[-1, 1\]"),
        (lambda r: r["model"]["segments"][0]["codecs"]["fp16"].pop("max_abs_diff"),
         r"codecs.fp16.max_abs_diff: missing"),
        (lambda r: r["model"]["segments"][1]["int8"].update(weight_bytes=-5),
         r"segments\[1\] \('blocks.1'\).int8.weight_bytes: must be an integer >= 0"),
        (lambda r: r["device_types"][0]["comm"].update(share=-0.5), r"\(.fast.\).comm.share: must be"),
        (lambda r: r["device_types"][0]["comm"]["costs"][0].update(codec="gzip"),
         r"comm.costs\[0\].codec: must be one of"),
        (lambda r: r["device_types"][0]["comm"]["costs"][1].update(codec="raw"), r"comm.costs\[1\]: duplicate entry"),
        (lambda r: r["device_types"][0]["comm"]["costs"][0].update(send_per_byte_s=-1), r"send_per_byte_s: must be"),
        (lambda r: r["device_types"][1]["int8"]["profiles"].update({"8": [1.0]}),
         r"device_types\[1\] \('half'\).int8.profiles\[8\]: has 1 entries, the model has 3 segments"),
        (lambda r: r.update(max_error={"max_abs_diff": None, "cosine": None}), r"max_error: give at least one of"),
        (lambda r: r.update(max_error={"cosine": 2.0}), r"max_error.cosine: must be a number in \[-1, 1\]"),
        (lambda r: r.update(secure="yes"), r"secure: expected true or false"),
        (lambda r: (r.update(max_error={"top1_agreement": 0.99}),
                    r["model"]["segments"][1]["int8"].update(top1_agreement=None)),
         r"max_error.top1_agreement: model.segments\[1\] \('blocks.1'\).int8 has no top1_agreement"),
    ],
)
def test_bad_v2_problem_names_the_field(tmp_path, edit, message) -> None:
    raw = json.loads(_v2_problem().to_json())
    edit(raw)
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ProblemError, match=message):
        load_problem(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("text", "budget"),
    [("0.05", ErrorBudget(max_abs_diff=0.05)), ("cosine=0.999", ErrorBudget(cosine=0.999)),
     ("max_abs=0.01, cosine=0.9999,top1=0.99", ErrorBudget(0.01, 0.9999, 0.99))],
)
def test_error_budget_flag(text, budget) -> None:
    assert parse_error_budget(text) == budget


@pytest.mark.parametrize(
    ("text", "message"),
    [("lots", r"--max-error: max_abs='lots' is not a number"), ("psnr=30", r"unknown measure 'psnr'"),
     ("cosine=1.5", r"--max-error.cosine: must be a number in \[-1, 1\]"), ("top1=-1", r"top1_agreement: must be")],
)
def test_bad_error_budget_flag(text, message) -> None:
    with pytest.raises(ProblemError, match=message):
        parse_error_budget(text)


def test_error_shares_follow_the_documented_rule() -> None:
    budget = ErrorBudget(max_abs_diff=0.02, cosine=math.cos(0.04))
    # max|Δ| uses half of its limit, the angle a quarter: the item's share is the larger
    assert error_share(ErrorEffect(0.01, math.cos(0.01)), budget) == pytest.approx(0.5)
    assert error_share(ErrorEffect(0.001, math.cos(0.03)), budget) == pytest.approx(0.75)
    assert error_units(ErrorEffect(0.03, 1.0), budget) == math.inf  # alone over the budget
    # combined: |Δ| adds, angles add, top-1 disagreements add
    both = combine_effects([ErrorEffect(0.01, math.cos(0.01), 0.99), ErrorEffect(0.005, math.cos(0.02), 0.98)])
    assert both.max_abs_diff == pytest.approx(0.015)
    assert both.cosine == pytest.approx(math.cos(0.03))
    assert both.top1_agreement == pytest.approx(0.97)


def test_plan_v2_round_trip_and_v1_plans_still_read(tmp_path) -> None:
    problem = _v2_problem()
    plan = make_plan(problem, 8, [Placement(("a", "b"), 0, 1, "fp16", True), Placement(("c",), 1, 3)],
                     solver="hand")
    assert plan.stages[0].replicas == (Replica("a", 0.5), Replica("b", 0.5))
    assert plan.devices == ("a", "b", "c") and plan.stages[0].device == "a"
    assert plan.predicted_error is not None and plan.stages[0].error is not None
    again = load_plan(save_plan(plan, tmp_path / "plan.json"))
    assert again == plan
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert raw["stages"][0]["device"] == "a" and raw["stages"][0]["codec_out"] == "fp16"
    # version 1: "device" only, no comm/time/codec fields
    v1 = json.loads(solve(_problem(), max_replicas=1).to_json())
    v1["format_version"] = 1
    for stage in v1["stages"]:
        for key in ("replicas", "comm_s", "time_s", "codec_out", "int8_weights", "error"):
            stage.pop(key)
    for key in ("predicted_error", "max_error", "throughput_slack"):
        v1.pop(key)
    old = Plan.from_dict(v1)
    assert [s.devices for s in old.stages] == [(s["device"],) for s in v1["stages"]]
    assert all(s.time_s == max(s.compute_s, s.send_s) and s.codec_out == "raw" for s in old.stages)
