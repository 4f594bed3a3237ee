"""The workstation side: profiling a cluster of real control daemons, the profile cache and its key
checks, link probes, and `edgepipe-compile --cluster --profile` planning with what was measured."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from edgepipe.agent.formats.profiles import load_profile, load_profile_bundle, save_profile
from edgepipe.compiler.planning import load_device_profiles
from edgepipe.compiler.remote_profile import DeviceOutcome, load_links, probe_links, profile_cluster
from edgepipe.planner.cluster import load_cluster
from edgepipe.planner.problem import ModelSpec, Segment
from profiling_testlib import TINY, cli, dead_endpoint, workstation, write_cluster

WS = workstation()[0]


def spec_of(bundle_dir: Path) -> ModelSpec:
    """The planner's view of the model, as far as profile checks need it."""
    bundle = load_profile_bundle(bundle_dir)
    return ModelSpec(model_id=bundle.model_id, model_sha256=bundle.model_sha256, input_bytes=1,
                     segments=tuple(Segment(n, 1, 1, 1) for n in bundle.segment_names))


def test_profile_cluster_measures_reuses_and_names_the_unreachable(daemons, profile_bundle_dir, tmp_path) -> None:
    cluster = load_cluster(write_cluster(tmp_path / "c.toml", {**daemons, "gone": dead_endpoint()}))
    out = tmp_path / "profiles"
    seen: list[DeviceOutcome] = []
    profiles, failures = profile_cluster(cluster, profile_bundle_dir, out, (1,), on_device=seen.append, keypair=WS)
    assert sorted(p.device for p in profiles) == ["d0", "d1"]
    assert list(failures) == ["gone"] and "gone" in failures["gone"] and "no answer" in failures["gone"]
    assert {o.device: o.source for o in seen} == {"d0": "measured", "d1": "measured", "gone": failures["gone"]}
    assert load_profile(out / "d0.json") == next(p for p in profiles if p.device == "d0")

    seen.clear()
    profile_cluster(cluster, profile_bundle_dir, out, (1,), on_device=seen.append, keypair=WS)
    assert {o.device: o.source for o in seen if o.profile} == {"d0": "reused", "d1": "reused"}

    # a stored profile from another ONNX Runtime version or thread count is measured again
    stale = load_profile(out / "d0.json")
    save_profile(out / "d0.json", dataclasses.replace(stale, ort_version="0.0.1"))
    save_profile(out / "d1.json", dataclasses.replace(load_profile(out / "d1.json"), threads=3))
    seen.clear()
    profile_cluster(cluster, profile_bundle_dir, out, (1,), on_device=seen.append, keypair=WS)
    assert {o.device: o.source for o in seen if o.profile} == {"d0": "measured", "d1": "measured"}
    assert load_profile(out / "d0.json").ort_version == stale.ort_version
    assert load_profile(out / "d1.json").threads == 1

    # other microbatch sizes are another key, too
    seen.clear()
    profile_cluster(cluster, profile_bundle_dir, out, (1, 2), on_device=seen.append, keypair=WS)
    assert {o.device: o.source for o in seen if o.profile} == {"d0": "measured", "d1": "measured"}


def test_stored_profiles_for_another_model_or_device_are_refused(daemons, profile_bundle_dir, tmp_path) -> None:
    cluster = load_cluster(write_cluster(tmp_path / "c.toml", daemons))
    out = tmp_path / "profiles"
    _, failures = profile_cluster(cluster, profile_bundle_dir, out, (1,), keypair=WS)
    assert not failures
    spec = spec_of(profile_bundle_dir)
    usable, missing = load_device_profiles(out, cluster, spec)
    assert sorted(p.device for p in usable) == ["d0", "d1"] and not missing

    save_profile(out / "d1.json", load_profile(out / "d0.json"))  # d0's numbers filed as d1's
    other_model = dataclasses.replace(spec, model_sha256="f" * 64)
    usable, missing = load_device_profiles(out, cluster, spec)
    assert [p.device for p in usable] == ["d0"] and "measured on device 'd0', not 'd1'" in missing["d1"]
    usable, missing = load_device_profiles(out, cluster, other_model)
    assert not usable and all("re-profile this model" in reason for reason in missing.values())


def test_probe_links_measures_every_pair(daemons, tmp_path) -> None:
    cluster = load_cluster(write_cluster(tmp_path / "c.toml", {**daemons, "gone": dead_endpoint()}))
    links, failures = probe_links(cluster, tmp_path, tensor_bytes=256 * 1024, count=3, seconds=3, keypair=WS)
    assert [(k.a, k.b) for k in links] == [("d0", "d1")]
    assert links[0].bandwidth_mbps > 0 and links[0].latency_s > 0
    assert list(failures) == ["gone"]
    assert load_links(tmp_path / "links.json") == links
    directed = json.loads((tmp_path / "links.json").read_text())["directed"]
    assert {(d["from"], d["to"]) for d in directed} == {("d0", "d1"), ("d1", "d0")}
    assert links[0].bandwidth_mbps == min(d["bandwidth_mbps"] for d in directed)


def test_compile_cluster_profile_plans_with_measured_times(planned: Path) -> None:
    out = planned / "out"
    stderr = (planned / "stderr.txt").read_text()
    assert "gone" in stderr and "no answer to 'status'" in stderr
    assert "its measured profile" in (planned / "stdout.txt").read_text()
    plan = json.loads((out / "plan.json").read_text())
    profiles = [load_profile(out / "profiles" / f"{d}.json") for d in ("d0", "d1")]
    # d0 and d1 are alike, so the planner may give them one stage as replicas (planner v2)
    assert {r["device"] for s in plan["stages"] for r in s["replicas"]} == {"d0", "d1"}
    for stage in plan["stages"]:  # the type's time is the median (here: mean) of its two profiles
        span = slice(stage["first_segment"], stage["end_segment"])
        expected = sum((a + b) / 2 for a, b in zip(profiles[0].seconds[2][span], profiles[1].seconds[2][span]))
        assert stage["compute_s"] == pytest.approx(expected, rel=1e-6)
    assert [(k.a, k.b) for k in load_links(out / "profiles" / "links.json")] == [("d0", "d1")]
    assert sorted(p.name for p in out.glob("stage-*")) == [f"stage-{k}" for k in range(len(plan["stages"]))]


def test_compile_cluster_reuses_stored_profiles_without_profile_flag(planned: Path) -> None:
    result = cli("edgepipe-compile", TINY, "--cluster", str(planned / "c.toml"), "--profiles-dir",
                 str(planned / "out" / "profiles"), "--microbatch", "2", "-o", str(planned / "again"),
                 "--no-verify", "--json")
    assert result.returncode == 0, result.stderr
    first = json.loads((planned / "out" / "plan.json").read_text())
    again = json.loads((planned / "again" / "plan.json").read_text())
    assert [s["compute_s"] for s in again["stages"]] == [s["compute_s"] for s in first["stages"]]
    assert "gone: no profile" in result.stderr


def test_profile_options_need_a_cluster() -> None:
    result = cli("edgepipe-compile", TINY, "--stages", "2", "--profile")
    assert result.returncode == 2 and "need --cluster" in result.stderr and "Traceback" not in result.stderr


def test_missing_profiles_dir_is_an_error(tmp_path: Path) -> None:
    cluster = write_cluster(tmp_path / "c.toml", {"d0": dead_endpoint()})
    result = cli("edgepipe-compile", TINY, "--cluster", str(cluster), "--profiles-dir", str(tmp_path / "nope"),
                 "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "--profiles-dir" in result.stderr and "no such directory" in result.stderr
