"""Compression, replication and int8 weights against brute force: every sequence of stages on
devices or groups of interchangeable devices, every codec per hop and every weight variant, on
random small problems (<= 4 devices, <= 4 segments) with comm costs and error budgets."""

from __future__ import annotations

import math

import pytest
from edgepipe.planner.problem import Problem, profiled_microbatches
from edgepipe.planner.solver import InfeasibleError, solve
from hypothesis import HealthCheck, given, settings
from planner_testlib import TOL, brute_force, evaluate, small_v2_problems

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _sizes(problem: Problem) -> list[int]:
    return [problem.microbatch] if problem.microbatch is not None else list(profiled_microbatches(problem))


def _check_against_brute_force(problem: Problem, max_replicas: int, slack: float) -> None:
    sizes = _sizes(problem)
    best = brute_force(problem, sizes, max_replicas=max_replicas, slack=slack) if sizes else None
    if best is None:
        with pytest.raises((InfeasibleError, ValueError)):
            solve(problem, method="exact", max_replicas=max_replicas, throughput_slack=slack)
        return
    plan = solve(problem, method="exact", max_replicas=max_replicas, throughput_slack=slack)
    assert plan.optimal and plan.solver == "exact-dp"
    stages = [(s.devices, s.first_segment, s.end_segment, s.codec_out, s.int8_weights) for s in plan.stages]
    ref = evaluate(problem, plan.microbatch, stages)
    assert ref is not None and ref.fits and plan.fits
    # the plan is as good as the best of all, in the objective's order
    assert ref.error_units == best.error_units
    assert plan.latency_s == pytest.approx(best.latency_s, rel=1e-7, abs=1e-12)
    assert len(plan.devices) == best.n_devices
    top = max(1e-300, plan.microbatch / best.bottleneck_s if best.bottleneck_s else math.inf)
    assert plan.throughput * (1 + slack) * (1 + 1e-7) >= min(top, best.throughput)
    # and every number it reports is the independent reading of the cost model
    assert plan.bottleneck_s == pytest.approx(ref.bottleneck_s, rel=TOL, abs=1e-12)
    assert plan.latency_s == pytest.approx(ref.latency_s, rel=TOL, abs=1e-12)
    for stage, (compute, send, memory), time_s, comm in zip(plan.stages, ref.stages, ref.times, ref.comm, strict=True):
        assert stage.compute_s == pytest.approx(compute, rel=TOL, abs=1e-12)
        assert stage.send_s == pytest.approx(send, rel=TOL, abs=1e-12)
        assert stage.comm_s == pytest.approx(comm, rel=TOL, abs=1e-12)
        assert stage.time_s == pytest.approx(time_s, rel=TOL, abs=1e-12)
        assert stage.memory_bytes == memory
    assert plan.stages[-1].codec_out == "raw"


@SETTINGS
@given(small_v2_problems())
def test_codecs_int8_and_comm_costs_equal_brute_force(problem: Problem) -> None:
    _check_against_brute_force(problem, max_replicas=1, slack=0.0)


@SETTINGS
@given(small_v2_problems())
def test_replication_equals_brute_force(problem: Problem) -> None:
    _check_against_brute_force(problem, max_replicas=3, slack=0.0)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(small_v2_problems())
def test_throughput_slack_equals_brute_force(problem: Problem) -> None:
    _check_against_brute_force(problem, max_replicas=2, slack=0.05)
