"""Learning from runs: `edgepipe-submit --report PLAN --trace RUN.json` records a real run;
`edgepipe-compile ... --from-run RUN.json` updates the stored profiles of the run's devices (same key
rules as reuse) and says whether another plan would be faster, and by how much."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from edgepipe.agent.client.trace import load_run
from edgepipe.agent.device.profiler import robust_summary
from edgepipe.agent.formats.profiles import load_profile, profile_to_dict
from edgepipe.agent.local import LocalPipeline
from profiling_testlib import TINY, cli, workstation, write_cluster


def run_and_trace(stages: list[Path], plan: Path, trace: Path) -> None:
    with LocalPipeline(stages, log_dir=trace.parent / "logs") as pipe:
        result = cli("edgepipe-submit", *pipe.submit_args(), "--bundle", str(stages[0]), "-b", "2", "-n", "8",
                     "--report", str(plan), "--trace", str(trace), "--json")
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def misled(planned: Path, daemons: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plan made from a profile that says d0 is 3x slower than it is (as if profiled while busy),
    compiled, run and traced. d0 and d1 are separate types, so each is planned from its own profile."""
    root = tmp_path_factory.mktemp("misled")
    profiles = root / "profiles"
    shutil.copytree(planned / "out" / "profiles", profiles)
    raw = profile_to_dict(load_profile(profiles / "d0.json"))
    raw["seconds"] = {mb: [3 * t for t in times] for mb, times in raw["seconds"].items()}
    (profiles / "d0.json").write_text(json.dumps(raw))
    write_cluster(root / "c.toml", daemons, types={"d0": "slow", "d1": "cpu"})
    result = cli("edgepipe-compile", TINY, "--cluster", str(root / "c.toml"), "--profiles-dir", str(profiles),
                 "--microbatch", "2", "-o", str(root / "first"), "--no-verify", "--json")
    assert result.returncode == 0, result.stderr
    run_and_trace(sorted((root / "first").glob("stage-*")), root / "first" / "plan.json", root / "run.json")
    return root


def test_from_run_updates_profiles_and_finds_the_faster_plan(misled: Path) -> None:
    before = {d: load_profile(misled / "profiles" / f"{d}.json") for d in ("d0", "d1")}
    result = cli("edgepipe-compile", TINY, "--cluster", str(misled / "c.toml"), "--profiles-dir",
                 str(misled / "profiles"), "--microbatch", "2", "--from-run", str(misled / "run.json"),
                 "--key", str(workstation()[1]), "-o", str(misled / "second"), "--no-verify")
    assert result.returncode == 0, result.stderr
    assert "Learned from" in result.stdout
    run = load_run(misled / "run.json")
    first = json.loads((misled / "first" / "plan.json").read_text())
    for k, stage in enumerate(first["stages"]):
        profile = load_profile(misled / "profiles" / f"{stage['device']}.json")
        span = slice(stage["first_segment"], stage["end_segment"])
        measured = robust_summary([m.stages[k].compute_s for m in run.microbatches]).mean
        assert sum(profile.seconds[2][span]) == pytest.approx(measured, rel=1e-9)  # now what the run measured
        old = before[stage["device"]]
        outside = [i for i in range(len(profile.segment_names)) if not span.start <= i < span.stop]
        assert [profile.seconds[2][i] for i in outside] == [old.seconds[2][i] for i in outside]
        assert profile.learned[-1].source == str(misled / "run.json") and profile.learned[-1].microbatch == 2
        assert profile.key() == old.key()
    # d0's stage was 3x overestimated; moving work to it is faster, and the compile says by how much
    assert "from run: the run measured" in result.stderr
    assert "another plan would be" in result.stderr and "% faster" in result.stderr
    faster = float(result.stderr.split("another plan would be ")[1].split("%")[0])
    assert faster > 1.0
    second = json.loads((misled / "second" / "plan.json").read_text())  # the better plan was compiled
    assert [s["end_segment"] for s in second["stages"]] != [s["end_segment"] for s in first["stages"]]


def test_from_run_refuses_what_it_cannot_learn_from(misled: Path, tmp_path: Path) -> None:
    no_plan = tmp_path / "run.json"
    raw = json.loads((misled / "run.json").read_text())
    raw["edgepipe"]["plan"] = None
    no_plan.write_text(json.dumps(raw))
    result = cli("edgepipe-compile", TINY, "--cluster", str(misled / "c.toml"), "--profiles-dir",
                 str(misled / "profiles"), "--microbatch", "2", "--from-run", str(no_plan), "-o", str(tmp_path / "o"),
                 "--no-verify", "--key", str(workstation()[1]))
    assert result.returncode == 2 and "--report PLAN.json --trace" in result.stderr  # bad input
    assert len(result.stderr.strip().splitlines()) == 1
    result = cli("edgepipe-compile", TINY, "--stages", "2", "--from-run", str(no_plan), "-o", str(tmp_path / "o2"))
    assert result.returncode == 2 and "need --cluster" in result.stderr


def test_a_device_whose_runtime_cannot_be_confirmed_is_not_updated(misled: Path, tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    shutil.copytree(misled / "profiles", profiles)
    before = {d: load_profile(profiles / f"{d}.json").seconds for d in ("d0", "d1")}
    cluster = write_cluster(tmp_path / "c.toml", {"d0": "tcp://127.0.0.1:9", "d1": "tcp://127.0.0.1:9"},
                            types={"d0": "slow", "d1": "cpu"})
    result = cli("edgepipe-compile", TINY, "--cluster", str(cluster), "--profiles-dir", str(profiles),
                 "--microbatch", "2", "--from-run", str(misled / "run.json"),
                 "--key", str(workstation()[1]), "-o", str(tmp_path / "o"), "--no-verify",
                 "--json")
    assert result.returncode == 0, result.stderr
    assert "profile not updated: ONNX Runtime version not confirmed" in result.stderr
    assert {d: load_profile(profiles / f"{d}.json").seconds for d in ("d0", "d1")} == before
