"""duet task ``catalog``: keep a SQLite catalog of every file of a scope — path, size, mtime and BLAKE3 hash.

An example of an out-of-tree duet plugin (see duet's docs/plugins.md). What it shows:

* **Incremental work through ``duet_plan``**: at the start of a round only new and changed files (size or mtime
  differ from the catalog) are chosen; the rest are stamped as seen and cost nothing.
* **Cache first, for free**: duet hands over files already in the page cache first, so a catalog of a busy tree
  is mostly built from memory.
* **Sharing hashes**: a hash another task computed for the same version of the file (``ctx.shared``, name
  ``"blake3"``) is used instead of reading the file again, and a hash computed here is published for the others.
* **Nothing lost**: every item is committed to the catalog on its own (SQLite transaction), so a run killed at any
  point keeps what it did and duet resumes the round; rows of deleted files go only when a round completes.

Query the catalog with any SQLite client::

    sqlite3 /var/lib/duet-catalog/home.db "SELECT relpath FROM files WHERE blake3 = '...'"
"""

from __future__ import annotations

import os
import sqlite3

import blake3

from duet_core import ItemResult, TaskOption, TaskSpec, hookimpl

CHUNK = 1 << 20
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    root TEXT NOT NULL,          -- the scope, as duet resolved it
    relpath TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    blake3 TEXT,                 -- NULL until hashed in this round
    seen_round INTEGER NOT NULL, -- duet's round that last found the file in the scope
    PRIMARY KEY (root, relpath)
)
"""


class Catalog:
    def __init__(self) -> None:
        self._db: dict[str, sqlite3.Connection] = {}

    def db(self, run) -> sqlite3.Connection:
        """The catalog named by the ``index`` option, created 0600 on first use, one connection per process."""
        path = run.options["index"]
        if path not in self._db:
            if not os.path.isdir(os.path.dirname(path)):
                raise FileNotFoundError(f"catalog directory {os.path.dirname(path)} does not exist")
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            con = sqlite3.connect(path, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute(SCHEMA)
            self._db[path] = con
        return self._db[path]

    @hookimpl
    def duet_task(self):
        return TaskSpec("catalog", "SQLite catalog of every file: path, size, mtime, BLAKE3",
                        options=(TaskOption("index", "path", required=True,
                                            help="the SQLite catalog file (its directory must exist)"),),
                        api_version=1)

    @hookimpl
    def duet_plan(self, run, files):
        db = self.db(run)
        chosen = []
        with db:   # one transaction per batch
            db.execute("BEGIN")
            for f in files:
                row = db.execute("SELECT size, mtime_ns, blake3 FROM files WHERE root=? AND relpath=?",
                                 (run.root, f.relpath)).fetchone()
                if row is not None and row[2] is not None and (row[0], row[1]) == (f.size, f.mtime_ns):
                    db.execute("UPDATE files SET seen_round=? WHERE root=? AND relpath=?",
                               (run.round, run.root, f.relpath))
                    continue
                db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,NULL,?)",
                           (run.root, f.relpath, f.size, f.mtime_ns, run.round))
                chosen.append(f.id)
        return chosen

    @hookimpl
    def duet_process(self, ctx):
        digest = ctx.shared.get(ctx.file, "blake3")
        reused = digest is not None
        if not reused:
            hasher, offset = blake3.blake3(), 0
            while chunk := os.pread(ctx.fd, CHUNK, offset):
                ctx.checkpoint()        # --rate-limit within a large file; a stop abandons it (redone next run)
                hasher.update(chunk)
                offset += len(chunk)
            digest = hasher.hexdigest()
            ctx.shared.put(ctx.file, "blake3", digest)
        db = self.db(ctx.run)
        with db:
            db.execute("BEGIN")
            db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)",
                       (ctx.run.root, ctx.file.relpath, ctx.file.size, ctx.file.mtime_ns, digest, ctx.run.round))
        return ItemResult(counters={"hashes_reused": int(reused), "hashed_bytes": 0 if reused else ctx.file.size})

    @hookimpl
    def duet_finish(self, run, report):
        db = self.db(run)
        removed = 0
        if report.complete:   # a full round saw every file that exists: the others are gone
            with db:
                db.execute("BEGIN")
                removed = db.execute("DELETE FROM files WHERE root=? AND seen_round!=?",
                                     (run.root, run.round)).rowcount
        (count,) = db.execute("SELECT count(*) FROM files WHERE root=? AND blake3 IS NOT NULL",
                              (run.root,)).fetchone()
        self._db.pop(run.options["index"]).close()
        return {"catalogued": count, "removed": removed}


plugin = Catalog()
