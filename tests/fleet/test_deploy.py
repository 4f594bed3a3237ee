"""`edgepipe-fleet deploy/status/stop` against real daemons on loopback: a 3-stage vit_tiny plan
deployed, requests through the endpoints file equal to the whole model, a redeploy of a plan with
one cut moved that sends and restarts only the changed stages, a move to other devices, a clean
stop; and `deploy --help` teaching the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from edgepipe.agent.formats.endpoints import load_endpoints
from fleet_testlib import copy_build, fleet, fleet_json, run_requests, wait_until, whole_model, write_cluster


def test_deploy_run_redeploy_changed_plan_and_stop(daemons, keys, build_a, build_b, vit_tiny_model,
                                                   tmp_path: Path) -> None:
    d = [daemons(f"d{i}") for i in range(3)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster(build / "cluster.toml", d, keys)

    first = fleet_json("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    assert first["generation"] == 1
    by_device = {r["device"]: r for r in first["devices"]}
    for i in range(3):  # everything sent the first time, nothing was there
        assert by_device[f"d{i}"]["sent"] == by_device[f"d{i}"]["total_bytes"] > 0
        assert by_device[f"d{i}"]["cached"] == 0
        assert by_device[f"d{i}"]["actions"] == {f"stage-{i}": "started"}
    ep = load_endpoints(build / "endpoints.json")
    assert ep.generation == 1 and ep.deployment == first["deployment"] and len(ep.daemons) == 3
    assert not ep.insecure  # CurveZMQ data sockets, the device keys as the stages' keys
    assert [p.public_key for p in ep.entry] == [d[0].public_key]

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 3, 224, 224), dtype=np.float32) for _ in range(3)]
    for out, x in zip(run_requests(build / "endpoints.json", batches, keys.client), batches):
        np.testing.assert_allclose(out, whole_model(vit_tiny_model, x), atol=1e-4)

    status = fleet_json("status", str(build), keys=keys)
    assert [(r["device"], [s["state"] for s in r["stages"]]) for r in status["devices"]] == \
        [("d0", ["ready"]), ("d1", ["ready"]), ("d2", ["ready"])]
    pid0 = status["devices"][0]["stages"][0]["pid"]

    def stage_rows() -> list[dict]:  # the stages' own counters, as the daemons last read them
        return [s for r in fleet_json("status", str(build), keys=keys)["devices"] for s in r["stages"]]

    assert wait_until(lambda: [s["requests"] for s in stage_rows()] == [3, 3, 3], timeout_s=20)
    for row in stage_rows():
        assert row["queue"] == 0 and row["errors"] == 0
        assert row["heartbeat_age_s"] is not None and row["heartbeat_age_s"] < 10

    # a new plan moves the second cut: stage 0 is unchanged, stages 1 and 2 are not
    copy_build(build_b, build)
    second = fleet_json("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    assert second["deployment"] == first["deployment"] and second["generation"] == 2
    by_device = {r["device"]: r for r in second["devices"]}
    assert by_device["d0"]["sent"] == 0 and by_device["d0"]["cached"] == by_device["d0"]["total_bytes"]
    assert by_device["d0"]["actions"] == {"stage-0": "kept"}
    for name in ("d1", "d2"):
        assert by_device[name]["sent"] > 0
        assert list(by_device[name]["actions"].values()) == ["replaced"]
    status = fleet_json("status", str(build), keys=keys)
    assert status["devices"][0]["stages"][0]["pid"] == pid0  # stage 0 kept running
    assert load_endpoints(build / "endpoints.json").generation == 2
    for out, x in zip(run_requests(build / "endpoints.json", batches, keys.client), batches):
        np.testing.assert_allclose(out, whole_model(vit_tiny_model, x), atol=1e-4)

    # the same build again: nothing sent, nothing restarted
    third = fleet_json("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    assert all(r["sent"] == 0 and set(r["actions"].values()) == {"kept"} for r in third["devices"])

    stopped = fleet("stop", str(build), "--json", keys=keys)
    assert stopped.returncode == 0, stopped.stderr
    assert sorted(json.loads(stopped.stdout)["stopped"]) == ["d0", "d1", "d2"]
    assert not (build / "endpoints.json").exists()
    for daemon in d:
        status = daemon.status(keys)
        assert status["stages"] == [] and status["deployment"] is None
    assert "stopped" in fleet("status", str(build), keys=keys).stdout


def test_redeploy_onto_other_devices_moves_stages_and_releases_the_dropped_one(daemons, keys, build_a,
                                                                               vit_tiny_model, tmp_path: Path) -> None:
    d = [daemons(f"d{i}") for i in range(4)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster(build / "cluster.toml", d, keys)
    fleet_json("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    moved = fleet_json("deploy", str(build), "--devices", "d1,d2,d3", keys=keys)
    by_device = {r["device"]: r for r in moved["devices"]}
    assert by_device["d1"]["actions"] == {"stage-0": "started", "stage-1": "stopped"}
    assert by_device["d3"]["actions"] == {"stage-2": "started"}
    assert wait_until(lambda: d[0].status(keys)["deployment"] is None and not d[0].status(keys)["stages"])
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224), dtype=np.float32)
    np.testing.assert_allclose(run_requests(build / "endpoints.json", [x], keys.client)[0],
                               whole_model(vit_tiny_model, x), atol=1e-4)
    assert fleet("stop", str(build), keys=keys).returncode == 0


def test_deploy_from_a_plan_and_the_cli_output(daemons, keys, tmp_path: Path) -> None:
    """`edgepipe-compile --cluster` writes plan.json, problem.json and cluster.toml; deploy needs nothing
    else, and its table and progress name every device."""
    from fleet_testlib import TINY, cli_compile

    d = [daemons(f"d{i}") for i in range(2)]
    cluster = write_cluster(tmp_path / "cluster.toml", d, keys)
    build = tmp_path / "planned"
    compiled = cli_compile(TINY, "--cluster", str(cluster), "-o", str(build), "--microbatch", "2", "--no-verify")
    assert compiled.returncode == 0, compiled.stderr
    assert {"plan.json", "problem.json", "cluster.toml"} <= {p.name for p in build.iterdir()}
    result = fleet("deploy", str(build), keys=keys)
    assert result.returncode == 0, result.stderr
    plan = json.loads((build / "plan.json").read_text())
    for stage in plan["stages"]:
        assert stage["device"] in result.stdout
    assert "endpoints written to" in result.stdout and "generation 1" in result.stdout
    table = fleet("status", str(build), keys=keys)
    assert table.returncode == 0 and "ready" in table.stdout
    assert fleet("stop", str(build), keys=keys).returncode == 0


def test_help_teaches_each_command() -> None:
    for command in ("deploy", "status", "stop", "supervise"):
        result = fleet(command, "--help")
        assert result.returncode == 0 and "Example" in result.stdout, command


def test_deploy_status_stop_need_no_torch_or_onnx(daemons, keys, build_a, tmp_path: Path) -> None:
    """The fleet commands import neither torch nor onnx: a workstation with the base install and
    the planner can operate a fleet (only standby slicing needs the compiler's ONNX tools)."""
    import os
    import subprocess

    from fleet_testlib import BIN

    shadow = tmp_path / "blocked"
    shadow.mkdir()
    for mod in ("torch", "onnx", "onnxscript", "onnx_ir", "timm", "torchvision"):
        (shadow / f"{mod}.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))}
    d = [daemons(f"d{i}") for i in range(3)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster(build / "cluster.toml", d, keys)
    for args in (("deploy", str(build), "--devices", "d0,d1,d2"), ("status", str(build)), ("stop", str(build))):
        result = subprocess.run([str(BIN / "edgepipe-fleet"), *args, "--key", str(keys.workstation_file)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, (args, result.stderr)
