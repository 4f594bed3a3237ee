"""Profiling a device behind a slow link: the profiling bundle goes to the device's store in chunks.

A vit_tiny profiling bundle (3.4 MB) over a 2 Mbps link takes ~14 s to send; sent as one request
frame it outlived the control connection's 6 s heartbeat timeout and never arrived. Needs root (the
emulated device is a network namespace with its link shaped by tc)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from edgepipe.agent.control_client import auth_for, request_profile
from edgepipe.agent.formats.profiles import load_profile_bundle

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "testbed"), str(ROOT / "tools")]
from fleet_harness import make_keys, start_daemon_in, stop_daemon  # noqa: E402
from testbed_helpers import needs_host  # noqa: E402


@pytest.mark.root
@needs_host
def test_profile_over_a_2_mbps_link_arrives_in_chunks_and_is_sent_once(profile_bundle_dir: Path,
                                                                        tmp_path: Path) -> None:
    from testbed import Testbed

    spec = tmp_path / "testbed.toml"
    spec.write_text(f'[cluster]\nname = "slowprof-{os.getpid() % 100000}"\n[[type]]\nname = "cpu"\ngflops = 1\n'
                    '[[device]]\nname = "slow0"\ntype = "cpu"\nmemory = "2 GiB"\nbandwidth = "2 Mbps"\ncpu = 0.9\n')
    keys = make_keys(tmp_path / "keys")
    with Testbed(spec) as bed:
        daemon = start_daemon_in(bed, keys, tmp_path, "slow0")
        try:
            auth = auth_for(keys.workstation, daemon.public_key)
            size = sum(p.stat().st_size for p in profile_bundle_dir.rglob("*") if p.is_file())
            sent: list[int] = []
            profile = request_profile(daemon.endpoint, profile_bundle_dir, "slow0", microbatches=(1,), repeats=1,
                                      warmup=0, auth=auth, on_bytes=sent.append)
            assert sum(sent) == size and size * 8 / 2e6 > 8  # > 8 s at 2 Mbps: as one frame it would never arrive
            assert profile.segment_names == load_profile_bundle(profile_bundle_dir).segment_names
            again: list[int] = []
            request_profile(daemon.endpoint, profile_bundle_dir, "slow0", microbatches=(1,), repeats=1, warmup=0,
                            auth=auth, on_bytes=again.append)
            assert sum(again) == 0  # the store kept the files: a re-profile sends nothing
        finally:
            stop_daemon(daemon)
