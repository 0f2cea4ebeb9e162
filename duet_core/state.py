"""duet's persistent state: one SQLite database (WAL) under the state directory, 0700/0600.

What lives here, per scope: the files of the last scan with compact ids (so progress fits in Roaring bitmaps),
each task's progress through its current round (planned / relevant / done bitmaps over file ids, and done pages of
range tasks), the tasks' own key-value stores, results shared per file version, and the history of runs. Paths and
per-file state live here rather than in Python objects, so a scope of a million files does not live in memory.
Every change is a transaction: a crash leaves the last committed state, and the next run resumes from it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pyroaring import BitMap

from duet_core.errors import DuetError, Stopped
from duet_core.events import FileId
from duet_core.tasks import FileInfo

DEFAULT_STATE_DIR = "/var/lib/duet"
_DELETED = object()
SCHEMA_VERSION = 1
FEW_IDS = 1000             # fewer ids than this are looked up one by one (files_in)
KV_BATCH = 500             # keys per query of kv_get_many (SQLite allows 32,766 parameters; short IN lists plan well)
INTERRUPT_STEPS = 20_000   # SQLite virtual-machine steps between two looks at a stop (well under a millisecond)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scopes (id INTEGER PRIMARY KEY, root TEXT NOT NULL UNIQUE, next_file_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    scope_id INTEGER NOT NULL, id INTEGER NOT NULL, dev INTEGER NOT NULL, subvol INTEGER NOT NULL,
    ino INTEGER NOT NULL, relpath TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, seen INTEGER NOT NULL, PRIMARY KEY (scope_id, id));
CREATE UNIQUE INDEX IF NOT EXISTS files_by_fid ON files (scope_id, dev, subvol, ino);
CREATE TABLE IF NOT EXISTS progress (
    scope_id INTEGER NOT NULL, task TEXT NOT NULL, round INTEGER NOT NULL, complete INTEGER NOT NULL,
    planned BLOB NOT NULL, relevant BLOB NOT NULL, done BLOB NOT NULL, PRIMARY KEY (scope_id, task));
CREATE TABLE IF NOT EXISTS range_done (
    scope_id INTEGER NOT NULL, task TEXT NOT NULL, file_id INTEGER NOT NULL, pages BLOB NOT NULL,
    PRIMARY KEY (scope_id, task, file_id));
CREATE TABLE IF NOT EXISTS kv (task TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (task, key));
CREATE TABLE IF NOT EXISTS shared (
    dev INTEGER NOT NULL, subvol INTEGER NOT NULL, ino INTEGER NOT NULL, name TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, value TEXT NOT NULL,
    task TEXT NOT NULL, PRIMARY KEY (dev, subvol, ino, name));
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, scope_id INTEGER NOT NULL, tasks TEXT NOT NULL, started REAL NOT NULL,
    ended REAL, result TEXT, summary TEXT);
"""


@dataclass
class TaskProgress:
    """One task's round over one scope: which files were considered, which need work, which are done."""

    round: int = 0
    complete: bool = True
    planned: BitMap = field(default_factory=BitMap)
    relevant: BitMap = field(default_factory=BitMap)
    done: BitMap = field(default_factory=BitMap)

    @property
    def pending(self) -> BitMap:
        return self.relevant - self.done


def _secure_dir(path: str) -> None:
    """Create ``path`` 0700 if missing; refuse a symlink or a directory others can write."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise DuetError(f"cannot use state directory {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise DuetError(f"state directory {path} is not a plain directory (a symlink?)")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


class StateUnusable(DuetError):
    """The state database cannot be used as it is: damaged, foreign, or not a file. Never reset silently: the
    hint names ``duet state reset``, which moves the old file aside (kept, with a timestamp) and starts afresh."""

    def __init__(self, message: str, state_dir: str):
        super().__init__(message, hint=f"duet state reset --all --state-dir {state_dir} moves it aside and starts "
                                       "afresh (progress is lost; the old file is kept)")


DB_NAME = "state.db"
DB_COMPANIONS = ("-wal", "-shm")   # SQLite's write-ahead log and its index, named after the database


def _check_db_file(path: str, state_dir: str) -> None:
    """Refuse a state database that is not a regular file; make one that others may read 0600 again."""
    for name in (path, *(path + c for c in DB_COMPANIONS)):
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StateUnusable(f"cannot examine state database {name}: {exc.strerror}", state_dir) from None
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else \
                "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise StateUnusable(f"state database {name} is {kind}", state_dir)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.chmod(name, 0o600)


def db_path(relpath: str) -> str | bytes:
    """A scope-relative path as SQLite stores it: TEXT when it is UTF-8, else its raw bytes as a BLOB (Linux file
    names are bytes; Python hands undecodable ones over with surrogate escapes, which SQLite's TEXT cannot hold)."""
    if relpath.isascii():
        return relpath
    try:
        relpath.encode("utf-8")
        return relpath
    except UnicodeEncodeError:
        return os.fsencode(relpath)


def py_path(value: str | bytes) -> str:
    """The inverse of :func:`db_path`."""
    return value if isinstance(value, str) else os.fsdecode(value)


def aside_name(state_dir: str) -> str:
    """A free name for the database moved aside now: ``state.db.<UTC time as YYYY-MM-DDTHHMMSSZ>[.N]``."""
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    base = os.path.join(state_dir, f"{DB_NAME}.{stamp}")
    name, n = base, 0
    while any(os.path.lexists(name + c) for c in ("", *DB_COMPANIONS)):
        n += 1
        name = f"{base}.{n}"
    return name


def move_aside(state_dir: str) -> str:
    """Rename the state database (with its WAL) to :func:`aside_name`, so the next run starts afresh; returns
    the new name. Nothing is deleted. The log goes first: a stale ``state.db-wal`` left beside a new database
    would be replayed into it. Works on a damaged database (it is never opened)."""
    src = os.path.join(state_dir, DB_NAME)
    dest = aside_name(state_dir)
    for c in (*DB_COMPANIONS, ""):
        if os.path.lexists(src + c):
            os.rename(src + c, dest + c)
    _fsync_file(state_dir)
    return dest


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FILE_ROW = "SELECT id, dev, subvol, ino, relpath, size, mtime_ns, ctime_ns FROM files"   # what _file_info takes


def _file_info(r) -> FileInfo:
    return FileInfo(r[0], FileId(r[1], r[2], r[3]), py_path(r[4]), r[5], r[6], r[7])


def _blob(bm: BitMap) -> bytes:
    return bm.serialize()


def _bitmap(blob: bytes) -> BitMap:
    return BitMap.deserialize(blob)


class StateStore:
    """The state database. One instance per process; not shared between threads."""

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR):
        self.dir = os.path.abspath(state_dir)
        _secure_dir(self.dir)
        self.path = os.path.join(self.dir, DB_NAME)
        _check_db_file(self.path, self.dir)
        self._batching = False
        self._kv_pending: dict[tuple[str, str], Any] = {}
        self._shared_pending: dict[tuple, tuple] = {}
        old_umask = os.umask(0o077)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            tables = self._tables()   # before anything writes: a foreign database is left exactly as it is
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            if not tables:
                self._create_schema()
        except sqlite3.DatabaseError as exc:
            raise StateUnusable(f"state database {self.path} is unusable: {exc}", self.dir) from None
        finally:
            os.umask(old_umask)

    def _tables(self) -> set[str]:
        """The tables of the database, checked to be duet's of this schema version (none: a new database).

        Only reads: readers (duet status) must not queue behind a running duet for a write lock.
        """
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() if "meta" in tables else None
            self._check_schema(row, tables)
        return tables

    def _create_schema(self) -> None:
        with self.tx():
            for stmt in filter(str.strip, SCHEMA.split(";")):
                self.db.execute(stmt)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:   # not created meanwhile by another duet starting at the same moment
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            else:
                self._check_schema(row, {"meta"})

    def _check_schema(self, row: tuple | None, tables: set[str]) -> None:
        if row is None:
            raise StateUnusable(f"{self.path} is an SQLite database but not duet's (it has tables "
                                f"{', '.join(sorted(tables)[:5])})", self.dir)
        if row[0] != str(SCHEMA_VERSION):
            raise StateUnusable(f"state database {self.path} has schema {row[0]}, this duet uses {SCHEMA_VERSION}",
                                self.dir)

    def tx(self):
        """A transaction: ``with store.tx(): ...`` commits on success, rolls back on error (nested: joins)."""
        return _Tx(self.db)

    @contextlib.contextmanager
    def interruptible(self, stopping: Callable[[], bool]) -> Iterator[None]:
        """Statements in the block end early once ``stopping()`` is true, raising :class:`Stopped`; their transaction
        rolls back. For the long ones (a rescan of a million files is reconciled in a few SQL statements of several
        seconds): SQLite asks ``stopping`` every few thousand steps of its virtual machine."""
        self.db.set_progress_handler(stopping, INTERRUPT_STEPS)
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc) and stopping():
                raise Stopped("the run is stopping") from None
            raise
        finally:
            self.db.set_progress_handler(None, 0)

    def begin_batch(self) -> None:
        """Buffer the tasks' key-value and shared-result writes in memory until :meth:`commit_batch`, which writes
        them in one short transaction (a run commits about once a second): no fsync per write, and no write lock
        held between commits, so `duet status` and runs on other scopes never wait long.

        While batching, a commit does not wait for the disk either (``synchronous=NORMAL``): it is in the WAL, safe
        from a killed process, and a power cut can only take the last commits back to an earlier consistent state —
        work redone, nothing claimed that was not done. The last commit of a run (``again=False``) waits for the disk
        (``FULL``), as every other transaction does."""
        self._batching = True
        self.db.execute("PRAGMA synchronous=NORMAL")

    def commit_batch(self, again: bool = True, extra=None) -> None:
        """Write the buffered writes (and whatever ``extra()`` writes) atomically; keep batching if ``again``."""
        if not again:
            self.db.execute("PRAGMA synchronous=FULL")
        with self.tx():
            for (task, key), value in self._kv_pending.items():
                if value is _DELETED:
                    self.db.execute("DELETE FROM kv WHERE task=? AND key=?", (task, key))
                else:
                    self.db.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (task, key, value))
            self.db.executemany("INSERT OR REPLACE INTO shared VALUES (?,?,?,?,?,?,?,?,?)",
                                list(self._shared_pending.values()))
            if extra is not None:
                extra()
        self._kv_pending.clear()
        self._shared_pending.clear()
        self._batching = again

    def close(self) -> None:
        self.db.close()

    def copy_to(self, dest: str) -> None:
        """A consistent copy of the whole database at ``dest`` (0600, fsynced), through SQLite's backup API."""
        old_umask = os.umask(0o077)
        try:
            tmp = dest + ".tmp"
            target = sqlite3.connect(tmp)
            try:
                self.db.backup(target)
            finally:
                target.close()
            _fsync_file(tmp)
            os.rename(tmp, dest)
            _fsync_file(os.path.dirname(dest))
        finally:
            os.umask(old_umask)

    def forget_scope(self, root: str) -> bool:
        """Delete everything recorded about one scope (its files, progress and runs); False if it has none."""
        row = self.db.execute("SELECT id FROM scopes WHERE root=?", (root,)).fetchone()
        if row is None:
            return False
        with self.tx():
            for table in ("files", "progress", "range_done", "runs"):
                self.db.execute(f"DELETE FROM {table} WHERE scope_id=?", row)   # noqa: S608 - fixed table names
            self.db.execute("DELETE FROM scopes WHERE id=?", row)
        return True

    # -- scopes and files ------------------------------------------------------------------------------------------
    def scope_id(self, root: str) -> int:
        row = self.db.execute("SELECT id FROM scopes WHERE root=?", (root,)).fetchone()
        if row:
            return row[0]
        with self.tx():
            return self.db.execute("INSERT INTO scopes (root, next_file_id) VALUES (?, 0)", (root,)).lastrowid

    def sync_files(self, scope_id: int, scanned: Iterable) -> None:
        """Record a full scan: a :class:`~duet_core.scope.ScannedFile` per file. Known files keep their id.

        The scan streams into a temporary table and is reconciled with ``files`` in SQL: rows that did not change
        are not written, and no per-file Python objects are kept (a million-file scope stays small in memory).
        New files get ids in scan order.

        A scope's first scan has nothing to reconcile: it is inserted into ``files`` directly, which takes about
        half the time of going through the temporary table (the first run of a large scope waits for it).
        """
        stamp = time.time_ns()
        db = self.db
        if not self.has_files(scope_id):
            with self.tx():
                next_id = db.execute("SELECT next_file_id FROM scopes WHERE id=?", (scope_id,)).fetchone()[0]
                count = itertools.count(next_id)
                db.executemany("INSERT INTO files VALUES (?,?,?,?,?,?,?,?,?,?)",
                               ((scope_id, next(count), *fid, relpath if relpath.isascii() else db_path(relpath),
                                 size, mtime_ns, ctime_ns, stamp)
                                for fid, relpath, size, mtime_ns, ctime_ns, _nlink in scanned))
                db.execute("UPDATE scopes SET next_file_id=? WHERE id=?", (next(count), scope_id))
            return
        db.execute("CREATE TEMP TABLE IF NOT EXISTS scan (dev INTEGER, subvol INTEGER, ino INTEGER, relpath TEXT, "
                   "size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER)")
        db.execute("DROP INDEX IF EXISTS temp.scan_by_fid")
        with self.tx():
            db.execute("DELETE FROM temp.scan")
            db.executemany("INSERT INTO temp.scan VALUES (?,?,?,?,?,?,?)",
                           ((f.fid.dev, f.fid.subvol, f.fid.ino, db_path(f.relpath), f.size, f.mtime_ns, f.ctime_ns)
                            for f in scanned))
            db.execute("CREATE UNIQUE INDEX temp.scan_by_fid ON scan (dev, subvol, ino)")
            db.execute("DELETE FROM files WHERE scope_id=? AND NOT EXISTS (SELECT 1 FROM temp.scan s "
                       "WHERE s.dev=files.dev AND s.subvol=files.subvol AND s.ino=files.ino)", (scope_id,))
            db.execute("UPDATE files SET relpath=s.relpath, size=s.size, mtime_ns=s.mtime_ns, ctime_ns=s.ctime_ns, "
                       "seen=? FROM temp.scan s WHERE files.scope_id=? AND s.dev=files.dev AND "
                       "s.subvol=files.subvol AND s.ino=files.ino AND (files.relpath, files.size, files.mtime_ns, "
                       "files.ctime_ns) IS NOT (s.relpath, s.size, s.mtime_ns, s.ctime_ns)", (stamp, scope_id))
            next_id = db.execute("SELECT next_file_id FROM scopes WHERE id=?", (scope_id,)).fetchone()[0]
            added = db.execute(
                "INSERT INTO files SELECT ?, ? + ROW_NUMBER() OVER (ORDER BY s.rowid) - 1, s.dev, s.subvol, s.ino, "
                "s.relpath, s.size, s.mtime_ns, s.ctime_ns, ? FROM temp.scan s WHERE NOT EXISTS (SELECT 1 FROM "
                "files f WHERE f.scope_id=? AND f.dev=s.dev AND f.subvol=s.subvol AND f.ino=s.ino) ORDER BY s.rowid",
                (scope_id, next_id, stamp, scope_id)).rowcount
            db.execute("UPDATE scopes SET next_file_id=? WHERE id=?", (next_id + added, scope_id))
            db.execute("DELETE FROM temp.scan")

    def has_files(self, scope_id: int) -> bool:
        """Whether a scan of the scope has been recorded (with at least one file)."""
        return self.db.execute("SELECT 1 FROM files WHERE scope_id=? LIMIT 1", (scope_id,)).fetchone() is not None

    def file_id(self, scope_id: int, fid: FileId) -> int | None:
        """The compact id of ``fid`` in the scope, or None."""
        row = self.db.execute("SELECT id FROM files WHERE scope_id=? AND dev=? AND subvol=? AND ino=?",
                              (scope_id, *fid)).fetchone()
        return row[0] if row else None

    def add_file(self, scope_id: int, f) -> FileInfo:
        """A file found after the scan (a rescan during the run)."""
        with self.tx():
            row = self.db.execute("SELECT id FROM files WHERE scope_id=? AND dev=? AND subvol=? AND ino=?",
                                  (scope_id, *f.fid)).fetchone()
            if row:
                file_id = row[0]
            else:
                file_id = self.db.execute("SELECT next_file_id FROM scopes WHERE id=?", (scope_id,)).fetchone()[0]
                self.db.execute("UPDATE scopes SET next_file_id=? WHERE id=?", (file_id + 1, scope_id))
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (scope_id, file_id, *f.fid, db_path(f.relpath), f.size, f.mtime_ns, f.ctime_ns,
                             time.time_ns()))
        return FileInfo(file_id, FileId(*f.fid), f.relpath, f.size, f.mtime_ns, f.ctime_ns)

    def files(self, scope_id: int, ids: Iterable[int] | None = None) -> Iterator[FileInfo]:
        if ids is None:
            for r in self.db.execute(f"{_FILE_ROW} WHERE scope_id=? ORDER BY id", (scope_id,)):
                yield _file_info(r)
            return
        for file_id in ids:
            r = self.db.execute(f"{_FILE_ROW} WHERE scope_id=? AND id=?", (scope_id, file_id)).fetchone()
            if r:
                yield _file_info(r)

    def files_in(self, scope_id: int, ids: BitMap) -> Iterator[FileInfo]:
        """The files of ``ids``, in id order: one lookup each when they are few, else one pass over the scope's
        rows (a query per id costs more than skipping rows from FEW_IDS on)."""
        if not ids:
            return
        for f in self.files(scope_id, ids if len(ids) < FEW_IDS else None):
            if f.id in ids:
                yield f

    def file(self, scope_id: int, file_id: int) -> FileInfo | None:
        return next(self.files(scope_id, [file_id]), None)

    def files_from(self, scope_id: int, first_id: int, limit: int) -> list[FileInfo]:
        """Up to ``limit`` files with ids from ``first_id`` on, in id order: one query for a run's next files."""
        return [_file_info(r) for r in self.db.execute(f"{_FILE_ROW} WHERE scope_id=? AND id>=? ORDER BY id LIMIT ?",
                                                       (scope_id, first_id, limit))]

    def file_ids(self, scope_id: int) -> Iterator[tuple[FileId, int]]:
        """Every file of the scope as (FileId, file id), streamed."""
        for d, s, i, file_id in self.db.execute("SELECT dev, subvol, ino, id FROM files WHERE scope_id=?",
                                                (scope_id,)):
            yield FileId(d, s, i), file_id

    def all_ids(self, scope_id: int) -> BitMap:
        """The ids of the scope's files. Ids are handed out in order and never reused, so they are often one run
        (no file ever removed): then three aggregates answer it without reading a row per file."""
        lo, hi, n = self.db.execute("SELECT MIN(id), MAX(id), COUNT(*) FROM files WHERE scope_id=?",
                                    (scope_id,)).fetchone()
        if n and hi - lo + 1 == n:
            return BitMap(range(lo, hi + 1))
        return BitMap(r[0] for r in self.db.execute("SELECT id FROM files WHERE scope_id=?", (scope_id,)))

    def dataset_bytes(self, scope_id: int) -> int:
        return self.db.execute("SELECT COALESCE(SUM(size), 0) FROM files WHERE scope_id=?", (scope_id,)).fetchone()[0]

    # -- progress --------------------------------------------------------------------------------------------------
    def progress(self, scope_id: int, task: str) -> TaskProgress:
        row = self.db.execute("SELECT round, complete, planned, relevant, done FROM progress "
                              "WHERE scope_id=? AND task=?", (scope_id, task)).fetchone()
        if row is None:
            return TaskProgress()
        return TaskProgress(row[0], bool(row[1]), _bitmap(row[2]), _bitmap(row[3]), _bitmap(row[4]))

    def save_progress(self, scope_id: int, task: str, p: TaskProgress) -> None:
        self.db.execute("INSERT OR REPLACE INTO progress VALUES (?,?,?,?,?,?,?)",
                        (scope_id, task, p.round, int(p.complete), _blob(p.planned), _blob(p.relevant),
                         _blob(p.done)))

    def range_done(self, scope_id: int, task: str, file_id: int) -> BitMap:
        row = self.db.execute("SELECT pages FROM range_done WHERE scope_id=? AND task=? AND file_id=?",
                              (scope_id, task, file_id)).fetchone()
        return _bitmap(row[0]) if row else BitMap()

    def save_range_done(self, scope_id: int, task: str, file_id: int, pages: BitMap | None) -> None:
        if pages is None:
            self.db.execute("DELETE FROM range_done WHERE scope_id=? AND task=? AND file_id=?",
                            (scope_id, task, file_id))
        else:
            self.db.execute("INSERT OR REPLACE INTO range_done VALUES (?,?,?,?)",
                            (scope_id, task, file_id, _blob(pages)))

    def range_done_ids(self, scope_id: int, task: str) -> BitMap:
        """The files that have done pages stored for ``task`` (the others need no lookup)."""
        return BitMap(r[0] for r in self.db.execute("SELECT file_id FROM range_done WHERE scope_id=? AND task=?",
                                                    (scope_id, task)))

    def clear_range_done(self, scope_id: int, task: str) -> None:
        self.db.execute("DELETE FROM range_done WHERE scope_id=? AND task=?", (scope_id, task))

    # -- a task's own store, and results shared per file version ---------------------------------------------------
    def kv_get(self, task: str, key: str, default: Any = None) -> Any:
        pending = self._kv_pending.get((task, key))
        if pending is not None:
            return default if pending is _DELETED else json.loads(pending)
        row = self.db.execute("SELECT value FROM kv WHERE task=? AND key=?", (task, key)).fetchone()
        return json.loads(row[0]) if row else default

    def kv_get_many(self, task: str, keys: list[str]) -> dict[str, Any]:
        """``{key: value}`` for those of ``keys`` that are set: one query per KV_BATCH keys."""
        found: dict[str, Any] = {}
        for i in range(0, len(keys), KV_BATCH):
            part = keys[i:i + KV_BATCH]
            rows = self.db.execute(f"SELECT key, value FROM kv WHERE task=? AND key IN ({','.join('?' * len(part))})",
                                   (task, *part))
            found.update((k, json.loads(v)) for k, v in rows)
        if self._kv_pending:
            for k in keys:
                pending = self._kv_pending.get((task, k))
                if pending is _DELETED:
                    found.pop(k, None)
                elif pending is not None:
                    found[k] = json.loads(pending)
        return found

    def kv_put(self, task: str, key: str, value: Any) -> None:
        if self._batching:
            self._kv_pending[(task, key)] = json.dumps(value)
        else:
            self.db.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (task, key, json.dumps(value)))

    def kv_delete(self, task: str, key: str) -> None:
        if self._batching:
            self._kv_pending[(task, key)] = _DELETED
        else:
            self.db.execute("DELETE FROM kv WHERE task=? AND key=?", (task, key))

    def shared_get(self, file: FileInfo, name: str) -> Any:
        version = (file.size, file.mtime_ns, file.ctime_ns)
        pending = self._shared_pending.get((*file.fid, name))
        if pending is not None:
            return json.loads(pending[7]) if pending[4:7] == version else None
        row = self.db.execute("SELECT value FROM shared WHERE dev=? AND subvol=? AND ino=? AND name=? AND size=? "
                              "AND mtime_ns=? AND ctime_ns=?", (*file.fid, name, *version)).fetchone()
        return json.loads(row[0]) if row else None

    def shared_put(self, file: FileInfo, name: str, value: Any, task: str = "") -> None:
        row = (*file.fid, name, file.size, file.mtime_ns, file.ctime_ns, json.dumps(value), task)
        if self._batching:
            self._shared_pending[(*file.fid, name)] = row
        else:
            self.db.execute("INSERT OR REPLACE INTO shared VALUES (?,?,?,?,?,?,?,?,?)", row)

    # -- runs ------------------------------------------------------------------------------------------------------
    def start_run(self, scope_id: int, tasks: list[str]) -> int:
        with self.tx():
            return self.db.execute("INSERT INTO runs (scope_id, tasks, started) VALUES (?,?,?)",
                                   (scope_id, json.dumps(tasks), time.time())).lastrowid

    def end_run(self, run_id: int, result: str, summary: dict) -> None:
        with self.tx():
            self.db.execute("UPDATE runs SET ended=?, result=?, summary=? WHERE id=?",
                            (time.time(), result, json.dumps(summary), run_id))

    def scopes(self) -> list[tuple[int, str]]:
        return list(self.db.execute("SELECT id, root FROM scopes ORDER BY root"))

    def last_summary(self, scope_id: int) -> dict:
        """The summary of the scope's most recent finished run ({} if none)."""
        row = self.db.execute("SELECT summary FROM runs WHERE scope_id=? AND ended IS NOT NULL ORDER BY id DESC "
                              "LIMIT 1", (scope_id,)).fetchone()
        return json.loads(row[0] or "{}") if row else {}

    def last_runs(self, scope_id: int) -> dict[str, dict]:
        """The most recent finished run of each task on the scope: {task: {started, ended, result, summary}}."""
        out: dict[str, dict] = {}
        for started, ended, result, summary, tasks in self.db.execute(
                "SELECT started, ended, result, summary, tasks FROM runs WHERE scope_id=? AND ended IS NOT NULL "
                "ORDER BY id DESC", (scope_id,)):
            data = json.loads(summary or "{}")
            for task in json.loads(tasks):
                if task not in out:
                    out[task] = {"started": started, "ended": ended, "result": result,
                                 **data.get("tasks", {}).get(task, {})}
        return out


class _Tx:
    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.outer = False

    def __enter__(self):
        self.outer = not self.db.in_transaction
        if self.outer:
            self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, *_):
        if not self.outer:
            return
        if exc_type is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:   # an interrupted statement (StateStore.interruptible) rolled it back already
            self.db.execute("ROLLBACK")
