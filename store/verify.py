"""``kvpipe verify``: find any corruption in a store.

Checks, per committed part: every file's CRC32C against the one recorded at commit, every
array decodes, shapes agree with the manifest (token counts, masks), and nothing is missing.
Returns the damaged parts so ``kvpipe extract --repair`` can redo exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvpipe.store import layout
from kvpipe.store.checksum import file_crc32c
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


def verify_store(path: str | Path, decode: bool = True) -> VerifyReport:
    store = FeatureStore.open(path)
    report = VerifyReport()
    for part, sums in sorted(store.checksums.items()):
        report.parts_checked += 1
        pdir = layout.part_dir(store.root, part)
        if not pdir.is_dir():
            report.add(part, f"{pdir} is missing")
            continue
        on_disk = {p.relative_to(pdir).as_posix() for p in pdir.rglob("*") if p.is_file()}
        for rel in sorted(set(sums) - on_disk):
            report.add(part, f"file {rel} is missing")
        for rel in sorted(on_disk - set(sums)):
            report.add(part, f"file {rel} was not part of the commit")
        for rel in sorted(set(sums) & on_disk):
            if file_crc32c(pdir / rel) != sums[rel]:
                report.add(part, f"file {rel} fails its checksum")
        if decode and part not in report.problems:
            _check_arrays(store, part, report)
    for d in (store.root / layout.PARTS).iterdir() if (store.root / layout.PARTS).exists() else []:
        if d.is_dir() and int(d.name[1:]) not in store.checksums:
            report.stray.append(str(d))
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
