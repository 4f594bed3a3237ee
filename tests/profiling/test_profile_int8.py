"""Profiling bundles with int8 pieces: devices time each segment's int8-weights variant too, and the
planner's device types get those times."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from edgepipe.agent.formats.bundle import load_bundle
from edgepipe.agent.formats.profiles import load_profile, load_profile_bundle
from edgepipe.compiler.quantize import int8_speed
from profiling_testlib import TINY, cli


@pytest.fixture(scope="module")
def int8_bundle_dir(vit_tiny_build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("profile-bundle-int8") / "pb"
    result = cli("edgepipe-compile", TINY, "--profile-bundle", str(out), "--int8-pieces", "--json")
    assert result.returncode == 0, result.stderr
    return out


def test_int8_pieces_are_quantized_twins(int8_bundle_dir: Path) -> None:
    bundle = load_profile_bundle(int8_bundle_dir)
    fp32_pieces = set(bundle.segment_pieces)
    assert len(bundle.int8_segment_pieces) == len(bundle.segment_names)
    for fp32, int8 in zip(bundle.segment_pieces, bundle.int8_segment_pieces, strict=True):
        manifest = load_bundle(bundle.piece_dir(int8_bundle_dir, int8))
        if int8 == fp32:  # nothing to quantize in this segment (patch embedding, final norm)
            assert manifest.quantization is None
        else:
            assert int8 not in fp32_pieces and manifest.quantization is not None
    blocks = bundle.segment_names.index("blocks.3")
    assert bundle.int8_segment_pieces[blocks] != bundle.segment_pieces[blocks]
    assert bundle.piece_count == len(fp32_pieces | set(bundle.int8_segment_pieces))


def test_device_profile_carries_int8_times(int8_bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "d0.json"
    result = cli("edgepipe-agent", "profile", str(int8_bundle_dir), "--device", "d0", "--microbatch", "1",
                 "--repeats", "1", "--warmup", "0", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    profile = load_profile(out)
    bundle = load_profile_bundle(int8_bundle_dir)
    assert sorted(profile.int8_seconds) == [1]
    times = profile.int8_seconds[1]
    assert len(times) == len(bundle.segment_names) and all(t > 0 for t in times)
    for seg, (fp32, int8) in enumerate(zip(bundle.segment_pieces, bundle.int8_segment_pieces, strict=True)):
        if fp32 == int8:  # the same piece timed once: the same number
            assert times[seg] == profile.seconds[1][seg]
    assert len(profile.int8_peak_memory_bytes) == len(bundle.segment_names)
    assert json.loads(out.read_text())["int8_seconds"].keys() == {"1"}


def test_planner_int8_speed_is_the_median_of_the_devices(int8_bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "d0.json"
    cli("edgepipe-agent", "profile", str(int8_bundle_dir), "--device", "d0", "--microbatch", "1",
        "--repeats", "1", "--warmup", "0", "-o", str(out))
    base = load_profile(out)
    slower = dataclasses.replace(base, device="d1", int8_seconds={1: tuple(3 * t for t in base.int8_seconds[1])})
    faster = dataclasses.replace(base, device="d2", int8_seconds={1: tuple(t / 2 for t in base.int8_seconds[1])})
    speed = int8_speed([slower, base, faster])
    assert speed.profiles == {1: base.int8_seconds[1]}
    assert int8_speed([base, dataclasses.replace(base, int8_seconds={})]) is None  # not all devices timed it
