"""Profiling robust to a busy device (round-robin runs, outliers rejected, spread reported and warned
on), the runtime's communication costs in the profile, and profile format versions."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from edgepipe.agent.device.profiler import (
    SPREAD_WARNING,
    robust_summary,
    round_robin,
    spread_warning,
)
from edgepipe.agent.formats.codecs import CODECS
from edgepipe.agent.formats.profiles import (
    PROFILE_VERSION,
    ProfileError,
    load_profile,
    profile_to_dict,
    save_profile,
)
from edgepipe.compiler.planning import profile_warnings
from profiling_testlib import TINY, cli


def test_robust_summary_rejects_a_burst_and_keeps_the_mean_of_the_rest() -> None:
    samples = [0.100, 0.102, 0.098, 0.101, 0.099, 0.100, 0.350, 0.101]  # one run hit by a burst
    summary = robust_summary(samples)
    assert summary.rejected == 1
    assert summary.mean == pytest.approx(sum(s for s in samples if s < 0.2) / 7)
    assert summary.spread < 0.05  # the burst does not inflate the spread either
    steady = robust_summary([0.1] * 5)
    assert (steady.rejected, steady.spread, steady.mean) == (0, 0.0, pytest.approx(0.1))


def test_round_robin_runs_every_piece_and_size_once_per_round() -> None:
    order = round_robin(3, [1, 8], 4)
    assert len(order) == 3 * 2 * 4
    for r in range(4):
        chunk = order[r * 6:(r + 1) * 6]
        assert sorted(chunk) == [(p, mb) for p in range(3) for mb in (1, 8)]
    assert [order[r * 6][0] for r in range(4)] == [0, 1, 2, 0]  # each round starts one piece later
    assert Counter(order) == {(p, mb): 4 for p in range(3) for mb in (1, 8)}


@pytest.fixture(scope="module")
def measured(profile_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("robust") / "d0.json"
    result = cli("edgepipe-agent", "profile", str(profile_bundle_dir), "--device", "d0", "--microbatch", "1,2",
                 "--repeats", "5", "--warmup", "1", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "spread" in result.stdout and "runtime costs" in result.stdout
    return out


def test_profile_reports_spread_outliers_and_comm_costs(measured: Path) -> None:
    profile = load_profile(measured)
    assert profile.format_version == PROFILE_VERSION == 2 and profile.repeats == 5
    for mb in (1, 2):
        assert len(profile.spread[mb]) == len(profile.outliers[mb]) == len(profile.segment_names)
        assert all(s >= 0 for s in profile.spread[mb]) and all(0 <= o <= 5 for o in profile.outliers[mb])
    comm = profile.comm
    assert comm is not None
    assert {(c.codec, c.secure) for c in comm.costs} == {(c, s) for c in CODECS for s in (False, True)}
    for cost in comm.costs:
        assert min(cost.recv_per_message_s, cost.recv_per_byte_s, cost.send_per_message_s,
                   cost.send_per_byte_s) >= 0
        assert cost.recv_s(comm.message_bytes[1]) + cost.send_s(comm.message_bytes[1]) > 0
    assert comm.message_bytes[0] < comm.message_bytes[1]
    assert 0.0 <= comm.share <= 1.5 and comm.compute_alone_s > 0 and comm.comm_cpu_s > 0


def test_a_noisy_profile_is_warned_about_in_the_cli_and_the_compile(measured: Path, planned: Path,
                                                                      tmp_path: Path) -> None:
    profile = load_profile(measured)
    raw = profile_to_dict(profile)
    blocks = profile.segment_names.index("blocks.3")
    raw["spread"] = {mb: [0.0] * len(v) for mb, v in raw["spread"].items()}  # whatever the machine did
    raw["spread"]["2"][blocks] = 0.4
    noisy = tmp_path / "d0.json"
    noisy.write_text(json.dumps(raw))
    line = spread_warning(load_profile(noisy), 2)
    assert line is not None and "blocks.3" in line and "40%" in line and f"{SPREAD_WARNING:.0%}" in line
    assert spread_warning(profile, 2, limit=10.0) is None
    # the compile reads stored profiles and says so on stderr, naming the device
    profiles = tmp_path / "profiles"
    shutil.copytree(planned / "out" / "profiles", profiles)
    stored = load_profile(profiles / "d0.json")
    raw = profile_to_dict(stored)
    raw["spread"] = {mb: [0.0] * len(v) for mb, v in raw["spread"].items()}
    raw["spread"]["2"][stored.segment_names.index("blocks.3")] = 0.4
    quiet = profile_to_dict(load_profile(profiles / "d1.json"))
    quiet["spread"] = {mb: [0.0] * len(v) for mb, v in quiet["spread"].items()}
    (profiles / "d1.json").write_text(json.dumps(quiet))
    (profiles / "d0.json").write_text(json.dumps(raw))
    result = cli("edgepipe-compile", TINY, "--cluster", str(planned / "c.toml"), "--profiles-dir", str(profiles),
                 "--microbatch", "2", "-o", str(tmp_path / "out"), "--no-verify", "--json")
    assert result.returncode == 0, result.stderr
    assert "warning: d0: timings of 1 segment(s) spread more than 10% (worst blocks.3 at microbatch 2: 40%)" \
        in result.stderr
    assert "warning: d1:" not in result.stderr


def test_version_1_profiles_are_read_and_flagged_and_unknown_versions_refused(measured: Path,
                                                                             tmp_path: Path) -> None:
    raw = profile_to_dict(load_profile(measured))
    v1 = {k: v for k, v in raw.items() if k not in ("spread", "outliers", "comm", "learned")}
    v1["format_version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    old = load_profile(tmp_path / "v1.json")
    assert old.format_version == 1 and old.comm is None and old.spread == {}
    assert old.seconds == load_profile(measured).seconds and old.key() == load_profile(measured).key()
    assert any("no communication costs" in w for w in profile_warnings([old], 2))
    save_profile(tmp_path / "again.json", old)  # written back as it is (version 1)
    assert json.loads((tmp_path / "again.json").read_text())["format_version"] == 1
    raw["format_version"] = 3
    (tmp_path / "v3.json").write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match=r"v3.json: profile format version 3 is not supported .*re-profile"):
        load_profile(tmp_path / "v3.json")
