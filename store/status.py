"""``kvpipe status``: which parts of a store are done, pending or failed.

Why a failure log: a part that could not be extracted has no commit record, so without a note
it would look merely pending. Runs write ``failures.json`` at the store root (atomically:
temporary file + rename locally, one PUT on an object store) with the part's last error; a
later commit of that part supersedes its entry. A committed part whose record lists failed
images (unreadable files) also counts as failed: it is final, but incomplete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from kvpipe.store import layout
from kvpipe.store.fs import Location, open_location

FAILURES_VERSION = 1


@dataclass
class PartState:
    part: int
    state: str  # "done" | "failed" | "pending"
    images: int = 0  # images of the part
    failed_images: int = 0
    detail: str = ""  # why failed


@dataclass
class StoreStatus:
    root: str
    n_parts: int
    parts: list[PartState] = field(default_factory=list)

    def count(self, state: str) -> int:
        return sum(p.state == state for p in self.parts)

    def of(self, state: str) -> list[PartState]:
        return [p for p in self.parts if p.state == state]


def read_failures(loc: Location) -> dict[int, dict[str, Any]]:
    """Failure entries by part; {} when there is no log (or it is unreadable: it is advisory)."""
    try:
        data = json.loads(loc.read_bytes(layout.FAILURES))
        return {int(k): v for k, v in data.get("parts", {}).items()}
    except (FileNotFoundError, ValueError, AttributeError):
        return {}


def write_failures(loc: Location, entries: dict[int, dict[str, Any]]) -> None:
    if not entries:
        if loc.exists(layout.FAILURES):
            loc.remove(layout.FAILURES)
        return
    doc = {"version": FAILURES_VERSION, "parts": {str(k): v for k, v in sorted(entries.items())}}
    loc.write_atomic(layout.FAILURES, json.dumps(doc, indent=1).encode())


class FailureLog:
    """The driver's record of parts that failed in this run (single writer: the driver)."""

    def __init__(self, loc: Location):
        self.loc = loc
        self.entries = read_failures(loc)

    def record(self, part: int, err: BaseException, attempts: int = 1) -> None:
        lines = [l for l in str(err).splitlines() if l.strip()]
        msg = lines[0] if lines else type(err).__name__
        self.entries[part] = {"error": msg[:500], "type": type(err).__name__, "attempts": attempts,
                              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            write_failures(self.loc, self.entries)
        except Exception:
            pass  # the log is advisory; never hide the original error behind it

    def settle(self, committed: set[int]) -> None:
        """Forget parts committed since they failed."""
        if any(p in committed for p in self.entries):
            self.entries = {p: e for p, e in self.entries.items() if p not in committed}
            write_failures(self.loc, self.entries)


def store_status(path: Any) -> StoreStatus:
    from kvpipe.store.reader import FeatureStore

    loc = open_location(path)
    store = FeatureStore.open(loc)
    meta = store.meta
    n_parts = store.n_parts
    by_part: dict[int, list] = {}
    for r in store.rows:
        by_part.setdefault(r.part, []).append(r)
    logged = read_failures(loc)
    status = StoreStatus(str(loc.root), n_parts)
    for p in range(n_parts):
        size = min(meta.part_size, meta.n_images - p * meta.part_size)
        if p in store.checksums:
            rows = by_part.get(p, [])
            bad = [r for r in rows if not r.ok]
            if bad:
                first = f"{bad[0].image_id}: {bad[0].error}"
                status.parts.append(PartState(p, "failed", size, len(bad),
                                              f"{len(bad)} of {len(rows)} images failed ({first})"))
            else:
                status.parts.append(PartState(p, "done", size))
        elif p in logged:
            e = logged[p]
            status.parts.append(PartState(p, "failed", size, 0,
                                          f"not committed: {e.get('error', '?')} "
                                          f"({e.get('attempts', 1)} attempt(s), {e.get('at', '?')})"))
        else:
            status.parts.append(PartState(p, "pending", size))
    return status


def ranges(parts: list[int]) -> str:
    """[0, 1, 2, 5] -> 'p0-p2, p5'."""
    out, start, prev = [], None, None
    for p in sorted(parts):
        if start is None:
            start = prev = p
        elif p == prev + 1:
            prev = p
        else:
            out.append(f"p{start}" if start == prev else f"p{start}-p{prev}")
            start = prev = p
    if start is not None:
        out.append(f"p{start}" if start == prev else f"p{start}-p{prev}")
    return ", ".join(out)


def require_store(path: Any, option: str) -> Location:
    """A Location holding a kvpipe store, or a one-line StoreError."""
    from kvpipe.store.reader import read_meta

    loc = open_location(path, option)
    read_meta(loc, option=option)
    return loc


__all__ = ["FailureLog", "PartState", "StoreStatus", "ranges", "read_failures",
           "require_store", "store_status"]
