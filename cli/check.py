"""A dry check of a ``kvpipe ...`` command line: parsed exactly as the CLI would, not run.

Why: deployment files (Ray job entrypoints, container commands) embed kvpipe command lines; a
typo in a manifest fails a test instead of a cluster job. Its own module because it needs the
whole app, and the app imports the other command modules.
"""

from __future__ import annotations

import shlex
from typing import Sequence

from kvpipe.cli.app import app
from kvpipe.errors import UsageError


def check_command(argv: str | Sequence[str]) -> str:
    """Parse a ``kvpipe ...`` command line as the CLI would, without running it.

    Returns the subcommand's name; raises UsageError (one line) for an unknown command, an
    unknown or missing option, or a value of the wrong type.
    """
    import typer

    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    if args and args[0] in ("kvpipe", "python", "python3"):
        args = args[1:] if args[0] == "kvpipe" else args[3:] if args[1:3] == ["-m", "kvpipe.cli"] else args
    if not args:
        raise UsageError("empty kvpipe command")
    group = typer.main.get_command(app)
    try:
        with group.make_context("kvpipe", list(args), resilient_parsing=False) as ctx:
            name, cmd, rest = group.resolve_command(ctx, [*getattr(ctx, "_protected_args", []), *ctx.args])
            with cmd.make_context(name, rest, parent=ctx):
                pass
    except Exception as err:  # the CLI library's usage errors (typer ships its own click)
        if not hasattr(err, "format_message"):
            raise
        raise UsageError(f"kvpipe {' '.join(args[:1])}: {err.format_message()}") from None
    return name
