"""The simulator: the steady-state prediction, the discrete run through bounded queues, and what-if."""

from __future__ import annotations

from dataclasses import replace

import pytest
from edgepipe.planner.cluster import load_cluster, problem_for
from edgepipe.planner.cost import Placement, make_plan
from edgepipe.planner.problem import CommCost, Device, DeviceType, Problem
from edgepipe.planner.simulate import simulate, steady_state
from edgepipe.planner.solver import solve
from planner_testlib import EXAMPLES, evaluate, vit_like


def test_one_microbatch_takes_the_plans_latency(paper_problem) -> None:
    plan = solve(paper_problem)
    run = simulate(paper_problem, plan, n_microbatches=1)
    assert run.latency_s == pytest.approx(plan.latency_s, rel=1e-12)
    assert run.makespan_s == pytest.approx(plan.latency_s, rel=1e-12)


@pytest.mark.parametrize("client", [None, 1000.0, 0.01])
def test_a_long_run_settles_at_the_steady_state_rate(paper_problem, client) -> None:
    problem = replace(paper_problem, client_bandwidth_mbps=client)
    plan = solve(problem)
    run = simulate(problem, plan, n_microbatches=200)
    assert run.throughput == pytest.approx(plan.throughput, rel=1e-9)
    if client == 0.01:
        assert plan.bottleneck == -1  # the client link sets the pace, and the run agrees


def test_deeper_queues_hold_more_work_in_flight_not_more_speed(paper_problem) -> None:
    # clients that flood the pipeline wait in its queues: deeper queues, longer latency, same rate
    plan = solve(paper_problem)
    shallow = simulate(paper_problem, plan, n_microbatches=120, queue_depth=1)
    deep = simulate(paper_problem, plan, n_microbatches=120, queue_depth=4)
    assert shallow.throughput == pytest.approx(deep.throughput, rel=1e-9)
    assert deep.latency_s > shallow.latency_s > plan.latency_s


def test_steady_state_answers_what_if(paper_problem) -> None:
    plan = solve(paper_problem)
    now = steady_state(paper_problem, plan)
    assert (now.throughput, now.latency_s, now.bottleneck) == (plan.throughput, plan.latency_s, plan.bottleneck)
    # the same plan on 5 Mbps links: every send is 200 times slower
    slow = replace(paper_problem, devices=tuple(replace(d, bandwidth_mbps=5.0) for d in paper_problem.devices))
    then = steady_state(slow, plan)
    ref = evaluate(slow, plan.microbatch, [(s.devices, s.first_segment, s.end_segment) for s in plan.stages])
    assert then.throughput == pytest.approx(plan.microbatch / ref.bottleneck_s, rel=1e-9)
    assert then.throughput < now.throughput
    # and re-planning for the slow links does better than keeping the old plan
    assert solve(slow).throughput > then.throughput


def test_bad_arguments() -> None:
    problem = Problem(vit_like(blocks=1), (DeviceType("t", gflops=1.0),), (Device("d", "t", 2**30, 10.0),))
    plan = solve(problem)
    with pytest.raises(ValueError, match="n_microbatches"):
        simulate(problem, plan, n_microbatches=0)
    with pytest.raises(ValueError, match="queue_depth"):
        simulate(problem, plan, queue_depth=0)


def _with_comm(problem: Problem, share: float) -> Problem:
    cost = (CommCost("raw", True, recv_per_message_s=0.002, recv_per_byte_s=2e-9, send_per_message_s=0.003,
                     send_per_byte_s=3e-9),)
    return replace(problem, device_types=tuple(replace(t, comm=cost, comm_share=share) for t in problem.device_types))


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_replicas_and_comm_costs_in_the_run_match_the_plan(share) -> None:
    cluster = load_cluster(EXAMPLES / "fast-and-slow.toml")
    problem = _with_comm(problem_for(cluster, vit_like(blocks=6, width=256, tokens=65), 8), share)
    plan = solve(problem, throughput_slack=0)
    assert any(len(s.replicas) > 1 for s in plan.stages) and any(s.comm_s > 0 for s in plan.stages)
    one = simulate(problem, plan, n_microbatches=1)
    assert one.latency_s == pytest.approx(plan.latency_s, rel=1e-12)
    run = simulate(problem, plan, n_microbatches=240)
    assert run.throughput == pytest.approx(plan.throughput, rel=1e-9)


def test_unequal_replicas_share_microbatches_by_speed() -> None:
    types = (DeviceType("fast", gflops=2.0), DeviceType("slow", gflops=1.0))
    devices = (Device("f", "fast", 2**30, 1000.0), Device("s", "slow", 2**30, 1000.0))
    problem = Problem(vit_like(blocks=2), types, devices, microbatch=4)
    plan = make_plan(problem, 4, [Placement(("f", "s"), 0, len(problem.model.segments))], solver="hand")
    assert [r.weight for r in plan.stages[0].replicas] == pytest.approx([2 / 3, 1 / 3])
    # together they do what one device three times as fast as the slow one would
    slow_alone = make_plan(problem, 4, [("s", 0, len(problem.model.segments))], solver="hand")
    assert plan.throughput == pytest.approx(3 * slow_alone.throughput)
    run = simulate(problem, plan, n_microbatches=600)
    assert run.throughput == pytest.approx(plan.throughput, rel=5e-3)
