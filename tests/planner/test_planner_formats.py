"""Problem and plan files: round trips, and bad input named precisely."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from edgepipe.planner.plan import Plan, PlanError, load_plan, save_plan
from edgepipe.planner.problem import (
    Device,
    DeviceType,
    Link,
    ModelSpec,
    Problem,
    ProblemError,
    Segment,
    load_problem,
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
    assert raw["format"] == "edgepipe.problem" and raw["format_version"] == 1
    assert raw["device_types"][1]["profiles"] == {"8": [0.5, 1.5], "16": [0.9, 2.8]}


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
        (lambda r: r.update(format_version=2), r"format_version 2 is not supported"),
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
    assert raw["format"] == "edgepipe.plan" and raw["format_version"] == 1
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
        (lambda r: r["stages"][1].update(device=r["stages"][0]["device"]), r"more than one stage"),
        (lambda r: r.update(bottleneck=99), r"bottleneck: 99 is not a stage index"),
        (lambda r: r.update(format_version=7), r"plan format_version 7 is not supported"),
        (lambda r: r.pop("stages"), r"malformed plan field"),
    ],
)
def test_bad_plan_is_refused(tmp_path, edit, message) -> None:
    problem = Problem(vit_like(blocks=2), (DeviceType("t", gflops=50.0),),
                      tuple(Device(f"d{i}", "t", 1 << 30, 1000.0) for i in range(3)), microbatch=4)
    raw = json.loads(solve(problem).to_json())
    assert len(raw["stages"]) >= 2
    edit(raw)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(PlanError, match=message):
        load_plan(path)
