"""Helpers for the profiling tests (fixtures are in conftest.py beside this file)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

from edgepipe.agent.control_client import auth_for
from edgepipe.agent.formats.keys import KeyPair, generate_keypair, new_keypair

BIN = Path(sys.executable).parent
TINY = "vit_tiny_patch16_224"
DAEMON_KEYS: dict[str, str] = {}  # control endpoint -> the daemon's public key (filled by start_control)


@cache
def workstation() -> tuple[KeyPair, Path]:
    """The tests' workstation keypair and its secret key file (what --key takes)."""
    pair, _, secret = generate_keypair(Path(tempfile.mkdtemp(prefix="edgepipe-ws-")), "workstation")
    return pair, secret


def auth(endpoint: str):
    """The workstation's authenticated connection to the daemon at ``endpoint``."""
    return auth_for(workstation()[0], DAEMON_KEYS[endpoint])


def cli(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def dead_endpoint() -> str:
    """A loopback endpoint nobody listens on (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def write_cluster(path: Path, endpoints: dict[str, str], types: dict[str, str] | None = None) -> Path:
    """A cluster file: type "cpu" (50 GFLOPS) and "slow" (0.01 GFLOPS); every device on "cpu" unless
    ``types`` says otherwise; each device's address is its control endpoint, with the daemon's public
    key (a made-up one for an endpoint nobody listens on)."""
    text = '[[type]]\nname = "cpu"\ngflops = 50.0\n\n[[type]]\nname = "slow"\ngflops = 0.01\n'
    for name, endpoint in endpoints.items():
        kind = (types or {}).get(name, "cpu")
        key = DAEMON_KEYS.get(endpoint) or new_keypair().public_text
        text += (f'\n[[device]]\nname = "{name}"\ntype = "{kind}"\naddress = "{endpoint}"\n'
                 f'public_key = "{key}"\nmemory = "2 GiB"\nbandwidth = "1 Gbps"\n')
    path.write_text(text)
    return path
