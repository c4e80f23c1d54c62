"""Paths inside a feature store, in one place.

    <store>/zarr.json                 root Zarr v3 group; attribute "kvpipe" = FeatureSetMeta
    <store>/parts/p000042/            one Zarr group per part (keys, values, post_proj, masks)
    <store>/manifest/p000042.parquet  the part's commit record: one row per image + checksums
    <store>/dataset.json              dataset-level annotations (pairs, episodes, image sets, classes)
    <store>/text/                     final-token K/V of the dataset's text queries
    <store>/text.parquet              commit record of text/
    <store>/.staging/                 parts being written (never read)
    <store>/failures.json             parts that failed in a run and are not committed (kvpipe status)

A part exists for readers only once its manifest file exists; both the part directory and
the manifest file appear by an atomic rename, so a reader never sees half a part.
On object stores (no rename) a part's files are uploaded once under a unique directory
``parts/p000042-<id>/`` that its manifest record names; the record's PUT is the commit.
"""

from __future__ import annotations

from pathlib import Path

PARTS = "parts"
MANIFEST = "manifest"
STAGING = ".staging"
TEXT = "text"
TEXT_RECORD = "text.parquet"
STRUCTURE = "dataset.json"
FAILURES = "failures.json"


def part_name(part: int) -> str:
    return f"p{part:06d}"


def part_dir(root: Path, part: int) -> Path:
    return root / PARTS / part_name(part)


def manifest_file(root: Path, part: int) -> Path:
    return root / MANIFEST / f"{part_name(part)}.parquet"


def part_of_manifest(path: Path) -> int:
    return int(path.stem[1:])


def part_rel(part: int) -> str:
    """The part's directory relative to the store root (local stores)."""
    return f"{PARTS}/{part_name(part)}"


def manifest_rel(part: int) -> str:
    return f"{MANIFEST}/{part_name(part)}.parquet"


def part_of_manifest_name(name: str) -> int:
    """'p000042.parquet' -> 42."""
    return int(name.split(".", 1)[0][1:])


def part_of_dir_name(name: str) -> int | None:
    """'p000042' or 'p000042-1a2b3c4d' -> 42; None for anything else."""
    head = name.split("-", 1)[0]
    return int(head[1:]) if head.startswith("p") and head[1:].isdigit() else None
