"""Fixtures for the profiling tests: a vit_tiny profiling bundle (built once, by the real CLI) and
real `edgepipe-agent control` daemons on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # profiling_testlib, whatever pytest's import mode

from edgepipe.agent.formats.keys import generate_keypair
from edgepipe.agent.local import stop_processes
from profiling_testlib import BIN, DAEMON_KEYS, TINY, cli, dead_endpoint, workstation, write_cluster


@pytest.fixture(scope="session")
def profile_bundle_dir(vit_tiny_build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`edgepipe-compile vit_tiny --profile-bundle DIR` (the export is cached by vit_tiny_build)."""
    out = tmp_path_factory.mktemp("profile-bundle") / "pb"
    result = cli("edgepipe-compile", TINY, "--profile-bundle", str(out), "--json")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def start_control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., str]]:
    """start(device, *extra_args) -> the control endpoint of a new `edgepipe-agent control` process,
    secure (its own device key, the tests' workstation key authorised) unless --insecure is among
    the arguments."""
    procs: list[subprocess.Popen] = []
    root = tmp_path_factory.mktemp("control")

    def start(device: str, *extra: str) -> str:
        n = len(procs)
        ready = root / f"{device}-{n}.json"
        keys = root / f"{device}-{n}-keys"
        generate_keypair(keys, "device")
        (keys / "authorized_keys").write_text(workstation()[0].public_text + " tests' workstation\n")
        log = open(root / f"{device}-{n}.log", "w")  # noqa: SIM115 - kept open for the process
        proc = subprocess.Popen([str(BIN / "edgepipe-agent"), "control", "--listen", "tcp://127.0.0.1:0",
                                 "--device", device, "--ready-file", str(ready), "--data-ports", "auto",
                                 "--state-dir", str(root / f"{device}-{n}"), "--data-bind", "127.0.0.1", *extra],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "EDGEPIPE_KEYS": str(keys)})
        procs.append(proc)
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():
            assert proc.poll() is None, (root / f"{device}-{len(procs) - 1}.log").read_text()
            assert time.monotonic() < deadline, "control daemon did not start"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        if info.get("public_key"):
            DAEMON_KEYS[info["listen"]] = info["public_key"]
        return info["listen"]

    yield start
    stop_processes(procs)


@pytest.fixture(scope="session")
def daemons(start_control: Callable[..., str]) -> dict[str, str]:
    """Two control daemons, d0 and d1: device name -> endpoint."""
    return {"d0": start_control("d0"), "d1": start_control("d1")}


@pytest.fixture(scope="session")
def planned(daemons, vit_tiny_build, tmp_path_factory) -> Path:
    """`edgepipe-compile vit_tiny --cluster --profile --probe-links` over d0, d1 and a dead device."""
    root = tmp_path_factory.mktemp("planned")
    cluster = write_cluster(root / "c.toml", {**daemons, "gone": dead_endpoint()}, types={"gone": "slow"})
    result = cli("edgepipe-compile", TINY, "--cluster", str(cluster), "--profile", "--probe-links",
                 "--microbatch", "2", "-o", str(root / "out"), "--no-verify", "--key", str(workstation()[1]))
    assert result.returncode == 0, result.stderr
    (root / "stderr.txt").write_text(result.stderr)
    (root / "stdout.txt").write_text(result.stdout)
    return root
