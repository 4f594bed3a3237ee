"""The baselines follow their own rules, and are judged by our cost model."""

from __future__ import annotations

from dataclasses import replace

import pytest
from edgepipe.planner.baselines import even_split, memory_proportional, pipedream
from edgepipe.planner.explain import explain_dict
from edgepipe.planner.problem import Device, DeviceType, Problem
from edgepipe.planner.solver import solve
from planner_testlib import vit_like

GIB = 2**30


def test_even_split_uses_devices_in_listed_order(paper_problem) -> None:
    plan = even_split(paper_problem)
    assert plan.devices == tuple(d.name for d in paper_problem.devices)
    sizes = [s.end_segment - s.first_segment for s in plan.stages]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(paper_problem.model.segments)


def test_memory_proportional_gives_big_devices_more(paper_problem) -> None:
    plan = memory_proportional(paper_problem)
    sizes = {s.device: s.end_segment - s.first_segment for s in plan.stages}
    assert plan.devices[:12] == tuple(d.name for d in paper_problem.devices if d.type != "minnow")  # 8 GiB first
    assert min(v for k, v in sizes.items() if not k.startswith("minnow")) >= 3 * max(
        v for k, v in sizes.items() if k.startswith("minnow"))


def test_pipedream_is_optimal_when_its_assumption_holds() -> None:
    same = Problem(vit_like(blocks=6, width=256, tokens=65), (DeviceType("t", gflops=10.0),),
                   tuple(Device(f"d{i}", "t", GIB, 1000.0) for i in range(5)), microbatch=8)
    # PipeDream's partitioner is optimal for a pipeline of identical workers (one per stage); with
    # replicas or a throughput slack allowed, ours may do better or trade a little for latency
    pipeline = solve(same, max_replicas=1, throughput_slack=0)
    assert pipedream(same).throughput == pytest.approx(pipeline.throughput, rel=1e-9)
    assert solve(same, throughput_slack=0).throughput >= pipeline.throughput * (1 - 1e-9)


def test_pipedream_is_blind_to_slower_devices() -> None:
    types = (DeviceType("fast", gflops=20.0), DeviceType("slow", reference="fast", speed=0.25))
    devices = (*(Device(f"f{i}", "fast", GIB, 1000.0) for i in range(3)), Device("s0", "slow", GIB, 1000.0))
    problem = Problem(vit_like(blocks=6, width=256, tokens=65), types, devices, microbatch=8)
    blind = pipedream(problem)
    assert blind.bottleneck == 3  # the slow board got a full share and sets the pace
    assert solve(problem).throughput > 2 * blind.throughput


def test_a_baseline_that_does_not_fit_is_reported_not_raised() -> None:
    # one device has little memory beside the 100 MiB runtime: a third of the 75 MB model overloads it
    small = Device("small", "t", 110 * 2**20, 1000.0)
    devices = (small, *(Device(f"big{i}", "t", 4 * GIB, 1000.0) for i in range(2)))
    model = vit_like(blocks=6, width=512, tokens=65)
    problem = Problem(model, (DeviceType("t", gflops=10.0),), devices, microbatch=8)
    naive = even_split(problem)
    assert not naive.fits
    ours = solve(problem)
    assert ours.fits
    row = explain_dict(problem, ours, {"even-split": naive})["baselines"][0]
    assert row["fits"] is False and row["ratio"] is None
    assert row["overflow"].startswith("stage 0 on small needs")


def test_baselines_skip_devices_without_compute_figures(paper_problem) -> None:
    odd = DeviceType("odd", profiles={4: (1.0,) * len(paper_problem.model.segments)})
    problem = replace(paper_problem, device_types=(*paper_problem.device_types, odd),
                      devices=(*paper_problem.devices, Device("odd-1", "odd", GIB, 1000.0)))
    for rule in (even_split, pipedream, memory_proportional):
        plan = rule(problem)
        assert "odd-1" not in plan.devices
        assert plan.left_out["odd-1"] == "no compute figures for microbatch 8"
