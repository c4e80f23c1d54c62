"""One writer at a time: a lease object in the store, held for a writer's lifetime.

Why: two ``kvpipe extract`` runs into one store would each clean the other's staging and, on
an object store, delete prefixes the other had just committed. A run therefore holds
``STORE/.writer-lease.json`` (run id, host, pid, start and heartbeat times) from
``StoreWriter.create_or_resume`` to ``StoreWriter.close``; a thread refreshes its heartbeat.

- Acquisition is a conditional create: ``O_CREAT | O_EXCL`` on a local filesystem; on S3 a
  PUT with ``If-None-Match: *`` (refused with 412 when the object exists). Other fsspec
  backends (gs://, memory://, ...) have no conditional PUT through fsspec: there the lease is
  written only when absent and read back, and the run proceeds only if it reads its own run
  id; two runs starting within one round trip of each other could both pass. See
  docs/ARCHITECTURE.md.
- A second writer is refused with one line naming the holder (host, pid, run id, age).
- A lease is stale when its heartbeat is older than the timeout (``KVPIPE_LEASE_TIMEOUT``
  seconds, default 60; hosts' clocks must agree to well within it) or when it was taken on
  this host by a process that no longer exists. A stale lease is taken over atomically: on
  S3 by a PUT with ``If-Match`` on the stale object's ETag, locally by renaming the lease
  file away (one contender wins the rename), checking it is the one judged stale, and
  creating a new one with ``O_EXCL``.
- The heartbeat re-reads the lease first (S3: a PUT with ``If-Match`` on its own ETag); a
  run that finds another run's id there has lost its lease, and every later commit of its
  writer raises instead of writing.
- Within one process, writers of the same store share one lease (tests and library callers
  open a store several times); it is released when the last of them closes, or at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from kvpipe.errors import StoreError
from kvpipe.store.fs import LocalLocation, Location

LEASE = ".writer-lease.json"
DEFAULT_TIMEOUT = 60.0
ENV_TIMEOUT = "KVPIPE_LEASE_TIMEOUT"


def lease_timeout(timeout: float | None = None) -> float:
    if timeout is not None:
        return float(timeout)
    try:
        return float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT))
    except ValueError:
        raise StoreError(f"{ENV_TIMEOUT}={os.environ[ENV_TIMEOUT]!r} is not a number of seconds") from None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


@dataclass(frozen=True)
class LeaseInfo:
    run_id: str
    host: str
    pid: int
    started: float
    heartbeat: float

    @classmethod
    def parse(cls, data: bytes) -> "LeaseInfo | None":
        """None for anything that is not a lease (an empty or torn file counts as stale)."""
        try:
            d = json.loads(data)
            return cls(str(d["run_id"]), str(d["host"]), int(d["pid"]), float(d["started"]), float(d["heartbeat"]))
        except (ValueError, KeyError, TypeError):
            return None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def age(self) -> float:
        return max(0.0, time.time() - self.heartbeat)

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, run {self.run_id}, last heartbeat {self.age():.0f} s ago"


class WriterLease:
    """The lease of one writer process on one store; ``acquire`` or a one-line StoreError."""

    _held: dict[str, "WriterLease"] = {}  # store root -> this process's lease on it
    _held_lock = threading.Lock()

    def __init__(self, loc: Location, timeout: float, option: str):
        self.loc, self.timeout, self.option = loc, timeout, option
        self.info = LeaseInfo(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), time.time(), time.time())
        self.token: Any = None  # S3: the ETag of our lease object
        self.lost: LeaseInfo | str | None = None
        self.users = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- acquiring -------------------------------------------------------------------------
    @classmethod
    def acquire(cls, loc: Location, timeout: float | None = None, option: str = "--out") -> "WriterLease":
        key = str(loc.root)
        with cls._held_lock:
            mine = cls._held.get(key)
            if mine is not None and mine.lost is None:
                holder, _ = mine._read()
                if holder is not None and holder.run_id == mine.info.run_id:
                    mine.users += 1
                    return mine
                mine.lost = holder or "nobody (the lease was deleted)"  # e.g. the store was removed
                mine._stop.set()
            lease = cls(loc, lease_timeout(timeout), option)
            lease._acquire()
            lease.users = 1
            cls._held[key] = lease
        lease._start()
        return lease

    def _acquire(self) -> None:
        for _ in range(5):
            if self._create():
                return
            holder, token = self._read()
            if holder is not None and holder.run_id == self.info.run_id:
                return  # a create whose reply was lost
            if holder is not None and not self._stale(holder):
                raise StoreError(f"{self.option} {self.loc.root} is being written by another kvpipe run "
                                 f"({holder.describe()}); wait for it to finish, or stop it (a killed run's "
                                 f"lease is taken over once its heartbeat is {self.timeout:.0f} s old)")
            if self._take_over(holder, token):
                return
        raise StoreError(f"{self.option} {self.loc.root}: could not take the writer lease ({LEASE}), other runs "
                         f"keep taking it; retry")

    def _stale(self, holder: LeaseInfo) -> bool:
        if holder.age() > self.timeout:
            return True
        return holder.host == self.info.host and not pid_alive(holder.pid)

    def _fresh(self) -> bytes:
        self.info = LeaseInfo(self.info.run_id, self.info.host, self.info.pid, self.info.started, time.time())
        return self.info.encode()

    # ---- backends --------------------------------------------------------------------------
    def _local(self) -> bool:
        return isinstance(self.loc, LocalLocation)

    def _s3(self) -> bool:
        return getattr(self.loc, "protocol", "") in ("s3", "s3a")

    def _create(self) -> bool:
        data = self._fresh()
        if self._local():
            path = self.loc.path(LEASE)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        fs, path = self.loc.fs, self.loc._p(LEASE)
        try:
            out = fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except Exception as err:
            raise StoreError(self.loc.describe_error(err, "create the writer lease")) from None
        fs.invalidate_cache(path)
        if self._s3():
            self.token = (out or {}).get("ETag")
            return True
        time.sleep(0.05)  # no conditional PUT: read back, the last writer wins
        holder, _ = self._read()
        return holder is not None and holder.run_id == self.info.run_id

    def _read(self) -> tuple[LeaseInfo | None, Any]:
        """The lease now in the store (None: absent or unreadable) and its version token."""
        if self._local():
            try:
                data = self.loc.path(LEASE).read_bytes()
            except FileNotFoundError:
                return None, None
            return LeaseInfo.parse(data), data
        fs, path = self.loc.fs, self.loc._p(LEASE)
        fs.invalidate_cache(path)
        try:
            token = self.loc.call("read the writer lease", fs.info, path).get("ETag") if self._s3() else None
            data = self.loc.call("read the writer lease", fs.cat_file, path)
        except FileNotFoundError:
            return None, None
        return LeaseInfo.parse(data), token if self._s3() else data

    def _take_over(self, stale: LeaseInfo | None, token: Any) -> bool:
        """Replace the stale lease read as ``token`` by ours, unless another run got there first."""
        if token is None:
            return False  # gone meanwhile: try a plain create again
        if self._local():
            path = self.loc.path(LEASE)
            tomb = path.with_name(f"{LEASE}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, tomb)
            except FileNotFoundError:
                return False
            try:
                if tomb.read_bytes() != token:  # refreshed or replaced since we read it: put it back
                    try:
                        os.link(tomb, path)
                    except FileExistsError:
                        pass
                    return False
            finally:
                tomb.unlink(missing_ok=True)
            return self._create()
        data = self._fresh()
        fs, path = self.loc.fs, self.loc._p(LEASE)
        if self._s3():
            try:
                out = fs.pipe_file(path, data, IfMatch=token)
            except (OSError, ValueError):
                return False  # 412: someone else replaced it first
            fs.invalidate_cache(path)
            self.token = (out or {}).get("ETag")
            return True
        self.loc.remove(LEASE)
        return self._create()

    # ---- heartbeat -------------------------------------------------------------------------
    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="kvpipe-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(0.05, self.timeout / 4)
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except Exception:  # a failed refresh is retried; the lease is lost only if another run took it
                pass
            if self.lost is not None:
                return

    def refresh(self) -> None:
        """Renew the heartbeat, or notice that another run has taken the lease."""
        if self.lost is not None:
            return
        holder, token = self._read()
        if holder is None or holder.run_id != self.info.run_id:
            self.lost = holder or "nobody (the lease was deleted)"
            return
        data = self._fresh()
        if self._local():
            self.loc.write_atomic(LEASE, data)
        elif self._s3():
            fs, path = self.loc.fs, self.loc._p(LEASE)
            try:
                out = fs.pipe_file(path, data, IfMatch=token)
            except (OSError, ValueError):
                self.lost = self._read()[0] or "another run"
                return
            fs.invalidate_cache(path)
            self.token = (out or {}).get("ETag")
        else:
            self.loc.write_atomic(LEASE, data)

    def check(self) -> None:
        """Raise before a commit when this run no longer holds the lease."""
        if self.lost is not None:
            who = self.lost.describe() if isinstance(self.lost, LeaseInfo) else self.lost
            raise StoreError(f"{self.option} {self.loc.root}: this run (run {self.info.run_id}) lost its writer "
                             f"lease to {who}; it stopped before committing anything more")

    # ---- releasing -------------------------------------------------------------------------
    def release(self) -> None:
        with self._held_lock:
            self.users -= 1
            if self.users > 0:
                return
            if self._held.get(str(self.loc.root)) is self:
                del self._held[str(self.loc.root)]
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.lost is not None:
            return
        try:
            holder, _ = self._read()
            if holder is not None and holder.run_id == self.info.run_id:
                self.loc.remove(LEASE)
        except Exception:
            pass  # a lease left behind is taken over once stale

    @classmethod
    def _release_all(cls) -> None:
        for lease in list(cls._held.values()):
            lease.users = 1
            lease.release()


atexit.register(WriterLease._release_all)


def read_lease(loc: Location) -> LeaseInfo | None:
    """The lease now held on the store at ``loc`` (None when nobody writes it)."""
    try:
        return LeaseInfo.parse(loc.read_bytes(LEASE))
    except FileNotFoundError:
        return None
