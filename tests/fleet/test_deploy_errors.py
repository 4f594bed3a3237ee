"""Every way a deploy can fail names the device and the cause, and leaves nothing half-started: an
unreachable device, a full disk, a file damaged on the way, a device serving another deployment, a
stage that cannot start (first deploy and redeploy), a manifest and weights swapped on the device,
a workstation the devices do not trust, and bad input (exit code 2)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from edgepipe.agent.formats.bundle import (
    DATA_NAME,
    GRAPH_NAME,
    MANIFEST_NAME,
    file_entries,
    read_manifest,
    write_manifest,
)
from edgepipe.agent.formats.keys import generate_keypair
from fleet_testlib import (
    copy_build,
    dead_endpoint,
    fleet,
    fleet_json,
    make_keys,
    run_requests,
    wait_until,
    whole_model,
    write_cluster,
)


def nothing_running(daemons, keys) -> bool:
    return all(d.status(keys)["stages"] == [] and d.status(keys)["deployment"] is None for d in daemons)


def test_unreachable_device_is_named_and_nothing_changes(daemons, keys, build_a, tmp_path: Path) -> None:
    d = [daemons("d0"), daemons("d1")]
    build = copy_build(build_a, tmp_path / "build")
    gone = dead_endpoint()
    write_cluster(build / "cluster.toml", d, keys, extra={"gone": gone})
    result = fleet("deploy", str(build), "--devices", "d0,d1,gone", "--json", keys=keys)
    assert result.returncode == 1
    assert f"cannot reach gone at {gone}" in result.stderr and "nothing was changed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert nothing_running(d, keys)
    assert all(x.status(keys)["store"]["objects"] == 0 for x in d)  # not a byte sent
    assert not (build / "deployment.json").exists() and not (build / "endpoints.json").exists()


def test_full_disk_is_named_and_nothing_starts(daemons, keys, build_a, tmp_path: Path) -> None:
    d = [daemons("d0"), daemons("d1", "--store-max-mb", "3"), daemons("d2")]  # stage 1 is ~7 MiB
    build = copy_build(build_a, tmp_path / "build")
    write_cluster(build / "cluster.toml", d, keys)
    result = fleet("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    assert result.returncode == 1
    assert "d1" in result.stderr and "not enough disk space" in result.stderr and "nothing was started" in result.stderr
    assert nothing_running(d, keys)
    assert d[1].status(keys)["store"]["bytes"] <= 3 * 2**20


def test_file_damaged_on_the_way_is_refused_on_arrival(daemons, keys, build_a, tmp_path: Path) -> None:
    d = [daemons(f"d{i}") for i in range(3)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster(build / "cluster.toml", d, keys)
    data = build / "stage-1" / DATA_NAME
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # same size, one bit: what a bad disk or cable does
    data.write_bytes(bytes(raw))
    result = fleet("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    assert result.returncode == 1
    assert "d1" in result.stderr and "stage.onnx.data" in result.stderr
    assert "sha256 mismatch on arrival" in result.stderr and "nothing was started" in result.stderr
    assert nothing_running(d, keys)
    assert d[1].status(keys)["store"]["partial_bytes"] == 0  # the damaged upload was deleted


def test_device_serving_another_deployment_is_refused_unless_replaced(daemons, keys, build_a, vit_tiny_model,
                                                                      tmp_path: Path) -> None:
    d = [daemons(f"d{i}") for i in range(4)]
    first = copy_build(build_a, tmp_path / "first")
    other = copy_build(build_a, tmp_path / "other")
    for b in (first, other):
        write_cluster(b / "cluster.toml", d, keys)
    owner = fleet_json("deploy", str(first), "--devices", "d0,d1,d2", keys=keys)["deployment"]
    result = fleet("deploy", str(other), "--devices", "d3,d2,d1", keys=keys)
    assert result.returncode == 1
    assert f"already serves deployment {owner!r}" in result.stderr and "--replace" in result.stderr
    assert d[3].status(keys)["stages"] == []  # nothing of the refused attempt runs anywhere
    assert d[2].status(keys)["deployment"]["id"] == owner

    taken = fleet_json("deploy", str(other), "--devices", "d3,d2,d1", "--replace", keys=keys)
    assert taken["deployment"] != owner
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224), dtype=np.float32)
    np.testing.assert_allclose(run_requests(other / "endpoints.json", [x], keys.client)[0],
                               whole_model(vit_tiny_model, x), atol=1e-4)
    result = fleet("status", str(first), "--json", keys=keys)
    assert result.returncode == 1  # the first deployment lost two of its devices
    status = json.loads(result.stdout)
    assert {r["device"]: r.get("foreign") for r in status["devices"]} == {"d0": False, "d1": True, "d2": True}


def broken_stage(bundle: Path) -> None:
    """A stage whose graph ONNX Runtime cannot load, with a manifest whose hashes match it: only
    starting it shows the problem."""
    (bundle / GRAPH_NAME).write_bytes(b"this is not an ONNX graph")
    manifest = read_manifest(bundle)
    names = [n for n in (GRAPH_NAME, DATA_NAME) if (bundle / n).exists()]
    write_manifest(bundle, manifest.__class__(**{**manifest.__dict__, "files": file_entries(bundle, names)}))


def test_a_stage_that_cannot_start_is_rolled_back_everywhere(daemons, keys, build_a, tmp_path: Path) -> None:
    d = [daemons(f"d{i}") for i in range(3)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster(build / "cluster.toml", d, keys)
    broken_stage(build / "stage-1")
    result = fleet("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    assert result.returncode == 1
    assert "d1: stage-1 did not start" in result.stderr and "rolled back on" in result.stderr
    assert wait_until(lambda: nothing_running(d, keys), 30)
    assert not (build / "endpoints.json").exists()


def test_a_failed_redeploy_goes_back_to_the_running_generation(daemons, keys, build_a, vit_tiny_model,
                                                               tmp_path: Path) -> None:
    d = [daemons(f"d{i}") for i in range(3)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster(build / "cluster.toml", d, keys)
    fleet_json("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    before = (build / "endpoints.json").read_text()
    broken_stage(build / "stage-1")
    result = fleet("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    assert result.returncode == 1 and "stage-1 did not start" in result.stderr
    assert (build / "endpoints.json").read_text() == before
    assert json.loads((build / "deployment.json").read_text())["generation"] == 1
    assert wait_until(lambda: all(s["state"] == "ready" and s["generation"] == 1
                                  for s in d[1].stages(keys).values()), 30)
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224), dtype=np.float32)
    np.testing.assert_allclose(run_requests(build / "endpoints.json", [x], keys.client)[0],
                               whole_model(vit_tiny_model, x), atol=1e-4)


def swap_in_store(state_dir: Path, bundle: Path) -> None:
    """What an attacker with the device's disk does: weights changed, the manifest rewritten to match
    them, both stored under the names (hashes) of the originals."""
    objects = state_dir / "store" / "objects"
    manifest = read_manifest(bundle)
    original_manifest = hashlib.sha256((bundle / MANIFEST_NAME).read_bytes()).hexdigest()
    weights = bytearray((bundle / DATA_NAME).read_bytes())
    middle = len(weights) // 2
    weights[middle:middle + 4096] = bytes(b ^ 0xFF for b in weights[middle:middle + 4096])
    forged = dict(manifest.files)
    forged[DATA_NAME] = forged[DATA_NAME].__class__(hashlib.sha256(weights).hexdigest(), len(weights))
    forged_manifest = manifest.__class__(**{**manifest.__dict__, "files": forged}).to_json() + "\n"
    for name, content in ((manifest.files[DATA_NAME].sha256, bytes(weights)),
                          (original_manifest, forged_manifest.encode())):
        os.chmod(objects / name, 0o644)
        (objects / name).write_bytes(content)


def test_manifest_and_weights_swapped_on_the_device_are_refused(daemons, keys, build_a, tmp_path: Path) -> None:
    d = [daemons(f"d{i}") for i in range(3)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster(build / "cluster.toml", d, keys)
    fleet_json("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    assert fleet("stop", str(build), keys=keys).returncode == 0
    swap_in_store(d[1].state_dir, build / "stage-1")
    result = fleet("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    assert result.returncode == 1
    assert "d1: stage-1: the stored manifest hashes to" in result.stderr
    assert "changed on this device; refused" in result.stderr
    assert nothing_running(d, keys)


def test_a_bundle_changed_while_running_does_not_restart(daemons, keys, build_a, tmp_path: Path) -> None:
    d = [daemons(f"d{i}") for i in range(3)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster(build / "cluster.toml", d, keys)
    fleet_json("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    swap_in_store(d[1].state_dir, build / "stage-1")
    os.kill(d[1].stages(keys)["stage-1"]["pid"], signal.SIGKILL)  # the crash makes the daemon start it again
    assert wait_until(lambda: d[1].stages(keys)["stage-1"]["state"] == "failed", 30)
    assert "changed on this device; not started" in d[1].stages(keys)["stage-1"]["last_error"]


@pytest.mark.parametrize("who", ["stranger", "insecure"])
def test_a_workstation_the_devices_do_not_trust_gets_nothing(daemons, keys, build_a, tmp_path: Path, who: str) -> None:
    d = [daemons(f"d{i}") for i in range(3)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster(build / "cluster.toml", d, keys)
    if who == "stranger":
        stranger = make_keys(tmp_path / "stranger")
        result = fleet("deploy", str(build), "--devices", "d0,d1,d2", "--timeout-s", "5", keys=stranger)
    else:
        result = fleet("deploy", str(build), "--devices", "d0,d1,d2", "--insecure")
    assert result.returncode == 1
    assert "cannot reach d0" in result.stderr and "nothing was changed" in result.stderr
    assert nothing_running(d, keys)
    assert all(x.status(keys)["store"]["objects"] == 0 for x in d)
    assert all(x.alive() for x in d)


def test_bad_input_is_exit_code_2_with_one_line(daemons, keys, build_a, tmp_path: Path) -> None:
    d = [daemons("d0")]
    build = copy_build(build_a, tmp_path / "build")
    cases = [
        (("deploy", str(tmp_path / "nope")), "no such build directory"),
        (("deploy", str(build), "--devices", "d0"), "no cluster file"),
    ]
    for args, message in cases:
        result = fleet(*args, keys=keys)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    write_cluster(build / "cluster.toml", d, keys)
    for args, message in [(("deploy", str(build), "--devices", "d0"), "names 1 device(s) for 3 stage(s)"),
                          (("deploy", str(build)), "no plan.json"),
                          (("deploy", str(build), "--devices", "d0,d0,d0"), "names a device twice"),
                          (("deploy", str(build), "--devices", "d0,x,y"), "device 'x' is not in the cluster file"),
                          (("status", str(build)), "nothing deployed from here")]:
        result = fleet(*args, keys=keys)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    write_cluster(build / "cluster.toml", d, keys, extra={"e1": dead_endpoint(), "e2": dead_endpoint()})
    text = (build / "cluster.toml").read_text().replace(f'public_key = "{d[0].public_key}"\n', "")
    (build / "cluster.toml").write_text(text)
    result = fleet("deploy", str(build), "--devices", "d0,e1,e2", keys=keys)
    assert result.returncode == 2 and "'d0' has no public_key" in result.stderr
    missing_key = fleet("deploy", str(build), "--key", str(tmp_path / "none.key_secret"))
    assert missing_key.returncode == 2 and "no such secret key file" in missing_key.stderr
    generate_keypair(tmp_path, "unused")  # keygen works where the fleet looks for keys
