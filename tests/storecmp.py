"""Bit-for-bit comparison of two stores (paths or URLs), for the executor and object-store tests."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from kvpipe.store import FeatureStore


def assert_identical_stores(a, b) -> None:
    """Same manifest rows (every column), same file bytes (the CRC32C of every file of every
    part), same decoded arrays for every (kind, layer, head), masks, text queries and
    dataset-level annotations."""
    x, y = FeatureStore.open(a), FeatureStore.open(b)
    assert x.meta.identity() == y.meta.identity()
    assert [asdict(r) for r in x.rows] == [asdict(r) for r in y.rows]
    assert x.checksums == y.checksums, "part files differ"
    for kind in x.meta.kinds:
        if kind == "post_proj":
            np.testing.assert_array_equal(x.read(kind).data, y.read(kind).data, err_msg=kind)
            continue
        for layer in x.meta.layers:
            for head in x.meta.heads:
                np.testing.assert_array_equal(x.read(kind, layer, head).data, y.read(kind, layer, head).data,
                                              err_msg=f"{kind} {layer}.{head}")
                if x.text_queries():
                    np.testing.assert_array_equal(x.text(kind, layer, head), y.text(kind, layer, head))
    for r, s in zip(x.images(), y.images()):
        m, n = x.annotation(r).mask, y.annotation(s).mask
        assert (m is None) == (n is None)
        if m is not None:
            np.testing.assert_array_equal(m, n)
    assert x.text_queries() == y.text_queries()
    assert x.structure() == y.structure()


def recommit_checksums(root, part: int) -> None:
    """Record the current CRC32C of every file of a local store's part in its commit record,
    for tests that edit a committed part in place (reads check the recorded checksums)."""
    from kvpipe.store import layout
    from kvpipe.store.checksum import file_crc32c
    from kvpipe.store.manifest import read_part_record, write_part_record

    record = layout.manifest_file(root, part)
    rows, sums = read_part_record(record)
    write_part_record(record, rows, {rel: file_crc32c(layout.part_dir(root, part) / rel) for rel in sums})
