"""The solver on scenarios with known answers: heterogeneity, slow links, the client link, memory,
microbatch choice, devices left out and why, and the exact/heuristic switch."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest
from edgepipe.planner.baselines import all_baselines, even_split
from edgepipe.planner.cost import Placement, make_plan
from edgepipe.planner.heuristic import class_orders
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
    Segment,
)
from edgepipe.planner.solver import InfeasibleError, lower_bound, solve
from edgepipe.planner.tables import build_tables, device_classes
from hypothesis import given, settings
from planner_testlib import TOL, small_problems, vit_like

GIB = 2**30


def _uniform(n: int = 4, out_bytes: int = 10**6, result_bytes: int = 10**6) -> ModelSpec:
    """n segments of 1 GFLOP and 1 MB of weights; 1 MB inputs; ``out_bytes`` per cut."""
    segs = [Segment(f"s{i}", 10**6, 10**5, out_bytes, 1e9) for i in range(n)]
    segs[-1] = replace(segs[-1], out_bytes=result_bytes)
    return ModelSpec("uniform", "", 10**6, tuple(segs))


def test_paper_testbed_plan_is_optimal_and_beats_every_baseline(paper_problem) -> None:
    plan = solve(paper_problem)
    assert plan.solver == "exact-dp" and plan.optimal and plan.fits
    assert plan.bottleneck_s == pytest.approx(max(s.time_s for s in plan.stages))
    # within the default 1% slack of the best throughput, traded for lower latency
    assert plan.lower_bound_s <= plan.bottleneck_s <= plan.lower_bound_s * 1.01
    fastest = solve(paper_problem, throughput_slack=0)
    assert fastest.bottleneck_s == pytest.approx(plan.lower_bound_s)
    assert fastest.latency_s >= plan.latency_s
    for name, other in all_baselines(paper_problem, plan.microbatch).items():
        assert plan.throughput > other.throughput * 1.2, name
    # heterogeneity-aware: a full-speed board gets more of the model than a 25 % one (a device in
    # a group of r does 1/r of its stage's work)
    segments = {d: (s.end_segment - s.first_segment) / len(s.devices) for s in plan.stages for d in s.devices}
    fast = [v for k, v in segments.items() if k.startswith("rcc-")]
    slow = [v for k, v in segments.items() if k.startswith("rcc25-")]
    assert fast and slow and min(fast) > max(slow)


def test_a_slow_link_leaves_a_device_out_where_even_split_gets_slower() -> None:
    types = (DeviceType("fast", gflops=2.0), DeviceType("slow", gflops=1.0))
    devices = (Device("slow", "slow", GIB, 1000.0), Device("fast", "fast", GIB, 1000.0))
    wired = Problem(_uniform(), types, devices, microbatch=1)
    both = solve(wired)
    assert set(both.devices) == {"fast", "slow"}
    assert both.bottleneck_s == pytest.approx(1.5)  # fast: 3 segments at 0.5 s; slow: 1 at 1 s

    wifi = replace(wired, links=(Link("slow", "fast", 1.0, 0.003),))  # 1 MB now takes 8 s to cross
    alone = solve(wifi)
    assert alone.devices == ("fast",)
    assert alone.bottleneck_s == pytest.approx(2.0)
    assert alone.left_out["slow"].startswith("not needed")
    naive = even_split(wifi)
    assert len(naive.stages) == 2 and naive.bottleneck_s == pytest.approx(8.003)
    assert alone.throughput / naive.throughput == pytest.approx(8.003 / 2.0)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(small_problems(max_devices=4, max_segments=6))
def test_one_more_device_never_lowers_throughput(problem: Problem) -> None:
    if problem.microbatch is None:
        problem = replace(problem, microbatch=8)
    fewer = replace(problem, devices=problem.devices[:-1],
                    links=tuple(k for k in problem.links if problem.devices[-1].name not in (k.a, k.b)))
    try:
        without = solve(fewer, method="exact")
    except InfeasibleError:
        return
    with_it = solve(problem, method="exact")
    assert with_it.throughput >= without.throughput * (1 - TOL)


def test_the_client_link_can_be_the_bottleneck() -> None:
    problem = Problem(_uniform(result_bytes=1000), (DeviceType("t", gflops=10.0),), (Device("a", "t", GIB, 1000.0),
                      Device("b", "t", GIB, 1000.0)), microbatch=2, client_bandwidth_mbps=1.0)
    plan = solve(problem)
    assert plan.bottleneck == -1
    assert plan.client_in_s == pytest.approx(2 * 10**6 * 8 / 1e6)  # 2 samples of 1 MB over 1 Mbps
    assert plan.throughput == pytest.approx(2 / plan.client_in_s)
    assert len(plan.stages) == 1  # a second device cannot help, and would add latency


def test_devices_left_out_say_why() -> None:
    model = _uniform()
    types = (DeviceType("fast", gflops=10.0), DeviceType("crawl", gflops=0.01),
             DeviceType("mb16", profiles={16: (1.0,) * 4}))
    devices = (Device("main", "fast", GIB, 1000.0), Device("tiny", "fast", 10**6, 1000.0),
               Device("snail", "crawl", GIB, 1000.0), Device("odd", "mb16", GIB, 1000.0))
    plan = solve(Problem(model, types, devices, microbatch=8, runtime_overhead_bytes=0))
    assert plan.devices[0] == "main"
    assert plan.left_out["tiny"].startswith("too little memory: the smallest stage needs")
    assert plan.left_out["snail"].startswith("too slow: its quickest stage takes")
    assert plan.left_out["odd"].startswith("no compute figures for microbatch 8")


def test_a_model_too_big_for_every_device_is_reported() -> None:
    model = ModelSpec("big", "", 10, (Segment("input", 10, 1, 1, 1.0), Segment("blocks.1", 5 * GIB, 1, 1, 1.0)))
    problem = Problem(model, (DeviceType("t", gflops=1.0),), (Device("a", "t", 4 * GIB, 100.0),
                      Device("b", "t", 2 * GIB, 100.0)), microbatch=1)
    with pytest.raises(InfeasibleError, match=r"segment 'blocks.1' needs at least 5.\d+ GiB .* \(4.00 GiB\)"):
        solve(problem)


def test_memory_can_force_more_devices() -> None:
    model = _uniform()
    problem = Problem(model, (DeviceType("t", gflops=100.0),),
                      tuple(Device(f"d{i}", "t", 3_500_000, 1000.0) for i in range(4)),
                      microbatch=1, runtime_overhead_bytes=0, queue_depth=1)
    # one segment needs 1 MB of weights + 0.1 MB peak + 2 MB of queued input and output = 3.1 MB;
    # two need 4.1 MB, more than the 3.5 MB each device has
    plan = solve(problem)
    assert [s.end_segment - s.first_segment for s in plan.stages] == [1, 1, 1, 1]
    assert plan.fits


def test_microbatch_is_chosen_among_profiled_sizes() -> None:
    model = _uniform()
    profiles = {4: (1.0,) * 4, 16: (3.0,) * 4}  # 16 is faster per sample (0.19 s vs 0.25 s)
    problem = Problem(model, (DeviceType("t", profiles=profiles),), (Device("a", "t", GIB, 10_000.0),),
                      microbatch=None)
    assert solve(problem).microbatch == 16
    # the whole model in one stage: 4 MB weights + 100 MiB overhead + per sample 0.1 MB peak and
    # 2 queued 1 MB inputs and outputs (4.1 MB): 16 samples need 174.5 MB, 4 need 125.3 MB
    small = replace(problem, devices=(Device("a", "t", 100 * 2**20 + 30 * 10**6, 10_000.0),))
    plan = solve(small)
    assert plan.microbatch == 4 and plan.fits


def test_classes_group_interchangeable_devices_and_split_on_links() -> None:
    types = (DeviceType("t", gflops=1.0),)
    devices = tuple(Device(n, "t", GIB, 100.0) for n in ("a", "b", "c", "d"))
    model = _uniform()
    plain = device_classes(Problem(model, types, devices))
    assert [c.members for c in plain] == [("a", "b", "c", "d")]
    linked = Problem(model, types, devices, links=(Link("a", "d", 5.0), Link("b", "d", 5.0)))
    assert [c.members for c in device_classes(linked)] == [("a", "b"), ("c",), ("d",)]
    odd = Problem(model, types, devices, links=(Link("a", "d", 5.0), Link("b", "d", 6.0)))
    assert [c.members for c in device_classes(odd)] == [("a",), ("b",), ("c",), ("d",)]


def test_devices_of_a_class_are_used_in_listed_order(paper_problem) -> None:
    plan = solve(paper_problem)
    for prefix in ("rcc-", "minnow-", "rcc50-", "rcc25-"):
        used = [d for d in plan.devices if d.startswith(prefix)]
        assert used == sorted(used)
    again = solve(paper_problem)
    assert replace(again, solve_time_s=0) == replace(plan, solve_time_s=0)


def test_heuristic_and_bound_bracket_the_optimum(paper_problem) -> None:
    exact = solve(paper_problem, method="exact")
    heuristic = solve(paper_problem, method="heuristic")
    assert heuristic.solver == "heuristic" and heuristic.fits
    assert heuristic.bottleneck_s >= exact.bottleneck_s * (1 - TOL)
    assert heuristic.lower_bound_s <= exact.bottleneck_s * (1 + TOL)
    assert lower_bound(paper_problem) == pytest.approx(heuristic.lower_bound_s)
    auto = solve(paper_problem, max_exact_states=10)
    assert auto.solver == "heuristic"


def test_beam_search_finds_what_class_orders_miss() -> None:
    # Six kinds of board: the optimum interleaves them irregularly, which no repeated class order
    # reproduces; the heuristic's beam search over the exact programme still finds it here.
    speeds, memory = (16, 10, 8, 4, 12, 6), (8, 2, 8, 8, 4, 4)
    types = tuple(DeviceType(f"t{k}", gflops=float(g)) for k, g in enumerate(speeds))
    devices = tuple(Device(f"d{k}-{i}", f"t{k}", m * GIB, 1000.0) for k, m in enumerate(memory) for i in range(3))
    problem = Problem(vit_like(blocks=12, width=256, tokens=65), types, devices, microbatch=8,
                      client_bandwidth_mbps=1000.0)
    orders_only = class_orders(build_tables(problem, 8), budget=300)[0]
    exact = solve(problem, method="exact")
    heuristic = solve(problem, method="heuristic")
    assert orders_only > exact.bottleneck_s * 1.02
    assert heuristic.bottleneck_s == pytest.approx(exact.bottleneck_s, rel=TOL)
    assert heuristic.lower_bound_s <= exact.bottleneck_s


def test_twelve_distinct_devices_with_links_are_solved_exactly() -> None:
    rng = random.Random(7)
    types = (DeviceType("a", gflops=4.0), DeviceType("b", gflops=2.0), DeviceType("c", gflops=1.0))
    devices = tuple(Device(f"d{i}", types[i % 3].name, GIB, 1000.0) for i in range(12))
    links = tuple(Link(x.name, y.name, rng.choice([20.0, 100.0, 1000.0]), rng.choice([0.0, 0.002]))
                  for x, y in itertools.combinations(devices, 2))
    problem = Problem(vit_like(blocks=8, width=256, tokens=65), types, devices, links, microbatch=8)
    assert len(device_classes(problem)) == 12
    exact = solve(problem)
    assert exact.solver == "exact-dp" and exact.optimal
    heuristic = solve(problem, method="heuristic")
    assert heuristic.bottleneck_s >= exact.bottleneck_s * (1 - TOL)
    assert heuristic.lower_bound_s <= exact.bottleneck_s * (1 + TOL)


def test_bad_method_is_refused(paper_problem) -> None:
    with pytest.raises(ValueError, match="method must be"):
        solve(paper_problem, method="fastest")


# --- version 2: replicas, codecs, int8 weights, comm costs ------------------------------------


def _effect(max_abs: float) -> ErrorEffect:
    return ErrorEffect(max_abs, 1.0 - max_abs / 100, 1.0)


def _lossy(model: ModelSpec, cut_error: float = 0.002, weight_error: float = 0.004) -> ModelSpec:
    """``model`` offering fp16 (half the bytes) and int8 (a quarter) at every inner cut, and int8
    weights (a quarter of the bytes) for every segment, with the given effects."""
    last = len(model.segments) - 1
    segs = tuple(replace(s, codecs=() if i == last else (CutCodec("fp16", s.out_bytes // 2, _effect(cut_error / 4)),
                                                         CutCodec("int8", s.out_bytes // 4, _effect(cut_error))),
                         int8=Int8Weights(s.weight_bytes // 4, _effect(weight_error)))
                 for i, s in enumerate(model.segments))
    return replace(model, segments=segs)


def test_identical_slow_devices_share_a_stage(tmp_path) -> None:
    # 12 blocks: the fast device takes a block in 1 s, a slow one in 4 s. One device per stage, the
    # best is two slow devices with 2 blocks each and the fast one with 8 (8 s); sharing a stage,
    # the three slow ones take 5 blocks together (20 s / 3 = 6.7 s) and the fast one 7 (7 s).
    blocks = tuple(Segment(f"b{i}", 10**6, 10**5, 1000, 1e9) for i in range(12))
    model = ModelSpec("blocks", "", 1000, blocks)
    types = (DeviceType("fast", gflops=8.0), DeviceType("slow", reference="fast", speed=0.25))
    devices = (Device("fast", "fast", GIB, 1000.0), *(Device(f"slow-{i}", "slow", GIB, 1000.0) for i in (1, 2, 3)))
    problem = Problem(model, types, devices, microbatch=8)
    pipeline = solve(problem, max_replicas=1, throughput_slack=0)
    shared = solve(problem, throughput_slack=0)
    assert pipeline.bottleneck_s == pytest.approx(8.0)
    assert shared.bottleneck_s == pytest.approx(7.0)
    group = next(s for s in shared.stages if len(s.replicas) == 3)
    assert group.devices == ("slow-1", "slow-2", "slow-3") and [r.weight for r in group.replicas] == [1 / 3] * 3
    assert group.compute_s == pytest.approx(20.0) and group.time_s == pytest.approx(20.0 / 3)
    assert shared.latency_s == pytest.approx(27.0 + sum(s.send_s for s in shared.stages))  # latency is not shared


def test_fan_out_and_fan_in_do_not_speed_up_a_hop_replicated_pairs_do() -> None:
    # Hops take 4 s a microbatch; each stage computes 8 s on one device.
    segs = tuple(Segment(f"s{i}", 10, 10, 4 * 10**6 // 8 * 8 // 64, 1e9) for i in range(2))
    model = ModelSpec("two", "", 0, segs)
    problem = Problem(model, (DeviceType("t", gflops=1.0),), tuple(Device(f"d{i}", "t", GIB, 1.0) for i in range(4)),
                      microbatch=8)
    wire = segs[0].out_bytes * 8 * 8 / 1e6
    # one device -> two replicas: the sender's NIC still carries every microbatch
    fan_out = make_plan(problem, 8, [Placement(("d0",), 0, 1), Placement(("d1", "d2"), 1, 2)], solver="hand")
    assert fan_out.stages[0].time_s == pytest.approx(max(8.0, wire))
    # two replicas -> two replicas: two transfers at once
    pairs = make_plan(problem, 8, [Placement(("d0", "d1"), 0, 1), Placement(("d2", "d3"), 1, 2)], solver="hand")
    assert pairs.stages[0].time_s == pytest.approx(max(8.0 / 2, wire / 2))
    assert pairs.stages[0].send_s == pytest.approx(wire)  # one microbatch still takes the whole wire time


def test_compression_is_chosen_where_links_are_slow_and_only_within_the_budget() -> None:
    model = _lossy(vit_like(blocks=4, width=256, tokens=65))
    types = (DeviceType("t", gflops=2.0),)
    devices = tuple(Device(f"d{i}", "t", GIB, 2.0) for i in range(4))
    slow = Problem(model, types, devices, microbatch=8)
    plain = solve(slow, max_replicas=1)
    assert all(s.codec_out == "raw" for s in plain.stages) and plain.predicted_error is None  # no budget: no loss
    budgeted = solve(replace(slow, max_error=ErrorBudget(max_abs_diff=0.01)), max_replicas=1)
    assert budgeted.throughput > plain.throughput * 1.2
    assert any(s.codec_out != "raw" for s in budgeted.stages)
    assert budgeted.predicted_error.max_abs_diff <= 0.01 + 1e-12
    # a tighter budget allows fewer lossy hops; none at all allows none
    tight = solve(replace(slow, max_error=ErrorBudget(max_abs_diff=0.001)), max_replicas=1)
    assert tight.predicted_error is None or tight.predicted_error.max_abs_diff <= 0.001 + 1e-12
    assert plain.throughput <= tight.throughput <= budgeted.throughput * (1 + 1e-9)
    # with fast links nothing needs compressing, so nothing is compressed
    fast = replace(slow, devices=tuple(replace(d, bandwidth_mbps=10_000.0) for d in devices),
                   max_error=ErrorBudget(max_abs_diff=0.01))
    assert all(s.codec_out == "raw" and not s.int8_weights for s in solve(fast).stages)


def test_int8_weights_let_a_model_fit_small_boards() -> None:
    model = _lossy(vit_like(blocks=4, width=512, tokens=65))
    weights = sum(s.weight_bytes for s in model.segments)
    types = (DeviceType("t", gflops=10.0, int8=Int8Speed(gflops=10.0)),)
    devices = tuple(Device(f"d{i}", "t", int(weights * 0.4), 1000.0) for i in range(2))  # fp32 needs 0.5 each
    problem = Problem(model, types, devices, microbatch=1, runtime_overhead_bytes=0)
    with pytest.raises(InfeasibleError, match="memory cannot hold the model"):
        solve(problem)
    plan = solve(replace(problem, max_error=ErrorBudget(max_abs_diff=1.0)))
    assert plan.fits and any(s.int8_weights for s in plan.stages)
    int8_stage = next(s for s in plan.stages if s.int8_weights)
    assert int8_stage.memory_bytes < sum(model.segments[i].weight_bytes
                                         for i in range(int8_stage.first_segment, int8_stage.end_segment))
    with pytest.raises(InfeasibleError, match="within the error budget"):
        solve(replace(problem, max_error=ErrorBudget(max_abs_diff=0.001)))


def test_comm_costs_lengthen_the_stage_that_pays_them() -> None:
    model = _uniform(n=2, out_bytes=10**6, result_bytes=1000)
    cost = CommCost("raw", True, recv_per_message_s=0.1, recv_per_byte_s=1e-7, send_per_message_s=0.2,
                    send_per_byte_s=2e-7)
    types = (DeviceType("t", gflops=1.0, comm=(cost,), comm_share=1.0),)
    problem = Problem(model, types, (Device("a", "t", GIB, 1e6), Device("b", "t", GIB, 1e6)), microbatch=1)
    plan = make_plan(problem, 1, [("a", 0, 1), ("b", 1, 2)], solver="hand")
    a, b = plan.stages
    # a receives the 1 MB input and sends 1 MB; b receives 1 MB and sends 1 kB of results
    assert a.comm_s == pytest.approx(0.1 + 0.1 + 0.2 + 0.2)
    assert b.comm_s == pytest.approx(0.1 + 0.1 + 0.2 + 0.0002)
    assert a.time_s == pytest.approx(1.0 + a.comm_s)  # share 1: the comm threads' CPU comes out of compute
    spare = replace(problem, device_types=(replace(types[0], comm_share=0.0),))
    assert make_plan(spare, 1, [("a", 0, 1), ("b", 1, 2)], solver="hand").stages[0].time_s == pytest.approx(1.0)
    insecure = replace(problem, secure=False)  # no measured costs without CURVE: counted as free
    assert make_plan(insecure, 1, [("a", 0, 1), ("b", 1, 2)], solver="hand").stages[0].comm_s == 0.0


def test_throughput_slack_trades_a_sliver_of_throughput_for_latency_and_devices() -> None:
    # Two devices: one alone takes 10 s; splitting makes the 9.998 s hop the slowest step, 0.02 %
    # faster, for twice the latency.
    segs = (Segment("a", 10, 10, 1_249_750, 5.0e9), Segment("b", 10, 10, 10, 5.0e9))
    problem = Problem(ModelSpec("m", "", 0, segs), (DeviceType("t", gflops=1.0),),
                      (Device("x", "t", GIB, 1.0), Device("y", "t", GIB, 1.0)), microbatch=1)
    strict = solve(problem, throughput_slack=0, max_replicas=1)
    assert len(strict.stages) == 2 and strict.bottleneck_s == pytest.approx(9.998)
    relaxed = solve(problem, max_replicas=1)
    assert len(relaxed.stages) == 1 and relaxed.latency_s < strict.latency_s
    assert relaxed.lower_bound_s == pytest.approx(strict.bottleneck_s)
