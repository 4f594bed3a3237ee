"""Device daemons, keys, cluster files and the supervisor as real processes, for the fleet tests
(tests/fleet) and benchmarks (tools/bench_deploy.py): on loopback, or inside testbed devices.

Each daemon gets its own device key and state directory and authorises the harness's workstation
key; a restarted daemon reuses both (a device that reboots).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.agent.control_client import auth_for, control_request
from edgepipe.agent.formats.keys import KeyPair, generate_keypair

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Keys:
    workstation: KeyPair
    workstation_file: Path
    client: KeyPair
    client_file: Path  # its secret key file
    root: Path


@dataclass
class Daemon:
    name: str
    endpoint: str
    public_key: str
    proc: subprocess.Popen
    state_dir: Path
    key_dir: Path
    log: Path
    extra: tuple[str, ...] = ()  # the daemon options the test added

    def request(self, keys: Keys, header: dict[str, Any], frames: Sequence[bytes] = (),
                timeout_s: float = 10.0) -> dict[str, Any]:
        return control_request(self.endpoint, header, frames, auth=auth_for(keys.workstation, self.public_key),
                               timeout_s=timeout_s)

    def status(self, keys: Keys) -> dict[str, Any]:
        return self.request(keys, {"cmd": "status"})

    def stages(self, keys: Keys) -> dict[str, dict[str, Any]]:
        return {s["id"]: s for s in self.status(keys)["stages"]}

    def alive(self) -> bool:
        return self.proc.poll() is None


def make_keys(root: Path) -> Keys:
    ws, _, ws_file = generate_keypair(root / "workstation", "workstation")
    client, _, client_file = generate_keypair(root / "client", "client")
    return Keys(ws, ws_file, client, client_file, root)


def start_daemon(keys: Keys, root: Path, name: str, *extra: str, authorized: str | None = None,
                 state_dir: Path | None = None, key_dir: Path | None = None, listen: str = "tcp://127.0.0.1:0",
                 data_bind: str = "127.0.0.1", data_ports: str = "auto", launcher=None,
                 timeout_s: float = 60.0) -> Daemon:
    """A daemon named ``name`` (its own device key unless ``key_dir`` reuses one) that authorises the
    tests' workstation key. ``launcher(argv, **popen_kwargs)`` starts it somewhere else (a testbed
    device); the key and state directories are reused when they exist (a restart)."""
    key_dir = key_dir or root / f"{name}-keys"
    if not (key_dir / "device.key_secret").exists():
        generate_keypair(key_dir, "device")
        (key_dir / "authorized_keys").write_text((authorized or keys.workstation.public_text) + " workstation\n")
    state_dir = state_dir or root / f"{name}-state"
    ready = root / f"{name}-ready.json"
    ready.unlink(missing_ok=True)
    log = root / f"{name}.log"
    args = ("--device", name, "--listen", listen, "--state-dir", str(state_dir), "--ready-file", str(ready),
            "--data-ports", data_ports, "--data-bind", data_bind, "--drain-timeout-s", "5", *extra)
    extra = tuple(extra)
    launcher = launcher or subprocess.Popen
    with open(log, "a") as fh:
        proc = launcher([str(BIN / "edgepipe-agent"), "daemon", *args], stdout=fh, stderr=subprocess.STDOUT,
                        env={**os.environ, "EDGEPIPE_KEYS": str(key_dir)}, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"daemon {name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daemon {name} not ready: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return Daemon(name, info["listen"], info["public_key"] or "", proc, state_dir, key_dir, log, extra)


def start_daemon_in(bed, keys: Keys, root: Path, name: str, *extra: str) -> Daemon:
    """A daemon inside testbed device ``name``, listening on its address, stages on ports 5550-5599."""
    return start_daemon(keys, root, name, *extra, listen=bed.endpoint(name, 5560), data_bind="*",
                        data_ports="5550-5599", state_dir=root / f"{name}-state", key_dir=root / f"{name}-keys",
                        launcher=lambda argv, **kw: bed.run_in(name, argv, **kw))


def stop_daemon(daemon: Daemon, timeout_s: float = 30.0) -> int | None:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
    return daemon.proc.returncode


def write_cluster(path: Path, daemons: Sequence[Daemon], keys: Keys, *, extra: dict[str, str] | None = None) -> Path:
    """The cluster file: one type, every daemon a device with its control endpoint and public key;
    ``extra`` adds devices by name -> control endpoint (with a made-up key)."""
    from edgepipe.agent.formats.keys import new_keypair

    text = (f'[cluster]\nname = "fleet-test"\nworkstation_key = "{keys.workstation.public_text}"\n'
            f'clients = ["{keys.client.public_text}"]\n\n'
            '[[type]]\nname = "cpu"\ngflops = 50.0\n')
    rows = [(d.name, d.endpoint, d.public_key) for d in daemons]
    rows += [(n, e, new_keypair().public_text) for n, e in (extra or {}).items()]
    for name, endpoint, key in rows:
        text += (f'\n[[device]]\nname = "{name}"\ntype = "cpu"\nmemory = "2 GiB"\nbandwidth = "1 Gbps"\n'
                 f'control = "{endpoint}"\npublic_key = "{key}"\n')
    path.write_text(text)
    return path


def start_supervisor(build: Path, keys: Keys, events: Path, *extra: str) -> subprocess.Popen:
    """`edgepipe-fleet supervise BUILD --events FILE` as a process of its own."""
    log = open(build / "supervise.log", "a")  # noqa: SIM115 - kept open for the process
    return subprocess.Popen([str(BIN / "edgepipe-fleet"), "supervise", str(build), "--key", str(keys.workstation_file),
                             "--events", str(events), *extra], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_supervisor(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def events_of(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def wait_event(path: Path, event: str, proc: subprocess.Popen, timeout_s: float = 300.0, after: float = 0.0,
               ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in events_of(path) if e["event"] == event and e["t"] >= after]
        if found:
            return found[0]
        if proc.poll() is not None:
            raise RuntimeError(f"supervisor exited ({proc.returncode}) before {event!r}")
        time.sleep(0.1)
    raise TimeoutError(f"no {event!r} event in {timeout_s:g} s: {[e['event'] for e in events_of(path)]}")
