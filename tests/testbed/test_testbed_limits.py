"""cgroup limits on real processes: CPU quota, CPU pinning, memory limit and the OOM killer."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from bench_testbed import cpu_share
from testbed_helpers import cluster_toml, emulate, needs_host, testbed

pytestmark = [pytest.mark.root, needs_host]

MiB = 2**20
# Touches every page of a memory-mapped file, as ONNX Runtime does with external weights.
READ_MAPPED = r"""
import mmap, sys
with open(sys.argv[1], "rb") as f:
    pages = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)[::4096]
"""
ALLOCATE = r"""
import sys
block = bytearray(int(sys.argv[1]))
block[::4096] = b"x" * len(block[::4096])  # touch every page so it is really charged
print("allocated", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    path = tmp_path_factory.mktemp("limits") / "limits.toml"
    pinned_cpu = max(emulate.host_cpus())
    path.write_text(cluster_toml("pytest-limits", [
        {"name": "quarter", "cpu": 0.25},
        {"name": "pinned", "cpuset": str(pinned_cpu)},
        {"name": "small", "memory": "64 MiB"},
        {"name": "reader", "memory": "256 MiB"},
    ]))
    with testbed.Testbed(path, name=f"pytest-limits-{uuid.uuid4().hex[:8]}", grace_s=1.0) as bed:
        yield bed


def test_cpu_quota_gives_a_busy_loop_about_a_quarter_core(bed):
    share = cpu_share(bed, "quarter", seconds=1.0)
    # Unconfined, the loop would take a whole core (share ~1.0); a loaded machine may give it less.
    assert 0.1 <= share <= 0.35, f"busy loop got {share:.2f} of a core"


def test_cpuset_pins_processes_to_the_given_cpu(bed):
    cpu = int(bed.state.device("pinned").cpuset)
    probe = bed.run_in("pinned", [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                       stdout=subprocess.PIPE, text=True)
    assert probe.communicate(timeout=30)[0].strip() == str([cpu])


def test_processes_join_every_cgroup_of_their_device(bed):
    probe = bed.run_in("small", [sys.executable, "-c", "print(open('/proc/self/cgroup').read())"],
                       stdout=subprocess.PIPE, text=True)
    lines = probe.communicate(timeout=30)[0].split()
    group = bed.state.device("small").cgroup
    for controller in emulate.CONTROLLERS:
        assert any(line.endswith(f":{controller}:/{group}") for line in lines), (controller, lines)


def test_allocation_within_the_limit_survives_and_shows_as_peak_memory(bed):
    bed.reset_peak_memory("small")
    alloc = bed.run_in("small", [sys.executable, "-c", ALLOCATE, str(24 * MiB)], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
    try:
        assert alloc.stdout.readline().strip() == "allocated"
        assert bed.pids("small") == {alloc.pid}
        assert 24 * MiB <= bed.peak_memory("small") <= 64 * MiB
    finally:
        alloc.communicate(timeout=30)
    assert alloc.returncode == 0


def test_allocation_beyond_the_limit_is_killed_by_the_oom_killer(bed):
    kills_before = bed.oom_kills("small")
    alloc = bed.run_in("small", [sys.executable, "-c", ALLOCATE, str(256 * MiB)], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
    out, _ = alloc.communicate(timeout=60)
    assert "allocated" not in out
    assert alloc.returncode == -9
    assert bed.oom_kills("small") == kills_before + 1
    assert bed.peak_memory("small") <= 64 * MiB


def test_page_cache_is_charged_to_the_device_that_first_reads_it(bed, tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(64 * MiB))  # now in the page cache, charged to the writer
    for drop_first, charged in ((False, False), (True, True)):
        if drop_first:
            emulate.drop_page_cache()
        bed.reset_peak_memory("reader")
        read = bed.run_in("reader", [sys.executable, "-c", READ_MAPPED, str(weights)])
        assert read.wait(timeout=60) == 0
        assert (bed.peak_memory("reader") >= 64 * MiB) is charged, bed.peak_memory("reader")
