"""``kvpipe extract --repair``: forget what ``verify_store`` finds damaged, so the run redoes
exactly that: damaged parts, damaged text queries, a dataset.json that no longer matches.

Why delete only the record: the manifest record is a part's commit (text.parquet is the text
queries'). Removing it (one unlink or one DELETE, atomic on both kinds of storage) turns the
part back into a pending one in a single step; its damaged files are replaced when the part
is committed again (``run_job`` rewrites text queries when ``text_committed()`` is False).
dataset.json is rewritten from the dataset, but only when the dataset's annotations have
the sha256 the metadata records (else it is another feature set and nothing is written).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvpipe.errors import StoreError
from kvpipe.store import layout
from kvpipe.store.fs import Location
from kvpipe.store.manifest import read_part_record_bytes


@dataclass
class RepairPlan:
    parts: dict[int, list[str]] = field(default_factory=dict)
    text: list[str] = field(default_factory=list)
    structure: list[str] = field(default_factory=list)


def damaged(loc: Location) -> RepairPlan:
    """Everything that fails verification (unreadable records included), with why."""
    from kvpipe.store.verify import verify_store

    plan = RepairPlan()
    for name in loc.listdir(layout.MANIFEST):
        if not (name.startswith("p") and name.endswith(".parquet")):
            continue
        try:
            read_part_record_bytes(loc.read_bytes(f"{layout.MANIFEST}/{name}"), f"{layout.MANIFEST}/{name}")
        except Exception as err:
            plan.parts[layout.part_of_manifest_name(name)] = [f"unreadable commit record ({str(err).splitlines()[0]})"]
    report = verify_store(loc)
    for part, problems in report.problems.items():
        plan.parts.setdefault(part, []).extend(p for p in problems if p not in plan.parts.get(part, []))
    plan.text, plan.structure = report.text_problems, report.structure_problems
    return plan


def damaged_parts(loc: Location) -> dict[int, list[str]]:
    """Committed parts that fail verification (unreadable records included), with why."""
    return damaged(loc).parts


def drop_damaged_parts(loc: Location, structure: dict[str, Any] | None = None) -> dict[int, list[str]]:
    """Delete the commit record of every damaged part (and of damaged text queries); rewrite
    dataset.json from ``structure`` when it is damaged; returns the damaged parts."""
    from kvpipe.store.reader import read_meta
    from kvpipe.store.schema import structure_fingerprint

    plan = damaged(loc)
    for part in sorted(plan.parts):
        loc.remove(layout.manifest_rel(part))
    if plan.text:
        loc.remove(layout.TEXT_RECORD)  # the run writes the text queries again
    if plan.structure:
        recorded = read_meta(loc).dataset.structure_sha256
        if structure is None:
            raise StoreError(f"{loc.root}/{layout.STRUCTURE} is damaged ({plan.structure[0]}); rerun "
                             f"kvpipe extract --repair with the dataset to rewrite it")
        if structure_fingerprint(structure) != recorded:
            raise StoreError(f"{loc.root}/{layout.STRUCTURE} is damaged and the dataset's annotations differ from "
                             f"the ones this store was made from; re-extract into a new --out")
        loc.write_atomic(layout.STRUCTURE, json.dumps(structure, sort_keys=True).encode())
    return plan.parts
