"""Helpers of the operations commands: ``kvpipe status`` output and a dry check of a command line.

Why a dry check: deployment files (Ray job entrypoints, container commands) embed kvpipe
command lines; ``check_command`` parses one exactly as the CLI would, without running it, so
a typo in a manifest fails a test instead of a cluster job.
"""

from __future__ import annotations

import shlex
from typing import Sequence

from rich.console import Console
from rich.table import Table

from kvpipe.errors import UsageError
from kvpipe.store.status import StoreStatus, ranges


def print_status(console: Console, st: StoreStatus, all_parts: bool = False) -> None:
    done, failed, pending = st.count("done"), st.count("failed"), st.count("pending")
    console.print(f"[bold]{st.root}[/]: {st.n_parts} parts: [green]{done} done[/], "
                  f"[red]{failed} failed[/], [yellow]{pending} pending[/]")
    rows = st.parts if all_parts else st.of("failed")
    if rows:
        table = Table("part", "state", "images", "detail")
        for p in rows:
            colour = {"done": "green", "failed": "red", "pending": "yellow"}[p.state]
            table.add_row(f"p{p.part:06d}", f"[{colour}]{p.state}[/]", str(p.images), p.detail)
        console.print(table)
    if pending and not all_parts:
        console.print(f"pending: {ranges([p.part for p in st.of('pending')])}")
    if failed or pending:
        console.print("rerun the same kvpipe extract command to finish (failed parts with an error are retried)")


def check_command(argv: str | Sequence[str]) -> str:
    """Parse a ``kvpipe ...`` command line as the CLI would, without running it.

    Returns the subcommand's name; raises UsageError (one line) for an unknown command, an
    unknown or missing option, or a value of the wrong type.
    """
    import typer

    from kvpipe.cli.app import app

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
