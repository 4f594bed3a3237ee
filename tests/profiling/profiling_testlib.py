"""Helpers for the profiling tests (fixtures are in conftest.py beside this file)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
TINY = "vit_tiny_patch16_224"


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
    ``types`` says otherwise; each device's address is its control endpoint."""
    text = '[[type]]\nname = "cpu"\ngflops = 50.0\n\n[[type]]\nname = "slow"\ngflops = 0.01\n'
    for name, endpoint in endpoints.items():
        kind = (types or {}).get(name, "cpu")
        text += (f'\n[[device]]\nname = "{name}"\ntype = "{kind}"\naddress = "{endpoint}"\n'
                 f'memory = "2 GiB"\nbandwidth = "1 Gbps"\n')
    path.write_text(text)
    return path
