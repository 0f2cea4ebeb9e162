"""duet's persistent state: one SQLite database (WAL) under the state directory, 0700/0600.

What lives here, per scope: the files of the last scan with compact ids (so progress fits in Roaring bitmaps),
each task's progress through its current round (planned / relevant / done bitmaps over file ids, and done pages of
range tasks), the tasks' own key-value stores, results shared per file version, and the history of runs. Paths and
per-file state live here rather than in Python objects, so a scope of a million files does not live in memory.
Every change is a transaction: a crash leaves the last committed state, and the next run resumes from it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pyroaring import BitMap

from duet_core.errors import DuetError
from duet_core.events import FileId
from duet_core.tasks import FileInfo

DEFAULT_STATE_DIR = "/var/lib/duet"
_DELETED = object()
SCHEMA_VERSION = 1

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


def _blob(bm: BitMap) -> bytes:
    return bm.serialize()


def _path_in(relpath: str) -> str | bytes:
    """A path as SQLite can store it: names that are not UTF-8 (surrogate-escaped by os.fsdecode) as raw bytes."""
    try:
        relpath.encode()
    except UnicodeEncodeError:
        return os.fsencode(relpath)
    return relpath


def _path_out(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _bitmap(blob: bytes) -> BitMap:
    return BitMap.deserialize(blob)


class StateStore:
    """The state database. One instance per process; not shared between threads."""

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR):
        self.dir = os.path.abspath(state_dir)
        _secure_dir(self.dir)
        self.path = os.path.join(self.dir, "state.db")
        self._batching = False
        self._kv_pending: dict[tuple[str, str], Any] = {}
        self._shared_pending: dict[tuple, tuple] = {}
        old_umask = os.umask(0o077)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise DuetError(f"state database {self.path} is unreadable: {exc}",
                            hint="move it away to start afresh (progress will be lost)") from None
        finally:
            os.umask(old_umask)

    def _init_schema(self) -> None:
        # Readers (duet status) must not queue behind a running duet for a write lock: look before writing.
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.OperationalError:
            row = None   # a new database: no tables yet
        if row is not None:
            if row[0] != str(SCHEMA_VERSION):
                raise DuetError(f"state database {self.path} has schema {row[0]}, this duet uses {SCHEMA_VERSION}")
            return
        with self.tx():
            for stmt in filter(str.strip, SCHEMA.split(";")):
                self.db.execute(stmt)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise DuetError(f"state database {self.path} has schema {row[0]}, this duet uses {SCHEMA_VERSION}")

    def tx(self):
        """A transaction: ``with store.tx(): ...`` commits on success, rolls back on error (nested: joins)."""
        return _Tx(self.db)

    def begin_batch(self) -> None:
        """Buffer the tasks' key-value and shared-result writes in memory until :meth:`commit_batch`, which writes
        them in one short transaction (a run commits about once a second): no fsync per write, and no write lock
        held between commits, so `duet status` and runs on other scopes never wait long."""
        self._batching = True

    def commit_batch(self, again: bool = True, extra=None) -> None:
        """Write the buffered writes (and whatever ``extra()`` writes) atomically; keep batching if ``again``."""
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

    # -- scopes and files ------------------------------------------------------------------------------------------
    def scope_id(self, root: str) -> int:
        row = self.db.execute("SELECT id FROM scopes WHERE root=?", (root,)).fetchone()
        if row:
            return row[0]
        with self.tx():
            return self.db.execute("INSERT INTO scopes (root, next_file_id) VALUES (?, 0)", (root,)).lastrowid

    def sync_files(self, scope_id: int, scanned: Iterable) -> None:
        """Record a full scan: (fid, relpath, size, mtime_ns, ctime_ns) per file. Known files keep their id."""
        stamp = time.time_ns()
        with self.tx():
            next_id = self.db.execute("SELECT next_file_id FROM scopes WHERE id=?", (scope_id,)).fetchone()[0]
            known = {(d, s, i): fid for d, s, i, fid in self.db.execute(
                "SELECT dev, subvol, ino, id FROM files WHERE scope_id=?", (scope_id,))}
            rows = []
            for f in scanned:
                key = (f.fid.dev, f.fid.subvol, f.fid.ino)
                file_id = known.get(key)
                if file_id is None:
                    file_id = next_id
                    next_id += 1
                rows.append((scope_id, file_id, *key, _path_in(f.relpath), f.size, f.mtime_ns, f.ctime_ns, stamp))
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            self.db.execute("DELETE FROM files WHERE scope_id=? AND seen<>?", (scope_id, stamp))
            self.db.execute("UPDATE scopes SET next_file_id=? WHERE id=?", (next_id, scope_id))

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
                            (scope_id, file_id, *f.fid, _path_in(f.relpath), f.size, f.mtime_ns, f.ctime_ns,
                             time.time_ns()))
        return FileInfo(file_id, FileId(*f.fid), f.relpath, f.size, f.mtime_ns, f.ctime_ns)

    def files(self, scope_id: int, ids: Iterable[int] | None = None) -> Iterator[FileInfo]:
        if ids is None:
            cur = self.db.execute("SELECT id, dev, subvol, ino, relpath, size, mtime_ns, ctime_ns FROM files "
                                  "WHERE scope_id=? ORDER BY id", (scope_id,))
            for r in cur:
                yield FileInfo(r[0], FileId(r[1], r[2], r[3]), _path_out(r[4]), r[5], r[6], r[7])
            return
        for file_id in ids:
            r = self.db.execute("SELECT id, dev, subvol, ino, relpath, size, mtime_ns, ctime_ns FROM files "
                                "WHERE scope_id=? AND id=?", (scope_id, file_id)).fetchone()
            if r:
                yield FileInfo(r[0], FileId(r[1], r[2], r[3]), _path_out(r[4]), r[5], r[6], r[7])

    def file(self, scope_id: int, file_id: int) -> FileInfo | None:
        return next(self.files(scope_id, [file_id]), None)

    def file_ids(self, scope_id: int) -> dict[FileId, int]:
        return {FileId(d, s, i): fid for d, s, i, fid in self.db.execute(
            "SELECT dev, subvol, ino, id FROM files WHERE scope_id=?", (scope_id,))}

    def all_ids(self, scope_id: int) -> BitMap:
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

    def clear_range_done(self, scope_id: int, task: str) -> None:
        self.db.execute("DELETE FROM range_done WHERE scope_id=? AND task=?", (scope_id, task))

    # -- a task's own store, and results shared per file version ---------------------------------------------------
    def kv_get(self, task: str, key: str, default: Any = None) -> Any:
        pending = self._kv_pending.get((task, key))
        if pending is not None:
            return default if pending is _DELETED else json.loads(pending)
        row = self.db.execute("SELECT value FROM kv WHERE task=? AND key=?", (task, key)).fetchone()
        return json.loads(row[0]) if row else default

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
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
