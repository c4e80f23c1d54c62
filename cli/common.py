"""What every command module shares: the consoles and the KEY=VALUE option parser.

Why its own module: the app imports its subcommand modules to register them, so they must
not import the app back.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from rich.console import Console

from kvpipe.errors import UsageError


def _width(stream) -> int | None:
    """A terminal's own width; piped or redirected output is not wrapped at 80 columns."""
    return None if stream.isatty() else int(os.environ.get("COLUMNS", 200))


def consoles() -> tuple[Console, Console]:
    """The CLI's consoles for standard output and error, as wide as their streams allow."""
    return Console(width=_width(sys.stdout)), Console(stderr=True, width=_width(sys.stderr))


console, err_console = consoles()

# The store: --store everywhere; info, status and verify also take it as their argument.
STORE_ARG = typer.Argument(None, help="store directory or URL (or --store)", show_default=False)
STORE_OPT = typer.Option(None, "--store", help="store directory or URL")


def one_store(positional: Optional[str], option: Optional[str]) -> str:
    if positional and option and positional != option:
        raise UsageError(f"two stores given ({positional} and --store {option}); give one")
    store = positional or option
    if not store:
        raise UsageError("give the store: --store PATH (a directory or URL made by kvpipe extract)")
    return store


def parse_params(items: list[str], flag: str = "--param") -> dict[str, object]:
    """``KEY=VALUE`` items -> a dict; values parse as JSON where they can (numbers, lists), else strings."""
    params: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{flag} {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            params[k] = json.loads(v)
        except ValueError:
            params[k] = v
    return params
