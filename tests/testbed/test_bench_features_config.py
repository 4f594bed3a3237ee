"""The issue-13 benchmark's configurations (tools/bench_features.py), checked without running them:
the paper mix keeps paper-testbed.toml's speed ratios, every cluster file is one the planner and the
testbed both accept, and a plan's stages become the wiring the data plane is started with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib
from testbed_helpers import TOOLS

sys.path.insert(0, str(TOOLS))
import bench_features
from edgepipe.planner.cluster import cluster_from_dict
from testbed import parse_cluster


def setup() -> bench_features.Setup:
    return bench_features.Setup("vit_tiny_patch16_224", 1, 1, Path("."), core_gflops=40.0, int8_core_gflops=80.0,
                                samples=1, secure=True, plan_only=True)


def test_paper_mix_keeps_the_speed_ratios_of_the_paper_testbed() -> None:
    devices = bench_features.paper_devices("5 Mbps", cores=2.0)
    assert len(devices) == 16 and sum(d.cpu for d in devices) == pytest.approx(2.0, abs=1e-3)
    share = {d.kind: d.cpu for d in devices}
    assert share["rcc-ve"] / share["minnow"] == pytest.approx(16 / 10, rel=1e-3)
    assert share["rcc-ve"] / share["rcc-ve-50"] == pytest.approx(2, rel=1e-3)
    assert share["rcc-ve"] / share["rcc-ve-25"] == pytest.approx(4, rel=1e-3)
    assert [d.bandwidth for d in devices].count("5 Mbps") == 15  # the gateway keeps a fast link


@pytest.mark.parametrize("cases", [bench_features.compress_cases("5 Mbps", "cosine=0.999"),
                                   bench_features.replicate_cases("20 Mbps"),
                                   bench_features.paper_cases("1 Gbps", "cosine=0.999", 2.0)])
def test_every_cluster_file_is_read_by_the_planner_and_the_testbed(cases) -> None:
    for case in cases:
        text = bench_features.cluster_toml(case, setup())
        raw = tomllib.loads(text)
        cluster = cluster_from_dict(raw, case.scenario)
        assert len(cluster.devices) == len(case.devices)
        spec = parse_cluster(raw, case.scenario)
        assert [d.cpu for d in spec.devices] == [d.cpu for d in case.devices]


def test_plan_stages_become_the_serve_wiring(vit_tiny_build) -> None:
    """Every device of the plan (replicas included) serves exactly one stage, in pipeline order."""
    from edgepipe.compiler.build import candidate_cuts, load_model, spec_for
    from edgepipe.planner.cluster import problem_for
    from edgepipe.planner.solver import solve

    case = bench_features.replicate_cases("20 Mbps")[1]
    cluster = cluster_from_dict(tomllib.loads(bench_features.cluster_toml(case, setup())), case.scenario)
    loaded = load_model("vit_tiny_patch16_224")
    plan = solve(problem_for(cluster, spec_for(loaded, candidate_cuts(loaded)), 2))
    wiring = bench_features.stage_wiring(plan)
    assert len(wiring) == len(plan.stages)
    assert [d for w in wiring for d in w["devices"]] == list(plan.devices)
    for w in wiring:
        assert len(w["weights"]) == len(w["devices"]) and w["codec_out"] in ("raw", "fp16", "int8")
