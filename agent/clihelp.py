"""`--help` for the Typer CLIs that reads like any other command's: `--json` rather than
`--json <bool>`, and `serve [OPTIONS] BUNDLE` rather than `serve [OPTIONS] {bundle_dir}`.

Typer shows a type column for on/off flags (they take no value, so `<bool>` only suggests typing
one) and wraps required arguments in braces, which newcomers read as syntax. `Typer` below is a
drop-in `typer.Typer` whose commands get `HelpCommand` unless a command asks for another class,
so commands added later look the same without remembering anything. The planner keeps a copy
(planner/console.py) because it imports nothing of ours.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup


def argument_usage(argument: TyperArgument) -> str:
    """BUNDLE, [ENTRY] when optional, FILES... when it takes several: the usual Unix notation."""
    name = argument.metavar or (argument.name or "ARG").upper()
    if not argument.required:
        name = f"[{name}]"
    return f"{name}..." if argument.nargs != 1 else name


def _without_flag_types(params: list[Any]) -> list[Any]:
    for param in params:  # an on/off flag takes no value: no type to show
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class HelpCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _without_flag_types(super().get_params(ctx))  # --help itself included

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(argument_usage(param))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class HelpGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _without_flag_types(super().get_params(ctx))


class Typer(typer.Typer):
    def __init__(self, *args: Any, cls: type[TyperGroup] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, cls=cls or HelpGroup, **kwargs)

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or HelpCommand, **kwargs)
