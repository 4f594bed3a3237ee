"""Permanent loss of a device under `edgepipe-fleet supervise`: detected and named, the deployment
re-planned onto the others from standby bundles made and pre-sent beforehand (nothing sent at the
failover), every request answered exactly once and equal to the whole model, the device taken back
when it returns. On loopback (a device = its daemon and its stage processes, killed with SIGKILL)
and, as root, on the emulated testbed (a device = a network namespace and cgroups; every process in
it killed)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from fleet_testlib import (
    TINY,
    cli_compile,
    failover_and_take_back,
    fleet,
    fleet_json,
    start_daemon_in,
    stop_daemon,
    write_cluster,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testbed"))


def slow_cluster(path: Path, daemons, keys) -> Path:
    """Devices slow (0.5 GFLOPS) and small (14 MB for the stage, as far as the planner knows) enough
    that the planner pipelines vit_tiny over all four (rather than replicating it whole on each),
    and over the three that are left after a loss."""
    write_cluster(path, daemons, keys)
    text = path.read_text().replace("gflops = 50.0", "gflops = 0.5").replace('memory = "2 GiB"', 'memory = "14 MB"')
    path.write_text(text.replace('[cluster]\n', '[cluster]\nruntime_overhead = "0"\n', 1))
    return path


def test_permanent_loss_on_loopback_fails_over_and_takes_back(daemons, keys, vit_tiny_model, tmp_path: Path) -> None:
    d = {f"d{i}": daemons(f"d{i}") for i in range(4)}
    cluster = slow_cluster(tmp_path / "cluster.toml", list(d.values()), keys)
    build = tmp_path / "build"
    compiled = cli_compile(TINY, "--cluster", str(cluster), "-o", str(build), "--microbatch", "2")
    assert compiled.returncode == 0, compiled.stderr
    plan = json.loads((build / "plan.json").read_text())
    assert len(plan["stages"]) == 4
    fleet_json("deploy", str(build), keys=keys)
    victim = plan["stages"][2]["device"]
    stage_pid = d[victim].stages(keys)["stage-2"]["pid"]

    def kill() -> None:  # power loss: the daemon and its stage at once
        for pid in (d[victim].proc.pid, stage_pid):
            os.kill(pid, signal.SIGKILL)

    def restart() -> None:
        d[victim] = daemons(victim, state_dir=d[victim].state_dir, key_dir=d[victim].key_dir,
                            listen=d[victim].endpoint)

    result = failover_and_take_back(build, keys, vit_tiny_model, victim, kill, restart)
    assert result["lost"]["device"] == victim and result["lost"]["stages"] == [2]
    assert result["failover"]["how"] == "standby plan, made before the loss"
    assert result["failover"]["sent_bytes"] == 0 and victim not in result["failover"]["devices"]
    assert len(result["run"].generations) > 1 and result["first_new_result"] is not None
    assert result["taken_back"]["devices"] == [victim]
    status = fleet_json("status", str(build), keys=keys)
    assert sorted(r["device"] for r in status["devices"]) == sorted(d) and not status["lost"]
    assert fleet("stop", str(build), keys=keys).returncode == 0


from testbed_helpers import needs_host  # noqa: E402


@pytest.mark.root
@needs_host
def test_permanent_loss_on_the_testbed(keys, vit_tiny_model, tmp_path: Path) -> None:
    """4 emulated devices (100 Mbps, 0.45 of a core, 1 GiB each), daemons inside them."""
    from testbed import Testbed  # tools/, put on sys.path by testbed_helpers

    names = [f"tb{i}" for i in range(4)]
    devices = "".join(f'\n[[device]]\nname = "{n}"\ntype = "cpu"\nmemory = "1 GiB"\nbandwidth = "100 Mbps"\n'
                      f"cpu = 0.45\n" for n in names)
    spec = tmp_path / "testbed.toml"
    spec.write_text(f'[cluster]\nname = "fleet-{os.getpid() % 100000}"\n[[type]]\nname = "cpu"\ngflops = 0.5\n'
                    + devices)
    with Testbed(spec) as bed:
        daemons = {name: start_daemon_in(bed, keys, tmp_path, name) for name in names}
        cluster = slow_cluster(tmp_path / "cluster.toml", list(daemons.values()), keys)
        build = tmp_path / "build"
        compiled = cli_compile(TINY, "--cluster", str(cluster), "-o", str(build), "--microbatch", "2")
        assert compiled.returncode == 0, compiled.stderr
        plan = json.loads((build / "plan.json").read_text())
        assert len(plan["stages"]) >= 3
        fleet_json("deploy", str(build), keys=keys)
        victim = plan["stages"][len(plan["stages"]) // 2]["device"]

        def kill() -> None:  # everything in the device stops at once, like a power cut
            for pid in bed.pids(victim):
                os.kill(pid, signal.SIGKILL)

        def restart() -> None:
            daemons[victim] = start_daemon_in(bed, keys, tmp_path, victim)

        result = failover_and_take_back(build, keys, vit_tiny_model, victim, kill, restart)
        assert result["lost"]["device"] == victim
        assert result["failover"]["sent_bytes"] == 0 and victim not in result["failover"]["devices"]
        assert result["taken_back"]["devices"] == [victim]
        assert fleet("stop", str(build), keys=keys).returncode == 0
        for daemon in daemons.values():
            stop_daemon(daemon)
