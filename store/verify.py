"""``kvpipe verify``: find any corruption in a store.

Checks, per committed part: every file's CRC32C against the one recorded at commit, every
array decodes, shapes agree with the manifest (token counts, masks), and nothing is missing.
Returns the damaged parts so ``kvpipe extract --repair`` can redo exactly those.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvpipe.store import layout
from kvpipe.store.checksum import THREADS
from kvpipe.store.fs import Location
from kvpipe.store.reader import FeatureStore


@dataclass
class VerifyReport:
    parts_checked: int = 0
    problems: dict[int, list[str]] = field(default_factory=dict)
    stray: list[str] = field(default_factory=list)  # uncommitted leftovers (harmless)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, part: int, msg: str) -> None:
        self.problems.setdefault(part, []).append(msg)


def verify_store(path: str | Path | Location, decode: bool = True) -> VerifyReport:
    """Check a store directory or URL; files are checksummed in threads (CRC32C and, on
    object stores, the downloads release the GIL)."""
    store = FeatureStore.open(path)
    loc = store.loc
    report = VerifyReport()

    def check_files(part: int) -> list[str]:
        sums = store.checksums[part]
        pdir = store.data_dir(part)
        on_disk = set(loc.files(pdir))
        if not on_disk and sums:
            return [f"{store.root / pdir} is missing"]
        problems = [f"file {rel} is missing" for rel in sorted(set(sums) - on_disk)]
        problems += [f"file {rel} was not part of the commit" for rel in sorted(on_disk - set(sums))]
        for rel in sorted(set(sums) & on_disk):
            if loc.crc32c(f"{pdir}/{rel}") != sums[rel]:
                problems.append(f"file {rel} fails its checksum")
        return problems

    parts = sorted(store.checksums)
    with ThreadPoolExecutor(THREADS) as pool:
        found = list(pool.map(check_files, parts))
    for part, problems in zip(parts, found):
        report.parts_checked += 1
        for msg in problems:
            report.add(part, msg)
        if decode and part not in report.problems:
            _check_arrays(store, part, report)
    used = {store.data_dir(p) for p in parts}
    for name in loc.listdir(layout.PARTS):
        if layout.part_of_dir_name(name) is not None and f"{layout.PARTS}/{name}" not in used:
            report.stray.append(str(store.root / layout.PARTS / name))
    return report


def _check_arrays(store: FeatureStore, part: int, report: VerifyReport) -> None:
    rows = [r for r in store.rows if r.part == part]
    n_tokens = sum(r.n_tokens for r in rows if r.ok)
    try:
        group = store._part(part)
        for kind in store.meta.kinds:
            if n_tokens == 0:
                continue
            arr = group[kind]
            data = np.asarray(arr[...])
            if data.shape[-2] != n_tokens:
                report.add(part, f"{kind} has {data.shape[-2]} tokens, the manifest says {n_tokens}")
        n_mask = sum(r.mask_h * r.mask_w for r in rows if r.mask_offset >= 0)
        if n_mask:
            if group["masks"].shape[0] != n_mask:
                report.add(part, "masks size disagrees with the manifest")
    except Exception as err:  # decoding errors of any kind mean damage
        report.add(part, f"cannot decode: {str(err).splitlines()[0]}")
