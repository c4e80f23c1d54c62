"""numpy's BLAS on one thread while kvpipe's pools run products (store.blas): set by the first
user, restored by the last, and in force inside pca's coding tasks in extraction and recoding."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from kvpipe.store.blas import one_blas_thread


def blas_threads() -> int:
    """numpy's BLAS's threads (scipy, loaded by other tests, brings a BLAS of its own)."""
    return next(info["num_threads"] for info in threadpool_info()
                if info["user_api"] == "blas" and "numpy" in info["filepath"])


@pytest.fixture
def two_blas_threads():
    if not any(info["user_api"] == "blas" and "numpy" in info["filepath"] for info in threadpool_info()):
        pytest.skip("numpy has no BLAS threadpoolctl can set")
    with threadpool_limits(2, user_api="blas"):
        yield


def test_one_thread_inside_and_the_original_after(two_blas_threads):
    with one_blas_thread():
        assert blas_threads() == 1
        with one_blas_thread():  # nested
            assert blas_threads() == 1
        assert blas_threads() == 1
    assert blas_threads() == 2


def test_a_thread_inside_the_jobs_limit_does_not_undo_it(two_blas_threads):
    """The job (this thread) holds the limit; a writer thread enters and leaves inside it: still
    one thread until the job leaves. A limiter per user would have the writer restore 2 mid-job."""
    inside = []

    def writer_thread():
        with one_blas_thread():
            inside.append(blas_threads())
        inside.append(blas_threads())

    with one_blas_thread():
        in_thread(writer_thread)
        assert inside == [1, 1]
        assert blas_threads() == 1
    assert blas_threads() == 2


def test_other_threads_set_and_restore_the_limit_after_the_main_thread_did(two_blas_threads):
    """A probe's prefetch thread or a part's writer thread, after the main thread has used the
    limit: threadpoolctl lets one controlling thread change OpenBLAS's limit and ignores the
    others, so a limit that kept its first thread in control would do nothing here."""
    with one_blas_thread():
        pass

    def a_read():
        with one_blas_thread():
            inside = blas_threads()
        return inside, blas_threads()

    assert in_thread(a_read) == (1, 2)
    assert in_thread(a_read) == (1, 2)
    with one_blas_thread():  # and the main thread again
        assert blas_threads() == 1
    assert blas_threads() == 2


def in_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0] if out else None


def _recording_coder(monkeypatch) -> list[int]:
    """pca's chunk coder, recording numpy's BLAS threads each time a chunk is coded."""
    import kvpipe.store.encoding as encoding

    seen: list[int] = []
    real = encoding.encode_pca

    def coder(x, step):
        seen.append(blas_threads())
        return real(x, step)

    monkeypatch.setattr(encoding, "encode_pca", coder)
    return seen


@pytest.mark.parametrize("job", ["extract", "recode"])
def test_pca_chunks_are_coded_with_one_blas_thread(tmp_path, monkeypatch, two_blas_threads, job):
    """The coders run in the encoder pool's threads; extraction's parts are written from its
    writer threads, recoding's from the calling thread."""
    from kvpipe.pipeline.extraction import ExtractConfig, extract
    from kvpipe.store.recode import recode

    kw = dict(model="tiny-qwen25vl", dataset="synthetic", limit=4, batch_size=2, part_size=2, dtype="bfloat16")
    if job == "recode":
        extract(ExtractConfig(out=str(tmp_path / "bf16"), **kw))
    seen = _recording_coder(monkeypatch)
    if job == "recode":
        recode(tmp_path / "bf16", tmp_path / "pca", "pca")
    else:
        extract(ExtractConfig(out=str(tmp_path / "pca"), store_dtype="pca", **kw))
    assert len(seen) >= 2 * 2 * 2  # two parts of keys and values of two layers at least
    assert set(seen) == {1}
    assert blas_threads() == 2
