"""Consoles for command-line tables, shared by edgepipe-plan and edgepipe-compile.

On a terminal, rich fits tables to the window. Piped or redirected (``edgepipe-plan ... | cat``,
``> plan.txt``), rich would assume 80 columns and cut cells short ("rcc-v…") or wrap summary
lines; there the console is wide enough that nothing is cut, and tables keep their natural width.
An explicit ``COLUMNS`` in the environment is still honoured.

``HelpCommand`` drops Typer's ``<bool>`` type column for on/off flags in ``--help`` (a flag takes no
value); edgepipe.agent.clihelp does the same for the agent's CLIs, and the planner, which imports
nothing of ours, keeps this small copy.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from typer.core import TyperCommand

PIPED_WIDTH = 400  # wide enough for every table the CLIs print; tables do not stretch to it


def console_for_output(stderr: bool = False) -> Console:
    """A rich Console for stdout (or stderr) that never truncates when not on a terminal."""
    console = Console(stderr=stderr)
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(stderr=stderr, width=PIPED_WIDTH)


class HelpCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # --help itself included
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params
