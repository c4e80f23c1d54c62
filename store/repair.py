"""``kvpipe extract --repair``: forget the parts ``verify_store`` finds damaged, so the run
redoes exactly those.

Why delete only the record: the manifest record is a part's commit. Removing it (one unlink
or one DELETE, atomic on both kinds of storage) turns the part back into a pending one in a
single step; its damaged files are replaced when the part is committed again.
"""

from __future__ import annotations

from kvpipe.store import layout
from kvpipe.store.fs import Location
from kvpipe.store.manifest import read_part_record_bytes


def damaged_parts(loc: Location) -> dict[int, list[str]]:
    """Committed parts that fail verification (unreadable records included), with why."""
    from kvpipe.store.verify import verify_store

    bad: dict[int, list[str]] = {}
    for name in loc.listdir(layout.MANIFEST):
        if not (name.startswith("p") and name.endswith(".parquet")):
            continue
        try:
            read_part_record_bytes(loc.read_bytes(f"{layout.MANIFEST}/{name}"), name)
        except Exception as err:
            bad[layout.part_of_manifest_name(name)] = [f"unreadable commit record ({str(err).splitlines()[0]})"]
    for part in bad:  # verify_store cannot open a store with an unreadable record
        loc.remove(layout.manifest_rel(part))
    report = verify_store(loc)
    for part, problems in report.problems.items():
        bad.setdefault(part, []).extend(problems)
    return bad


def drop_damaged_parts(loc: Location) -> dict[int, list[str]]:
    """Delete the commit record of every damaged part; returns them with their problems."""
    bad = damaged_parts(loc)
    for part in sorted(bad):
        loc.remove(layout.manifest_rel(part))
    return bad
