"""``kvpipe status`` output: parts done, pending and failed, as a table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

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
