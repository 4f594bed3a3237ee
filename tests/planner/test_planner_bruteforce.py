"""The solver against brute force: every ordered choice of devices (and groups of interchangeable
devices) and every split of the segments, on random small problems (<= 5 devices, <= 7 segments).
Pipeline only with no slack is the version 1 planner's objective; the defaults replicate and
count plans within 1% of the best throughput as equally fast."""

from __future__ import annotations

import math

import pytest
from edgepipe.planner.baselines import all_baselines
from edgepipe.planner.problem import Problem, ProblemError, profiled_microbatches
from edgepipe.planner.solver import InfeasibleError, solve
from hypothesis import HealthCheck, given, settings
from planner_testlib import TOL, brute_force, evaluate, seconds, small_problems

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _sizes(problem: Problem) -> list[int]:
    return [problem.microbatch] if problem.microbatch is not None else list(profiled_microbatches(problem))


def _assert_reported_numbers_are_right(problem, plan) -> None:
    placements = [(s.devices, s.first_segment, s.end_segment, s.codec_out, s.int8_weights) for s in plan.stages]
    ref = evaluate(problem, plan.microbatch, placements)
    assert ref is not None and ref.fits and plan.fits
    assert plan.bottleneck_s == pytest.approx(ref.bottleneck_s, rel=TOL, abs=1e-12)
    assert plan.latency_s == pytest.approx(ref.latency_s, rel=TOL, abs=1e-12)
    assert plan.client_in_s == pytest.approx(ref.client_in_s, rel=TOL, abs=1e-12)
    for stage, (compute, send, memory), time_s in zip(plan.stages, ref.stages, ref.times, strict=True):
        assert stage.compute_s == pytest.approx(compute, rel=TOL, abs=1e-12)
        assert stage.send_s == pytest.approx(send, rel=TOL, abs=1e-12)
        assert stage.time_s == pytest.approx(time_s, rel=TOL, abs=1e-12)
        assert stage.memory_bytes == memory
        assert stage.memory_capacity == min(problem.device(d).memory_bytes for d in stage.devices)
    expected = plan.microbatch / ref.bottleneck_s if ref.bottleneck_s > 0 else math.inf
    assert plan.throughput == pytest.approx(expected, rel=TOL)
    n = len(problem.model.segments)
    assert [s.cut_in for s in plan.stages] == [None] + [problem.model.segments[s.first_segment].name
                                                      for s in plan.stages[1:]]
    assert plan.stages[-1].cut_out is None and plan.stages[-1].end_segment == n


MODES = [pytest.param(1, 0.0, id="pipeline-only"), pytest.param(2, 0.01, id="replicas-and-slack")]


@pytest.mark.parametrize(("replicas", "slack"), MODES)
@SETTINGS
@given(problem=small_problems())
def test_exact_solver_equals_brute_force(problem: Problem, replicas: int, slack: float) -> None:
    sizes = _sizes(problem)
    best = brute_force(problem, sizes, max_replicas=replicas, slack=slack) if sizes else None
    if best is None:
        with pytest.raises((InfeasibleError, ValueError)):
            solve(problem, method="exact", max_replicas=replicas, throughput_slack=slack)
        return
    plan = solve(problem, method="exact", max_replicas=replicas, throughput_slack=slack)
    assert plan.optimal and plan.solver == "exact-dp"
    if slack == 0:
        assert plan.throughput == pytest.approx(best.throughput, rel=1e-7)
    assert plan.latency_s == pytest.approx(best.latency_s, rel=1e-7, abs=1e-12)
    assert len(plan.devices) == best.n_devices
    assert plan.lower_bound_s <= plan.bottleneck_s * (1 + TOL) <= plan.lower_bound_s * (1 + slack) * (1 + 2 * TOL)
    if slack == 0:
        assert plan.lower_bound_s == pytest.approx(plan.bottleneck_s, rel=TOL)
    _assert_reported_numbers_are_right(problem, plan)
    assert set(plan.left_out) == {d.name for d in problem.devices} - set(plan.devices)


@pytest.mark.parametrize(("replicas", "slack"), MODES)
@SETTINGS
@given(problem=small_problems())
def test_heuristic_is_feasible_and_its_bound_is_a_bound(problem: Problem, replicas: int, slack: float) -> None:
    if problem.microbatch is None:
        return
    best = brute_force(problem, [problem.microbatch], max_replicas=replicas)
    if best is None:
        with pytest.raises(InfeasibleError):
            solve(problem, method="heuristic", max_replicas=replicas, throughput_slack=slack)
        return
    plan = solve(problem, method="heuristic", max_replicas=replicas, throughput_slack=slack)
    _assert_reported_numbers_are_right(problem, plan)
    assert plan.bottleneck_s >= best.bottleneck_s * (1 - TOL)
    assert plan.lower_bound_s <= best.bottleneck_s * (1 + TOL)
    if plan.optimal:
        assert plan.bottleneck_s <= best.bottleneck_s * (1 + slack) * (1 + 1e-7)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(small_problems())
def test_baselines_are_judged_by_the_true_cost_model(problem: Problem) -> None:
    sizes = _sizes(problem)
    if not sizes:
        return
    if all(seconds(problem, d.type, sizes[0]) is None for d in problem.devices):
        with pytest.raises(ProblemError, match=r"no.* compute figures"):
            all_baselines(problem, sizes[0])
        return
    best = brute_force(problem, sizes[:1])
    for name, plan in all_baselines(problem, sizes[0]).items():
        placements = [(s.device, s.first_segment, s.end_segment) for s in plan.stages]
        ref = evaluate(problem, sizes[0], placements)
        assert ref is not None, name
        assert plan.solver == name and not plan.optimal
        assert plan.fits == ref.fits
        assert plan.bottleneck_s == pytest.approx(ref.bottleneck_s, rel=TOL, abs=1e-12)
        assert plan.latency_s == pytest.approx(ref.latency_s, rel=TOL, abs=1e-12)
        if plan.fits:  # a baseline that fits can never beat the optimum
            assert best is not None and plan.throughput <= best.throughput * (1 + TOL)
