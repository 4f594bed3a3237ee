"""`edgepipe-agent profile` on a real vit_tiny profiling bundle, run as a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

from edgepipe.agent.formats.profiles import load_profile, load_profile_bundle
from profiling_testlib import cli


def test_profiling_bundle_profiles_identical_blocks_once(profile_bundle_dir: Path) -> None:
    bundle = load_profile_bundle(profile_bundle_dir)
    assert len(bundle.segment_names) == len(bundle.segment_pieces)
    assert bundle.piece_count < len(bundle.segment_names) // 2
    # the 12 transformer blocks of vit_tiny share the pieces of blocks.0
    first = bundle.segment_names.index("blocks.0")
    for k in range(1, 12):
        assert bundle.segment_pieces[bundle.segment_names.index(f"blocks.{k}")] == bundle.segment_pieces[first]
    assert sorted(set(bundle.segment_pieces)) == list(range(bundle.piece_count))


def test_agent_profile_cli_times_every_segment(profile_bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "d0.json"
    result = cli("edgepipe-agent", "profile", str(profile_bundle_dir), "--device", "d0", "--microbatch", "1,2",
                 "--repeats", "2", "--warmup", "1", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    profile = load_profile(out)
    bundle = load_profile_bundle(profile_bundle_dir)
    assert printed["device"] == profile.device == "d0"
    assert profile.model_sha256 == bundle.model_sha256
    assert profile.segment_names == bundle.segment_names
    assert sorted(profile.seconds) == [1, 2]
    for mb in (1, 2):
        times = profile.seconds[mb]
        assert len(times) == len(bundle.segment_names) and all(t > 0 for t in times)
        # segments sharing a piece were timed once, so they carry the very same number
        for seg, piece in enumerate(bundle.segment_pieces):
            twin = bundle.segment_pieces.index(piece)
            assert times[seg] == times[twin]
    assert profile.key() == (bundle.model_sha256, "d0", (1, 2), "float32", profile.ort_version, 1)


def test_agent_profile_cli_prints_a_table(profile_bundle_dir: Path) -> None:
    result = cli("edgepipe-agent", "profile", str(profile_bundle_dir), "--device", "d0", "--microbatch", "1",
                 "--repeats", "1", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    assert "blocks.11" in result.stdout and "ms @ 1" in result.stdout and "peak MiB" in result.stdout


def test_agent_profile_cli_rejects_bad_input(tmp_path: Path, profile_bundle_dir: Path) -> None:
    result = cli("edgepipe-agent", "profile", str(tmp_path), "--device", "d0")
    assert result.returncode == 2
    assert "profile-bundle.json: missing" in result.stderr and "Traceback" not in result.stderr
    result = cli("edgepipe-agent", "profile", str(profile_bundle_dir), "--device", "d0", "--microbatch", "0,x")
    assert result.returncode == 2 and "--microbatch" in result.stderr and len(result.stderr.splitlines()) == 1
