"""numpy's BLAS on one thread while kvpipe's own threads run BLAS products (pca coding, decoding).

Why: numpy's OpenBLAS starts a thread per core for every product of a few hundred kilobytes,
and the encoder and reader pools already run a task per core. Each task's product then waits
for every core: four pca coders on two cores took 13-17 x longer per chunk with BLAS free than
with BLAS on one thread (docs/BENCHMARKS.md, "pca's host coding"), and a 16-core host is worse.

The limit is process-wide (OpenBLAS's pthreads build has one thread pool per process), so
overlapping users (two parts written at once, a read beside a write) share one: the first to
enter sets it, the last to leave restores what was there before, from whichever thread each runs
in. threadpoolctl (3.8) lets only one "controlling" thread change OpenBLAS's limit and silently
ignores the others (a limit per writer thread would let the first part to finish restore BLAS
free under the other part's coders), so each change here takes control for itself and gives it
back at once: extraction's writer threads and a probe's prefetch thread set and restore the
limit as well as the main thread does.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy  # noqa: F401  (loaded before the controller looks for numpy's BLAS)

_lock = threading.Lock()
_users = 0
_limiter: Any = None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread inside, as before once the last overlapping user leaves."""
    global _users, _limiter
    with _lock:
        if _users == 0:
            _limiter = _in_control(lambda: _controller().limit(limits=1, user_api="blas"))
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _in_control(_limiter.restore_original_limits)
                _limiter = None


def _in_control(change: Callable[[], Any]) -> Any:
    """Run ``change`` as threadpoolctl's controlling thread, then leave no thread in control."""
    from threadpoolctl import OpenBLASController

    clear = getattr(OpenBLASController, "clear_controlling_thread", None)  # threadpoolctl >= 3.8
    if clear is not None:
        clear(force=True)
    try:
        return change()
    finally:
        if clear is not None:
            clear(force=True)


@functools.lru_cache(maxsize=1)
def _controller() -> Any:
    """The process's thread pools, found once (finding them costs 1.5 ms, limiting 0.02 ms)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
