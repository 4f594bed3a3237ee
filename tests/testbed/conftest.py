"""Fixtures for the testbed tests."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from testbed_helpers import TOOLS, cluster_toml


@pytest.fixture
def write_cluster(tmp_path: Path) -> Callable[..., Path]:
    """write_cluster(devices, name=None, extra="") -> path of a cluster TOML with a unique name."""

    def write(devices: list[dict[str, Any]], name: str | None = None, extra: str = "") -> Path:
        name = name or f"pytest-{uuid.uuid4().hex[:8]}"
        path = tmp_path / f"{name}.toml"
        path.write_text(cluster_toml(name, devices, extra))
        return path

    return write


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def tool_env() -> dict[str, str]:
    """Environment for subprocesses that import tools/ modules."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOOLS), env.get("PYTHONPATH")]))
    return env
