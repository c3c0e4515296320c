"""The retail example's database: one JSON file of users, orders and products.

- `load(path)` parses the file and returns a private copy, so a caller may mutate what it
  gets. Parsed files are cached in-process, keyed by the file's identity (device, inode,
  modification time, size); `save` replaces the file with a new inode, so a write by any
  process is seen by the next `load`. `load(path, cached=False)` always reads the disk.
- `snapshot(path)` returns the cached parse itself, shared by every reader and never copied:
  for reads only (a read tool copies the little it returns).
- `save(path, db)` writes atomically: a temporary file in the same folder, fsync, then
  `os.replace`, then fsync of the folder. A reader sees the old file or the new, never half.
- `update(path, fn)` / `transaction(path)` run "load, mutate, save" while holding an
  exclusive `fcntl.flock` on `<path>.lock`, so two processes never interleave their writes
  (a lost update is impossible). Reads need no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PathLike = str | os.PathLike[str]

_CACHE_SIZE = 8
_Stamp = tuple[int, int, int, int]
# absolute path -> (file identity, pickled database, the shared parse or None until a read
# asks); pickle.loads is a cheap deep copy for writers.
_cache: OrderedDict[str, tuple[_Stamp, bytes, dict[str, Any] | None]] = OrderedDict()
_cache_lock = threading.Lock()


def _key(path: PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _remember(key: str, stamp: _Stamp, db: dict[str, Any]) -> None:
    blob = pickle.dumps(db, protocol=pickle.HIGHEST_PROTOCOL)
    with _cache_lock:
        _cache[key] = (stamp, blob, None)
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def clear_cache() -> None:
    """Forget every parsed file (the next `load` of each reads the disk)."""
    with _cache_lock:
        _cache.clear()


def load(path: PathLike, *, cached: bool = True) -> dict[str, Any]:
    """Return the database at `path` as a fresh dict the caller owns.

    With `cached=False` the file is read and parsed from disk whatever the cache holds
    (verifiers use this: they must see the disk, not this process's memory).
    """
    key = _key(path)
    if cached:
        stamp = _stamp(os.stat(key))
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None and hit[0] == stamp:
            return pickle.loads(hit[1])
    with open(key, "rb") as f:
        stamp = _stamp(os.fstat(f.fileno()))  # the identity of exactly what is read
        raw = f.read()
    try:
        db = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"retail database {key} is not valid JSON: {exc}") from None
    if not isinstance(db, dict):
        raise ValueError(f"retail database {key} must hold a JSON object, not {type(db).__name__}")
    _remember(key, stamp, db)
    return db


def snapshot(path: PathLike) -> dict[str, Any]:
    """The database at `path` as of now, shared with every other reader: never mutate it.

    Reads pay for one parse per version of the file, not for a private copy each.
    """
    key = _key(path)
    stamp = _stamp(os.stat(key))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == stamp and hit[2] is not None:
            return hit[2]
    shared = load(path)  # a private copy, now handed to readers only
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == stamp:
            _cache[key] = (stamp, hit[1], shared)
    return shared


def save(path: PathLike, db: dict[str, Any]) -> None:
    """Replace the file at `path` with `db`, atomically and durably."""
    key = _key(path)
    folder, name = os.path.split(key)
    # Serialize first: a value that is not JSON fails before anything touches the disk. Not
    # indented: with `indent` the json module falls back to its pure-Python encoder, about
    # 20 times slower on the 2.7 MB tau2 database.
    data = (json.dumps(db, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    try:
        mode = os.stat(key).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
            # rename keeps inode, size and mtime: this is the identity `load` will see.
            stamp = _stamp(os.fstat(f.fileno()))
        os.replace(tmp, key)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    _remember(key, stamp, db)


def lock_path(path: PathLike) -> str:
    """The lock file guarding writes to the database at `path`."""
    return _key(path) + ".lock"


@contextmanager
def locked(path: PathLike) -> Iterator[None]:
    """Hold the exclusive write lock of the database at `path` (blocks until free)."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def transaction(path: PathLike) -> Iterator[dict[str, Any]]:
    """Load under the write lock, let the body mutate, save if the body did not raise."""
    with locked(path):
        db = load(path)
        yield db
        save(path, db)


def update(path: PathLike, fn: Callable[[dict[str, Any]], T]) -> T:
    """Load, apply `fn(db)` (which mutates `db` in place), save; all under the lock.

    If `fn` raises, nothing is written and the exception propagates.
    """
    with transaction(path) as db:
        return fn(db)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_path() -> Path:
    """The small demo database shipped beside this file."""
    return Path(__file__).with_name("db.json")
