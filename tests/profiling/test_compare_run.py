"""`--from-run` compares the run's plan with the best one: the run's plan must be re-costed as it ran,
every replica (with its weight), each hop's codec and its int8 stages, not just each stage's first
device in raw fp32 (pure: no devices needed)."""

from __future__ import annotations

import math

import pytest
from edgepipe.agent.client.trace import Run
from edgepipe.compiler.planning import compare_with_run, comparison_lines
from edgepipe.planner.cost import Placement, evaluate, make_plan
from edgepipe.planner.problem import (
    CutCodec,
    Device,
    DeviceType,
    ErrorBudget,
    ErrorEffect,
    Int8Speed,
    Int8Weights,
    ModelSpec,
    Problem,
    Segment,
)


def _problem() -> Problem:
    effect = ErrorEffect(0.001, 0.99999, 1.0)
    segments = (
        Segment("a", 4000, 100, 40_000, 4e9, (CutCodec("fp16", 20_000, effect),), Int8Weights(1000, effect)),
        Segment("b", 4000, 100, 40_000, 4e9, (CutCodec("int8", 10_000, effect),), Int8Weights(1000, effect)),
        Segment("c", 4000, 100, 400, 4e9, (), Int8Weights(1000, effect)),
    )
    model = ModelSpec("m", "0" * 64, 40_000, segments)
    types = (DeviceType("fast", gflops=8.0, int8=Int8Speed(gflops=16.0)),
             DeviceType("slow", gflops=2.0, int8=Int8Speed(gflops=4.0)))
    devices = (Device("f", "fast", 2**30, 1000.0), Device("g", "fast", 2**30, 1000.0),
               *(Device(f"s{i}", "slow", 2**30, 5.0) for i in (1, 2, 3)))
    return Problem(model, types, devices, microbatch=2, client_bandwidth_mbps=1000.0,
                   max_error=ErrorBudget(max_abs_diff=0.1))


def test_the_runs_plan_keeps_its_replicas_codecs_and_int8_stages() -> None:
    problem = _problem()
    ran = make_plan(problem, 2, [Placement(("f",), 0, 1, "fp16"),
                                 Placement(("s1", "s2", "s3"), 1, 2, "int8", int8=True),
                                 Placement(("g",), 2, 3)], solver="hand")
    naive = evaluate(problem, 2, [(s.device, s.first_segment, s.end_segment) for s in ran.stages])
    assert not math.isclose(naive.throughput, ran.throughput)  # what the comparison used to see
    run = Run(microbatches=(), batch=2, plan=ran.to_dict())
    best = make_plan(problem, 2, [Placement(("s1", "s2", "s3"), 0, 3, int8=True)], solver="hand")
    found = compare_with_run(problem, run, best)
    assert found.run_plan_throughput == pytest.approx(ran.throughput, rel=1e-12)
    assert found.faster_pct == pytest.approx((best.throughput / ran.throughput - 1) * 100)
    lines = comparison_lines(found, tolerance_pct=-math.inf)
    assert "s{1,2,3} ×3[0:3] (int8 weights)" in lines[-1]
