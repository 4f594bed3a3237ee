"""Every command's --help, as a newcomer reads it (issue 15, item 9): no `<bool>` type column for
flags, a usage line in the usual notation (`BUNDLE_DIR`, `[ENTRY]`; not `{bundle_dir}` or
`[[ENTRY]]`), and no help text mangled by rich markup (`name [host name].` printed as `name .`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from edgepipe.agent.cli import app as agent_app

BIN = Path(sys.executable).parent
# Every subcommand the agent has, so commands added later are checked too.
AGENT_COMMANDS = sorted(typer.main.get_command(agent_app).commands)
COMMANDS = [["edgepipe-agent"], *(["edgepipe-agent", c] for c in AGENT_COMMANDS),
            ["edgepipe-submit"], ["edgepipe-plan"], ["edgepipe-compile"]]


def help_text(argv: list[str]) -> str:
    # Wide, so that a check is never fooled by where rich wraps a line.
    proc = subprocess.run([str(BIN / argv[0]), *argv[1:], "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_agent_commands_are_found() -> None:
    assert {"serve", "check", "profile", "keygen", "metrics"} <= set(AGENT_COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_reads_like_any_other_command(argv: list[str]) -> None:
    text = help_text(argv)
    (usage,) = [line.strip() for line in text.splitlines() if line.strip().startswith("Usage:")]
    assert "{" not in usage and "[[" not in usage, usage
    assert "<bool>" not in text
    assert "--help" in text
    stray = re.findall(r".{0,30} [.,;:)](?:\s|$)", text)
    assert stray == [], stray


def test_usage_lines_name_their_arguments() -> None:
    assert "Usage: edgepipe-agent serve [OPTIONS] BUNDLE_DIR" in help_text(["edgepipe-agent", "serve"])
    assert "Usage: edgepipe-submit [OPTIONS] [ENTRY] [EXIT]" in help_text(["edgepipe-submit"])
    words = " ".join(help_text(["edgepipe-agent", "serve"]).replace("│", " ").split())
    assert "This device's name in logs and status (default: the host name)." in words
