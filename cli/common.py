"""What every command module shares: the consoles and the KEY=VALUE option parser.

Why its own module: the app imports its subcommand modules to register them, so they must
not import the app back.
"""

from __future__ import annotations

import json

from rich.console import Console

from kvpipe.errors import UsageError

console = Console()
err_console = Console(stderr=True)


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
