"""Teardown leaves nothing behind: normal exit, exceptions, signals, and a SIGKILLed orchestrator."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import pytest
from testbed_helpers import ROOT, emulate, leftovers, needs_host, pid_alive, run_leftovers, testbed

pytestmark = [pytest.mark.root, needs_host]

DEVICES = [{"name": "a", "cpu": 0.5, "memory": "128 MiB", "bandwidth": "50 Mbps"}, {"name": "b"}]
# Forks a grandchild and ignores SIGTERM, so only the cgroup sweep with SIGKILL can stop both.
STUBBORN = ["/bin/sh", "-c", "trap '' TERM; sleep 300 & echo $!; wait"]
ORCHESTRATOR = r"""
import sys, time
import testbed
with testbed.Testbed(sys.argv[1], name=sys.argv[2], grace_s=0.5) as bed:
    child = bed.run_in("b", ["sleep", "300"])
    print(bed.state.run_id, child.pid, flush=True)
    time.sleep(300)
"""


def start_orchestrator(cluster, name: str, tool_env: dict[str, str]) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-c", ORCHESTRATOR, str(cluster), name], env=tool_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line, proc.stderr.read()
    return proc, line[0], int(line[1])


def test_exit_stops_every_process_and_removes_everything(write_cluster):
    with testbed.Testbed(write_cluster(DEVICES), grace_s=0.5) as bed:
        state = bed.state
        assert leftovers(state)  # sanity: the check sees what exists
        stubborn = bed.run_in("a", STUBBORN, stdout=subprocess.PIPE, text=True)
        grandchild = int(stubborn.stdout.readline())
        assert bed.pids("a") == {stubborn.pid, grandchild}
    assert leftovers(state) == []
    # SIGKILLed itself, or its `wait` returned first because its child was SIGKILLed an instant earlier.
    assert stubborn.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
    assert not pid_alive(grandchild)


def test_exception_in_the_block_still_tears_down(write_cluster):
    with pytest.raises(RuntimeError, match="boom"), testbed.Testbed(write_cluster(DEVICES)) as bed:
        state = bed.state
        sleeper = bed.run_in("b", ["sleep", "300"])
        raise RuntimeError("boom")
    assert leftovers(state) == []
    assert sleeper.returncode is not None


def test_failed_up_removes_what_it_created(write_cluster, monkeypatch):
    bed = testbed.Testbed(write_cluster(DEVICES))
    created: list[testbed.TestbedState] = []
    real_create_cgroup = emulate.create_cgroup

    def create_cgroup_then_fail(group: str, **limits) -> None:
        real_create_cgroup(group, **limits)
        created.append(testbed.load_state(bed.name))
        raise emulate.EmulationError("injected failure after the first device")

    monkeypatch.setattr(emulate, "create_cgroup", create_cgroup_then_fail)
    with pytest.raises(emulate.EmulationError, match="injected failure"), bed:
        pass
    assert created and leftovers(created[0]) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signalled_orchestrator_tears_down(write_cluster, tool_env, signum):
    name = f"pytest-sig-{uuid.uuid4().hex[:8]}"
    proc, run_id, child = start_orchestrator(write_cluster(DEVICES, name=name), name, tool_env)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert run_leftovers(run_id, name) == [], stderr
    assert not pid_alive(child)


def test_down_cleans_up_after_a_killed_orchestrator(write_cluster, tool_env):
    name = f"pytest-crash-{uuid.uuid4().hex[:8]}"
    proc, _, child = start_orchestrator(write_cluster(DEVICES, name=name), name, tool_env)
    proc.kill()
    proc.wait(timeout=10)
    state = testbed.load_state(name)
    assert testbed.owner_status(state) == "dead"
    created = [state.bridge, str(testbed.state_path(name))]
    created += [n for d in state.devices for n in (d.netns, d.veth, d.cgroup)]
    assert sorted(leftovers(state)) == sorted(created)
    assert pid_alive(child)
    down = subprocess.run([sys.executable, str(ROOT / "tools" / "testbed.py"), "down", name, "--grace", "1"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == f"removed testbed {name} (2 devices)"
    assert leftovers(state) == []
    assert not pid_alive(child)


def test_next_up_sweeps_a_crashed_testbed_of_the_same_name(write_cluster, tool_env):
    name = f"pytest-again-{uuid.uuid4().hex[:8]}"
    cluster = write_cluster(DEVICES, name=name)
    proc, _, child = start_orchestrator(cluster, name, tool_env)
    proc.kill()
    proc.wait(timeout=10)
    crashed = testbed.load_state(name)
    with testbed.Testbed(cluster) as bed:
        state = bed.state
        assert run_leftovers(crashed.run_id, None) == []
        assert not pid_alive(child)
        assert bed.state.run_id != crashed.run_id
        # The new testbed reuses the freed subnet and works.
        probe = bed.run_in("a", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], stdout=subprocess.PIPE,
                           text=True)
        assert f"inet {bed.address('a')}/24" in probe.communicate(timeout=30)[0]
    assert leftovers(state) == []


def test_sweep_orphans_removes_unrecorded_resources_only(write_cluster):
    orphan = f"ep-{uuid.uuid4().hex[:6]}-x"
    emulate.add_netns(orphan)
    emulate.create_cgroup(orphan, cpu=None, cpuset=None, memory_bytes=None)
    with testbed.Testbed(write_cluster(DEVICES)) as bed:
        swept = testbed.sweep_orphans()
        assert orphan in swept
        assert not emulate.netns_exists(orphan)
        assert orphan not in emulate.list_cgroups()
        # The live testbed is recorded in its state file, so the sweep left it alone.
        assert all(not n.startswith(f"ep-{bed.state.run_id}-") for n in swept)
        assert emulate.netns_exists(bed.state.device("a").netns)
