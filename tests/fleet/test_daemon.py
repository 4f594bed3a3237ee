"""The device daemon on its own, as a real process: who may ask what (operators, clients, peers,
strangers, plaintext), refusing to start without keys, the bundle store (chunks in order, hashes
checked on arrival, resumed uploads), the control socket fuzzed, stages restarted after a crash and
after a hang, stages restored after a daemon restart, and the systemd unit."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from edgepipe.agent.control_client import ControlConnection, auth_for, control_request
from edgepipe.agent.formats.control import CONTROL_VERSION, MAX_CHUNK_BYTES, ControlError
from edgepipe.agent.formats.keys import load_keypair, new_keypair
from edgepipe.agent.transport import INSECURE
from fleet_testlib import BIN, copy_build, fleet_json, run_requests, start_daemon, stop_daemon, wait_until, whole_model
from fleet_testlib import write_cluster as write_cluster_file


def put(daemon, keys, data: bytes, offset: int = 0, size: int | None = None, sha: str | None = None) -> dict:
    sha = sha or hashlib.sha256(data).hexdigest()
    return daemon.request(keys, {"cmd": "put", "sha256": sha, "size": len(data) if size is None else size,
                                 "offset": offset}, [data[offset:] if size is None else data])


def test_only_authorised_keys_get_an_answer(daemons, keys) -> None:
    d = daemons("d0")
    assert d.status(keys)["secure"] is True and d.status(keys)["public_key"] == d.public_key
    for auth in (auth_for(new_keypair(), d.public_key), INSECURE,
                 auth_for(keys.workstation, new_keypair().public_text)):  # stranger, plaintext, wrong server key
        with pytest.raises(ControlError, match="no answer"):
            control_request(d.endpoint, {"cmd": "status"}, auth=auth, timeout_s=1.0)
    assert d.alive() and d.status(keys)["ok"]


def test_clients_may_only_ask_for_the_route(daemons, keys, build_a, tmp_path: Path) -> None:
    d = [daemons(f"d{i}") for i in range(3)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster_file(build / "cluster.toml", d, keys)
    fleet_json("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    client = auth_for(keys.client, d[1].public_key)
    route = control_request(d[1].endpoint, {"cmd": "route"}, auth=client)
    assert route["generation"] == 1 and route["endpoints"]["entry"][0]["public_key"] == d[0].public_key
    assert control_request(d[1].endpoint, {"cmd": "ping"}, auth=client)["generation"] == 1
    for header in ({"cmd": "status"}, {"cmd": "stop"}, {"cmd": "have", "files": []},
                   {"cmd": "probe", "peer": "tcp://127.0.0.1:1"}):
        with pytest.raises(ControlError, match="not allowed for a client key"):
            control_request(d[1].endpoint, header, auth=client)
    # another device of the deployment may send echoes (link probes), nothing else
    peer = auth_for(load_keypair(d[0].key_dir / "device.key_secret"), d[1].public_key)
    assert control_request(d[1].endpoint, {"cmd": "echo"}, [b"x" * 100], auth=peer)["bytes"] == 100
    with pytest.raises(ControlError, match="not allowed for a peer key"):
        control_request(d[1].endpoint, {"cmd": "route"}, auth=peer)
    assert d[1].stages(keys)["stage-1"]["state"] == "ready"
    assert fleet_json("stop", str(build), keys=keys)["stopped"]


def test_route_follows_the_generation_for_clients(daemons, keys, build_a, build_b, tmp_path: Path) -> None:
    from edgepipe.agent.control_client import find_route
    from edgepipe.agent.formats.endpoints import load_endpoints

    d = [daemons(f"d{i}") for i in range(3)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster_file(build / "cluster.toml", d, keys)
    fleet_json("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    first = load_endpoints(build / "endpoints.json")
    assert find_route(first, keys.client) is None  # nothing newer yet
    copy_build(build_b, build)
    fleet_json("deploy", str(build), "--devices", "d2,d0,d1", keys=keys)
    newer = find_route(first, keys.client)
    assert newer is not None and newer.generation == 2 and newer == load_endpoints(build / "endpoints.json")


@pytest.mark.parametrize(("setup", "message"), [
    ("no-key", "no such secret key file"),
    ("no-authorized", "no authorized keys file"),
    ("empty-authorized", "no authorized workstation keys"),
])
def test_no_keys_no_daemon(keys, tmp_path: Path, setup: str, message: str) -> None:
    from edgepipe.agent.formats.keys import generate_keypair

    key_dir = tmp_path / "keys"
    if setup != "no-key":
        generate_keypair(key_dir, "device")
    if setup == "empty-authorized":
        (key_dir / "authorized_keys").write_text("# nobody yet\n")
    key_dir.mkdir(exist_ok=True)
    result = subprocess.run([str(BIN / "edgepipe-agent"), "daemon", "--listen", "tcp://127.0.0.1:0", "--state-dir",
                             str(tmp_path / "state")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "EDGEPIPE_KEYS": str(key_dir)})
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_insecure_mode_is_by_name_and_warns(keys, tmp_path: Path) -> None:
    d = start_daemon(keys, tmp_path, "open", "--insecure")
    try:
        reply = control_request(d.endpoint, {"cmd": "status"}, auth=INSECURE)
        assert reply["secure"] is False
        assert "INSECURE" in d.log.read_text() and "can deploy and run code" in d.log.read_text()
    finally:
        stop_daemon(d)


def test_store_checks_chunks_and_hashes_on_arrival(daemons, keys) -> None:
    d = daemons("d0")
    data = os.urandom(3 * 2**20 + 123)
    sha = hashlib.sha256(data).hexdigest()
    assert d.request(keys, {"cmd": "have", "files": [sha]})["missing"] == [sha]
    first = put(d, keys, data[: 2**20], 0, len(data), sha)
    assert first == {**first, "received": 2**20, "complete": False}
    with pytest.raises(ControlError, match="chunk at offset 2097152, but 1048576 bytes have arrived"):
        put(d, keys, data[2 * 2**20: 3 * 2**20], 2 * 2**20, len(data), sha)
    assert d.request(keys, {"cmd": "have", "files": [sha]})["partial"] == {sha: 2**20}  # resumable
    done = put(d, keys, data[2**20:], 2**20, len(data), sha)
    assert done["complete"] and done["received"] == len(data)
    assert d.request(keys, {"cmd": "have", "files": [sha]})["missing"] == []
    assert put(d, keys, data)["complete"]  # already there: nothing written

    fake = "0" * 64
    with pytest.raises(ControlError, match="sha256 mismatch on arrival"):
        put(d, keys, b"not what the hash says", sha=fake)
    have = d.request(keys, {"cmd": "have", "files": [fake]})
    assert have["missing"] == [fake] and have["partial"] == {}  # the bad upload was deleted
    with pytest.raises(ControlError, match="at most"):
        put(d, keys, b"x" * (MAX_CHUNK_BYTES + 1))
    with pytest.raises(ControlError, match="past the file's size"):
        put(d, keys, b"abcdef", 0, 3, hashlib.sha256(b"abc").hexdigest())
    assert d.alive()


def test_control_socket_fuzz_every_message_answered_daemon_alive(daemons, keys) -> None:
    """Random frames, random msgpack, valid headers with wrong field types: each gets an error reply
    (or a normal one); nothing stops the daemon or leaves it unresponsive."""
    d = daemons("d0")
    rng = random.Random(11)
    values = [None, True, -1, 0, 2**63, -(2**63), 1.5, "", "x" * 300, "../../etc", [], [1, "a"], {}, {"a": 1},
              b"\x00" * 3, "tcp://127.0.0.1:1", "0" * 64]
    fields = ["v", "cmd", "id", "files", "sha256", "size", "offset", "deployment", "generation", "stages", "peer",
              "peer_key", "bytes", "count", "seconds", "drain", "release", "endpoints", "stage", "lines", "keys",
              "microbatches", "replace", "clients", "peers"]
    from edgepipe.agent.formats.control import COMMANDS

    messages: list[list[bytes]] = []
    for _ in range(300):
        kind = rng.random()
        if kind < 0.15:
            messages.append([os.urandom(rng.randrange(0, 200))])
        elif kind < 0.25:
            messages.append([msgpack.packb(rng.choice(values))])
        else:
            header = {"v": CONTROL_VERSION if rng.random() < 0.9 else rng.choice(values),
                      "cmd": rng.choice(COMMANDS) if rng.random() < 0.9 else rng.choice(values)}
            for name in rng.sample(fields, rng.randrange(0, 6)):
                header[name] = rng.choice(values)
            extra = [os.urandom(rng.randrange(0, 64)) for _ in range(rng.randrange(0, 3))]
            messages.append([msgpack.packb(header, use_bin_type=True), *extra])
    answered = 0
    with ControlConnection(d.endpoint, auth_for(keys.workstation, d.public_key)) as conn:
        sock = conn._sock
        for frames in messages:
            sock.send_multipart([b"", *frames])
            assert conn._poller.poll(10_000), f"no answer to {frames!r:.200}"
            reply = msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
            assert isinstance(reply, dict) and "ok" in reply
            answered += 1
        # an envelope without the delimiter is answered too
        sock.send_multipart([msgpack.packb({"v": CONTROL_VERSION, "cmd": "status"})])
        assert conn._poller.poll(10_000)
        assert "empty delimiter" in msgpack.unpackb(sock.recv_multipart()[-1], raw=False)["error"]
    assert answered == len(messages)
    assert d.alive() and d.status(keys)["ok"] and d.status(keys)["stages"] == []
    # a frame over the daemon's limit is cut off by libzmq: the daemon keeps answering others
    small = daemons("small", "--max-request-mb", "1")
    ctx = zmq.Context()
    try:
        with ControlConnection(small.endpoint, auth_for(keys.workstation, small.public_key), ctx) as conn:
            conn.send({"cmd": "echo"}, [b"\0" * (2 * 2**20)])
            with pytest.raises(ControlError, match="no answer"):
                conn.receive(1.0)
    finally:
        ctx.term()
    assert small.status(keys)["ok"] and small.alive()


def deployed(daemons, keys, build_a, tmp_path: Path, *extra: str):
    d = [daemons(f"d{i}", *extra) for i in range(3)]
    build = copy_build(build_a, tmp_path / "build")
    write_cluster_file(build / "cluster.toml", d, keys)
    fleet_json("deploy", str(build), "--devices", "d0,d1,d2", keys=keys)
    return d, build


def test_a_crashed_stage_is_restarted_on_the_same_ports(daemons, keys, build_a, vit_tiny_model, tmp_path) -> None:
    d, build = deployed(daemons, keys, build_a, tmp_path)
    before = d[1].stages(keys)["stage-1"]
    os.kill(before["pid"], signal.SIGKILL)
    assert wait_until(lambda: d[1].stages(keys)["stage-1"]["state"] == "ready"
                      and d[1].stages(keys)["stage-1"]["pid"] != before["pid"], 60)
    after = d[1].stages(keys)["stage-1"]
    assert after["restarts"] == 1 and after["ports"] == before["ports"] and after["last_exit"] == "killed by SIGKILL"
    x = np.random.default_rng(4).standard_normal((1, 3, 224, 224), dtype=np.float32)
    np.testing.assert_allclose(run_requests(build / "endpoints.json", [x], keys.client)[0],
                               whole_model(vit_tiny_model, x), atol=1e-4)
    status = fleet_json("status", str(build), keys=keys)
    assert status["devices"][1]["stages"][0]["restarts"] == 1


def test_a_hung_stage_is_killed_and_restarted(daemons, keys, build_a, tmp_path) -> None:
    d, _ = deployed(daemons, keys, build_a, tmp_path, "--hang-s", "2")
    before = d[2].stages(keys)["stage-2"]
    os.kill(before["pid"], signal.SIGSTOP)  # a stalled device: the process exists and does nothing
    try:
        assert wait_until(lambda: d[2].stages(keys)["stage-2"]["hangs"] == 1, 30)
        assert wait_until(lambda: d[2].stages(keys)["stage-2"]["state"] == "ready"
                          and d[2].stages(keys)["stage-2"]["pid"] != before["pid"], 60)
        after = d[2].stages(keys)["stage-2"]
        assert after["pid"] != before["pid"] and "hung" in after["last_exit"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(before["pid"], signal.SIGKILL)
    assert "hung: its control endpoint has not answered" in d[2].log.read_text()


def test_a_restarted_daemon_starts_its_stages_again(daemons, keys, build_a, vit_tiny_model, tmp_path) -> None:
    d, build = deployed(daemons, keys, build_a, tmp_path)
    old = d[1].stages(keys)["stage-1"]
    assert stop_daemon(d[1]) == 0
    assert wait_until(lambda: not _alive(old["pid"]), 30)  # the daemon took its stage down with it
    again = start_daemon(keys, tmp_path, "d1", *d[1].extra, state_dir=d[1].state_dir, key_dir=d[1].key_dir,
                         listen=d[1].endpoint)
    try:
        assert wait_until(lambda: again.stages(keys).get("stage-1", {}).get("state") == "ready", 60)
        assert again.stages(keys)["stage-1"]["ports"] == old["ports"]
        x = np.random.default_rng(5).standard_normal((1, 3, 224, 224), dtype=np.float32)
        np.testing.assert_allclose(run_requests(build / "endpoints.json", [x], keys.client)[0],
                                   whole_model(vit_tiny_model, x), atol=1e-4)
    finally:
        stop_daemon(again)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def test_systemd_unit_runs_the_daemon(tmp_path: Path) -> None:
    result = subprocess.run([str(BIN / "edgepipe-agent"), "unit", "--user", "edge", "--state-dir",
                             "/var/lib/edgepipe", "--keys", "/etc/edgepipe/keys"], capture_output=True, text=True)
    assert result.returncode == 0
    unit = result.stdout
    assert "[Service]" in unit and "[Install]" in unit and "User=edge" in unit
    exec_line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_line.split()[0] == f"ExecStart={BIN / 'edgepipe-agent'}" and " daemon " in exec_line
    assert "--state-dir /var/lib/edgepipe" in exec_line and "Environment=EDGEPIPE_KEYS=/etc/edgepipe/keys" in unit
    assert "KillMode=mixed" in unit and "RestartPreventExitStatus=2" in unit and "StateDirectory=edgepipe" in unit
    elsewhere = subprocess.run([str(BIN / "edgepipe-agent"), "unit", "--state-dir", str(tmp_path)],
                               capture_output=True, text=True).stdout
    assert "StateDirectory" not in elsewhere  # systemd creates state directories only under /var/lib
