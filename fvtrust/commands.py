"""Registering sub-commands that live in their capability's subpackage.

A sub-command whose module fails to import must not silently vanish from the
CLI: it is registered as a stand-in that names the missing piece, shows in
``--help`` as UNAVAILABLE, and exits with one error line when run.
"""
from __future__ import annotations

import importlib

import click

from .errors import FvtrustError


def broken_command(name: str, module: str, error: BaseException) -> click.Command:
    """A stand-in for command `name` whose `module` raised `error` on import."""
    missing = getattr(error, "name", None) if isinstance(error, ImportError) else None
    why = f"missing module {missing!r}" if missing else f"{type(error).__name__}: {error}"
    message = f"`{name}` is unavailable: importing {module} failed ({why})"
    hint = "; install the missing package or reinstall fvtrust" if missing else ""

    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   help=f"UNAVAILABLE: {message}.", short_help=f"UNAVAILABLE ({why})", add_help_option=False)
    def broken():
        raise FvtrustError(message + hint)

    return broken


def register_commands(group: click.Group, table) -> None:
    """Add each (name, module, attribute) of `table` to `group`, or its stand-in if the import fails."""
    for name, module, attr in table:
        try:
            cmd = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            cmd = broken_command(name, module, e)
        group.add_command(cmd, name)
