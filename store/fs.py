"""Where a store lives: a local directory or an fsspec URL (s3://, gs://, memory://, ...).

Why two classes: a local filesystem has atomic renames and fsync, so local stores keep the
rename protocol (and pathlib speed); object stores have neither, so there a part's files are
uploaded once under a unique prefix and the single-object PUT of its manifest record is the
commit. Every path below is relative to the store root, '/'-separated.
"""

from __future__ import annotations

import ctypes
import functools
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import google_crc32c

from kvpipe.errors import StoreError


def is_url(path: str | os.PathLike) -> bool:
    s = str(path)
    return "://" in s and not s.startswith("file://")


def open_location(path: str | os.PathLike, option: str = "store") -> "Location":
    """A Location for ``path``; URLs go through fsspec, everything else is a local path."""
    if isinstance(path, Location):
        return path
    if is_url(path):
        return ObjectLocation(str(path), option)
    s = str(path)
    return LocalLocation(Path(s[len("file://"):] if s.startswith("file://") else s))


class UrlPath(str):
    """A store URL that joins like a Path (``root / "probes"``), for messages and sub-paths."""

    def __truediv__(self, other: str) -> "UrlPath":
        return UrlPath(self.rstrip("/") + "/" + str(other).lstrip("/"))

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]


class Location:
    """Operations a store needs, on paths relative to its root."""

    atomic_rename: bool = False
    root: Any  # Path for local stores, UrlPath for URLs

    def __str__(self) -> str:
        return str(self.root)

    # implemented by both subclasses
    def exists(self, rel: str) -> bool: ...
    def isfile(self, rel: str) -> bool: ...
    def isdir(self, rel: str) -> bool: ...
    def listdir(self, rel: str) -> list[str]: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def write_atomic(self, rel: str, data: bytes) -> None: ...
    def files(self, rel: str) -> dict[str, int]: ...
    def remove(self, rel: str) -> None: ...
    def rmtree(self, rel: str) -> None: ...
    def zarr_store(self, rel: str, read_only: bool = True) -> Any: ...
    def size(self) -> int: ...

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        return {r: self.read_bytes(r) for r in rels}

    def check(self) -> None:
        """Fail early, in one line, when the store's storage cannot be reached."""

    def crc32c(self, rel: str) -> str:
        crc = google_crc32c.Checksum()
        crc.update(self.read_bytes(rel))
        return crc.hexdigest().decode()

    def new_id(self) -> str:
        return uuid.uuid4().hex[:8]


class LocalLocation(Location):
    atomic_rename = True

    def __init__(self, root: Path):
        self.root = root

    def path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.path(rel).exists()

    def isfile(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def isdir(self, rel: str = "") -> bool:
        return self.path(rel).is_dir()

    def listdir(self, rel: str = "") -> list[str]:
        p = self.path(rel)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write to a temporary name beside the target, fsync, rename over it."""
        final = self.path(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.{self.new_id()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def files(self, rel: str) -> dict[str, int]:
        base = self.path(rel)
        if not base.is_dir():
            return {}
        return {p.relative_to(base).as_posix(): p.stat().st_size for p in sorted(base.rglob("*")) if p.is_file()}

    def crc32c(self, rel: str) -> str:
        from kvpipe.store.checksum import file_crc32c

        return file_crc32c(self.path(rel))

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def rmtree(self, rel: str) -> None:
        shutil.rmtree(self.path(rel), ignore_errors=True)

    def zarr_store(self, rel: str, read_only: bool = True) -> Any:
        import zarr

        return zarr.storage.LocalStore(self.path(rel), read_only=read_only)

    def size(self) -> int:
        """Bytes of the files under the root. Another run may be writing there (its staging
        folders renamed or removed during the walk): what vanishes is not counted, where a walk
        that listed it first would raise FileNotFoundError."""
        total = 0
        for folder, _, names in os.walk(self.root):  # os.walk skips a folder that vanished
            for name in names:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    pass
        return total


class ObjectLocation(Location):
    """A store under an fsspec URL. Credentials and endpoints come from the environment
    (AWS_* variables, FSSPEC_S3_ENDPOINT_URL, fsspec config files, instance roles)."""

    def __init__(self, url: str, option: str = "store"):
        import fsspec

        self.option = option
        self.root = UrlPath(url.rstrip("/"))
        try:
            self.fs, self._base = fsspec.core.url_to_fs(self.root)
        except (ImportError, ValueError) as err:
            raise StoreError(f"{option} {url}: {str(err).splitlines()[0]}") from None
        self._base = self._base.rstrip("/")
        self.protocol = url.split("://", 1)[0]
        self._async_fs = None

    def _p(self, rel: str = "") -> str:
        return f"{self._base}/{rel}" if rel else self._base

    def url(self, rel: str = "") -> str:
        return str(self.root / rel) if rel else str(self.root)

    def call(self, what: str, fn, *args, **kwargs):
        """Run an fsspec call; turn credential and connection failures into one-line errors."""
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise
        except StoreError:
            raise
        except Exception as err:
            raise StoreError(self.describe_error(err, what)) from None

    def describe_error(self, err: Exception, what: str) -> str:
        name = type(err).__name__
        msg = (str(err).splitlines() or [name])[0]
        if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in msg.lower():
            return (f"{self.option} {self.root}: no credentials for {self.protocol}:// ({msg}); set "
                    f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile or instance role) where kvpipe runs")
        if isinstance(err, PermissionError):
            return f"{self.option} {self.root}: access denied while {what} ({msg}); check the credentials' rights"
        return f"{self.option} {self.root}: cannot {what} ({name}: {msg})"

    def exists(self, rel: str = "") -> bool:
        return self.call("list the store", self.fs.exists, self._p(rel))

    def isfile(self, rel: str) -> bool:
        return self.call("list the store", self.fs.isfile, self._p(rel))

    def isdir(self, rel: str = "") -> bool:
        return self.call("list the store", self.fs.isdir, self._p(rel))

    def listdir(self, rel: str = "") -> list[str]:
        try:
            entries = self.call("list the store", self.fs.ls, self._p(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        base = self._p(rel).rstrip("/") + "/"
        return sorted({e.rstrip("/")[len(base):].split("/", 1)[0] for e in entries
                       if e.rstrip("/").startswith(base)} - {""})

    def read_bytes(self, rel: str) -> bytes:
        return self.call(f"read {rel}", self.fs.cat_file, self._p(rel))

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """Many small objects in concurrent requests (fsspec's batched cat)."""
        if not rels:
            return {}
        got = self.call("read the manifest", self.fs.cat, [self._p(r) for r in rels], on_error="raise")
        return {r: got[self._p(r)] for r in rels}

    BUCKETED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")

    def check(self) -> None:
        if self.protocol not in self.BUCKETED:
            return
        bucket = self._base.split("/", 1)[0]
        try:
            self.call("list the bucket", self.fs.ls, bucket, refresh=True)
        except FileNotFoundError:
            raise StoreError(f"{self.option} {self.root}: bucket {bucket} does not exist (or is not visible "
                             f"with these credentials); create it first") from None

    def write_atomic(self, rel: str, data: bytes) -> None:
        """One PUT: object stores show either the old object or the whole new one."""
        self.call(f"write {rel}", self.fs.pipe_file, self._p(rel), data)
        self.fs.invalidate_cache(self._p(rel).rsplit("/", 1)[0])

    def put_dir(self, local: Path, rel: str) -> None:
        """Upload every file of a local directory under ``rel``."""
        files = [p for p in sorted(local.rglob("*")) if p.is_file()]
        dests = [self._p(f"{rel}/{p.relative_to(local).as_posix()}") for p in files]
        if files:  # one batched call: async filesystems upload the files concurrently
            self.call(f"upload {rel}", self.fs.put, [str(p) for p in files], dests)
        self.fs.invalidate_cache(self._p(rel))

    def files(self, rel: str) -> dict[str, int]:
        base = self._p(rel).rstrip("/") + "/"
        try:
            found = self.call("list the store", self.fs.find, self._p(rel), detail=True)
        except FileNotFoundError:
            return {}
        return {k[len(base):]: int(v.get("size") or 0) for k, v in sorted(found.items())
                if k.startswith(base) and v.get("type") != "directory"}

    def remove(self, rel: str) -> None:
        try:
            self.call(f"delete {rel}", self.fs.rm_file, self._p(rel))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self._p(rel).rsplit("/", 1)[0])

    def rmtree(self, rel: str) -> None:
        try:
            self.call(f"delete {rel}", self.fs.rm, self._p(rel), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self._p(rel))

    def zarr_store(self, rel: str, read_only: bool = True) -> Any:
        from zarr.storage import FsspecStore

        if self._async_fs is None:  # zarr wants an asynchronous instance of the same filesystem
            self._async_fs = FsspecStore.from_url(self.url(), read_only=True).fs
        return FsspecStore(self._async_fs, path=self._p(rel), read_only=read_only)

    def size(self) -> int:
        return sum(self.files("").values())

    def clear_cache(self) -> None:
        self.fs.invalidate_cache()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _libc(name: str, *argtypes: Any) -> Any:
    """A libc function (errno kept), or None where there is none (looked up once per process)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    if argtypes:
        fn.argtypes = list(argtypes)
    return fn


def _syncfs() -> Any:
    return _libc("syncfs")


def _sync_file_range() -> Any:
    return _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages; do not wait


def start_writeback(fd: int) -> None:
    """Have the kernel start writing a just-written file to disk now, without waiting.

    Why: otherwise its pages stay dirty in the page cache until the part's syncfs (the
    kernel's own writeback waits 30 s or for 10% of RAM to be dirty), so the disk idles while
    parts are encoded and then gets a whole part at once. Started per file, the disk writes
    while the encoders work and the syncfs finds little left. Not durability: that is still
    ``sync_tree``'s. A no-op where sync_file_range does not exist."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


def sync_tree(root: Path) -> None:
    """Make every file written under ``root`` durable before a commit points at it.

    Why one syncfs(2) and not an fsync per file: a part is hundreds of new chunk files, and
    each fsync of a new file forces its own journal commit; on a GPU host's NVMe disk that
    held a part's writes to about two thirds of the disk's sequential rate. One syncfs of the
    filesystem flushes them together (and anything else dirty on that filesystem). Where
    syncfs does not exist (not Linux), every file and directory is fsync'd."""
    syncfs = _syncfs()
    if syncfs is not None:
        fd = os.open(root, os.O_RDONLY)
        try:
            if syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs of {root} failed: {os.strerror(err)}")
        finally:
            os.close(fd)
        return
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
        else:
            fsync_dir(path)
    fsync_dir(root)


def bytes_io(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)
