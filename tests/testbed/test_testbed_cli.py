"""`python tools/testbed.py up|run|status|down` as real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from testbed_helpers import ROOT, emulate, leftovers, needs_host, testbed

CLI = [sys.executable, str(ROOT / "tools" / "testbed.py")]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.parametrize("command", ["up", "run", "down", "status"])
def test_help_teaches_with_an_example(command):
    result = cli(command, "--help")
    assert result.returncode == 0
    assert "Example: python tools/testbed.py" in result.stdout


def test_refuses_without_root_in_one_line(tmp_path):
    cluster = tmp_path / "c.toml"
    cluster.write_text('[[device]]\nname = "a"\n')
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to drop root")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    for args in (["up", str(cluster)], ["status"], ["down", "x"]):
        result = subprocess.run([*prefix, *CLI, *args], capture_output=True, text=True, timeout=60, cwd="/")
        assert result.returncode == 2
        assert result.stderr == f"error: {emulate.NEEDS_ROOT}\n"
        assert result.stdout == ""


@pytest.mark.root
@needs_host
def test_up_status_run_down_round_trip(write_cluster):
    name = f"pytest-cli-{uuid.uuid4().hex[:8]}"
    cluster = write_cluster([{"name": "a", "cpu": 0.5, "memory": "64 MiB", "bandwidth": "20 Mbps",
                              "cpus": 1}, {"name": "b"}], name=name)
    result = cli("up", str(cluster), "--json")
    try:
        assert result.returncode == 0, result.stderr
        assert "warning: " in result.stderr and "'a': unknown field(s) cpus ignored" in result.stderr
        status = json.loads(result.stdout)
        assert status["owner"] == "detached"
        a = status["devices"][0]
        assert (a["name"], a["cpu"], a["memory_limit_bytes"]) == ("a", 0.5, 64 * 2**20)
        assert a["shaped_egress_bps"] == a["shaped_ingress_bps"] == 20_000_000

        again = cli("up", str(cluster))
        assert again.returncode == 2
        assert again.stderr.strip().endswith(f"testbed {name!r} is already up; "
                                             f"run `python tools/testbed.py down {name}` first")

        shown = cli("status", name, "--json")
        assert json.loads(shown.stdout)[0]["devices"][1]["address"] == status["devices"][1]["address"]
        assert name in cli("status").stdout

        inside = cli("run", name, "a", "--", "/bin/sh", "-c", "ip -4 -o addr show dev eth0; exit 7")
        assert inside.returncode == 7
        assert f"inet {a['address']}/24" in inside.stdout

        wrong = cli("run", name, "nope", "--", "true")
        assert wrong.returncode == 2
        assert wrong.stderr == f"error: testbed {name!r} has no device 'nope' (devices: a, b)\n"
    finally:
        state = testbed.load_state(name) if testbed.state_path(name).exists() else None
        down = cli("down", name, "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout) == {"testbeds": [name], "leftovers": []}
    assert state is not None and leftovers(state) == []
    gone = cli("status", name)
    assert gone.returncode == 2
    assert gone.stderr.startswith(f"error: no testbed named {name!r} is up")


@pytest.mark.root
@needs_host
def test_bad_cluster_file_is_one_line(write_cluster):
    cluster = write_cluster([{"name": "a", "memory": "lots"}])
    result = cli("up", str(cluster))
    assert result.returncode == 2
    assert result.stderr == f"error: {cluster}: [[device]] 'a'.memory: expected a size like '8 GiB', " \
                            "'512 MiB' or a number of bytes, got 'lots'\n"


@pytest.mark.root
@needs_host
def test_fidelity_bench_writes_its_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_testbed.py"), "--rates", "50",
                             "--cpu", "0.5", "--repeats", "1", "--seconds", "0.3", "--unshaped-mb", "4",
                             "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "testbed fidelity" in result.stdout and "command: " in result.stdout
    bench = json.loads(out.read_text())
    assert bench["command"].endswith(f"--json {out}")
    rows = {(r["what"], r["configured"]): r for r in bench["rows"]}
    assert set(rows) == {("tcp Mbit/s", 50.0), ("tcp Mbit/s", None), ("cpu cores", 0.5)}
    assert rows[("tcp Mbit/s", 50.0)]["ratio"] == rows[("tcp Mbit/s", 50.0)]["median"] / 50.0
    assert len(rows[("cpu cores", 0.5)]["samples"]) == 1
