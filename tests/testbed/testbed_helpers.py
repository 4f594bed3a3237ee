"""Helpers for the testbed tests: tools/ on sys.path, cluster files, checks for leftovers.

A module of its own (not conftest.py) so test files can import it by a name no other test folder uses.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import emulate  # noqa: E402
import testbed  # noqa: E402

HOST_PROBLEM = emulate.host_problem()
# Tests that build real namespaces and cgroups skip, with the testbed's own reason, where it cannot run.
needs_host = pytest.mark.skipif(HOST_PROBLEM is not None, reason=HOST_PROBLEM or "")


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def cluster_toml(name: str, devices: list[dict[str, Any]], extra: str = "") -> str:
    """A cluster file in the planner's format with one [[device]] table per dict."""
    lines = ["[cluster]", f"name = {_toml_value(name)}", "", "[[type]]", 'name = "board"', "gflops = 10.0"]
    for device in devices:
        lines += ["", "[[device]]", 'type = "board"']
        lines += [f"{key} = {_toml_value(value)}" for key, value in device.items()]
    return "\n".join(lines) + "\n" + extra


def leftovers(state: testbed.TestbedState) -> list[str]:
    """Everything of `state` that still exists: namespaces, links, cgroups and its state file."""
    return run_leftovers(state.run_id, state.name)


def run_leftovers(run_id: str, name: str | None) -> list[str]:
    """Namespaces, links and cgroups named for run `run_id`, and the state file of testbed `name`."""
    prefix = f"ep-{run_id}-"
    found = [n for n in emulate.list_netns() if n.startswith(prefix)]
    found += [n for n in emulate.list_links() if n.startswith(prefix)]
    found += sorted(n for n in emulate.list_cgroups() if n.startswith(prefix))
    if name is not None and testbed.state_path(name).exists():
        found.append(str(testbed.state_path(name)))
    return found


def pid_alive(pid: int) -> bool:
    """True if `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
