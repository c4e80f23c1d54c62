"""``kvpipe paper``: the paper's tables and figures, kvpipe's numbers beside the paper's.

Thin: options -> ``kvpipe.probes.paper.write_paper``; registered on the main app by ``register(app)``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kvpipe.cli.common import console
from kvpipe.provenance import provenance


def _split(values: list[str]) -> list[str]:
    """Comma-separated and repeated options as one list (store URLs keep their ':')."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def paper(
    stores: list[str] = typer.Option([], help="stores without a prefix, comma-separated or repeated: Tables 1, 2, "
                                              "6 and Figures 2, 11-13 (run kvpipe probe on each first)"),
    out: Path = typer.Option(..., help="folder for tableN.{md,csv,png}, figure2/3/11-13.{md,csv,png}, run.json"),
    prefix_stores: list[str] = typer.Option([], help="Table 4: refcoco / spair / bdd10k stores extracted with "
                                                     "--prefix-from and --prefix-control"),
    results: list[str] = typer.Option([], help="folders written by kvpipe paired (Table 5) or kvpipe figure3 "
                                               "(Figure 3)"),
    paper_model: list[str] = typer.Option([], help="STORE_MODEL=PAPER_MODEL: read a store's model as one of the "
                                                   "paper's (llava-ov, qwen25vl, llava-next-llama3, siglip, "
                                                   "clip-vit-l14, dino-vitb8), e.g. for a local checkpoint"),
    normalise: str = typer.Option("none", help="averaged Figure-2 panels: none (the paper's plain mean) | minmax"),
) -> None:
    """Tables 1, 2, 4, 5, 6 and Figures 2, 3, 11-13 from probe results, the paper's numbers beside."""
    called = provenance("paper", dict(locals()))
    from kvpipe.probes.paper import parse_renames, write_paper

    result = write_paper(_split(stores), out, prefix_stores=_split(prefix_stores), results=_split(results),
                         renames=parse_renames(paper_model), normalise=normalise, record=called)
    for name, table in result.tables.items():
        filled = sum(c.value is not None for c in table.cells.values())
        console.print(f"{name}: {filled} of {len(table.cells)} cells filled")
    for note in result.notes:
        console.print(f"  note: {note}")
    console.print(f"-> {out} ({len(result.files)} files)")


def register(app: typer.Typer) -> None:
    app.command("paper")(paper)
