"""A damaged, foreign or misplaced state database, and ``duet state reset`` — through ``duet`` as a real process.

Every kind of damage gives one ``duet: error:`` line (exit 2) that names the way out, for ``duet run`` and
``duet status`` alike, and leaves the file exactly as it was: duet never resets state silently. ``duet state reset
--all`` then moves the database aside (kept, under a timestamped name, byte for byte) and the next run starts
afresh; ``--path`` forgets one scope and keeps a copy of the whole database first.
"""

from __future__ import annotations

import glob
import json
import os
import sqlite3
import stat

import pytest
from reliability import RDuet, duet, sha256  # noqa: F401 - duet: shared fixtures
from test_run_cli import one_error, summary_of

from duet_core.lock import ScopeLock

pytestmark = pytest.mark.bpf

RESET_HINT = "duet state reset --all --state-dir"


def make_scope(path, n: int = 4) -> dict[bytes, bytes]:
    path.mkdir()
    files = {f"f{i}".encode(): os.urandom(5000 + i) for i in range(n)}
    for name, data in files.items():
        (path / os.fsdecode(name)).write_bytes(data)
    return files


def fingerprint(path: str) -> tuple:
    """What is at ``path`` now, without following a symlink: kind and content."""
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as fh:
            return ("file", sha256(fh.read()))
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    return ("dir" if stat.S_ISDIR(st.st_mode) else "other", sorted(os.listdir(path)) if stat.S_ISDIR(st.st_mode)
            else None)


def _garbage(db: str, state: str) -> None:
    with open(db, "wb") as fh:
        fh.write(os.urandom(40000))


def _truncated(db: str, state: str) -> None:
    with open(db, "r+b") as fh:
        fh.truncate(os.path.getsize(db) // 2 + 100)


def _damaged_pages(db: str, state: str) -> None:
    """Every page but the first (the schema) overwritten: the file opens, and breaks when a table is read."""
    size = os.path.getsize(db)
    with open(db, "r+b") as fh:
        fh.seek(4096)
        fh.write(b"\xa5" * (size - 4096))


def _foreign(db: str, state: str) -> None:
    os.remove(db)
    other = sqlite3.connect(db)
    other.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    other.execute("INSERT INTO photos (name) VALUES ('holiday.jpg')")
    other.commit()
    other.close()


def _other_schema(db: str, state: str) -> None:
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value='99' WHERE key='schema'")
    con.commit()
    con.close()


def _directory(db: str, state: str) -> None:
    os.remove(db)
    os.mkdir(db)
    with open(os.path.join(db, "inside"), "w") as fh:
        fh.write("someone's file\n")


def _symlink(db: str, state: str) -> None:
    target = os.path.join(os.path.dirname(state), "elsewhere.db")
    os.rename(db, target)
    os.symlink(target, db)


DAMAGE = {
    "garbage": (_garbage, "file is not a database"),
    "truncated": (_truncated, "malformed"),
    "damaged-pages": (_damaged_pages, "malformed"),
    "foreign-sqlite": (_foreign, "an SQLite database but not duet's"),
    "other-schema": (_other_schema, "has schema 99"),
    "directory": (_directory, "is a directory"),
    "symlink": (_symlink, "is a symbolic link"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_state_database_is_one_line_kept_as_is_and_reset_moves_it_aside(duet, tmp_path, kind):
    damage, needle = DAMAGE[kind]
    files = make_scope(tmp_path / "scope")
    scope = str(tmp_path / "scope")
    first = duet("run", "hexer", "--path", scope, "--json")
    assert first.returncode == 0, first.stderr
    db = str(duet.state / "state.db")
    checkpoint = sqlite3.connect(db)            # fold the WAL in, so the damage hits the data
    checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpoint.close()
    for extra in ("-wal", "-shm"):
        if os.path.exists(db + extra):
            os.remove(db + extra)
    damage(db, str(duet.state))
    before = fingerprint(db)
    for args in (("run", "hexer", "--path", scope), ("status",)):
        line = one_error(duet(*args), 2, needle)
        assert RESET_HINT in line and "the old file is kept" in line
        assert fingerprint(db) == before, "duet changed the damaged database"
    assert len(duet.hex_log()) == len(files)    # no task ran
    # Not confirmed (no terminal, no --yes): nothing happens.
    one_error(duet("state", "reset", "--all"), 2, "not confirmed")
    assert fingerprint(db) == before
    # The way out: moved aside, kept as it was; the next run starts afresh.
    reset = duet("state", "reset", "--all", "--yes")
    assert reset.returncode == 0, reset.stderr
    (aside,) = glob.glob(str(duet.state / "state.db.*"))
    assert f"moved {db} aside to {aside}" in reset.stderr
    assert fingerprint(aside) == before and not os.path.lexists(db)
    again = duet("run", "hexer", "--path", scope, "--json")
    assert again.returncode == 0, again.stderr
    assert summary_of(again)["tasks"]["hexer"]["items_done"] == len(files)
    assert duet.hex_counts() == {name: 2 for name in files}


def test_state_files_others_may_read_are_made_private_again(duet, tmp_path):
    make_scope(tmp_path / "scope")
    scope = str(tmp_path / "scope")
    assert duet("run", "hexer", "--path", scope).returncode == 0
    db = duet.state / "state.db"
    os.chmod(duet.state, 0o755)
    os.chmod(db, 0o644)
    proc = duet("status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(os.stat(duet.state).st_mode) == 0o700
    for path in [db, *duet.state.glob("state.db-*"), *(duet.state / "locks").iterdir()]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(duet.state / "locks").st_mode) == 0o700


def test_reset_one_scope_keeps_a_copy_and_leaves_the_others(duet, tmp_path):
    files_a = make_scope(tmp_path / "a", 3)
    files_b = make_scope(tmp_path / "b", 2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for scope in (a, b):
        assert duet("run", "hexer", "--path", scope).returncode == 0
    one_error(duet("state", "reset", "--path", str(tmp_path)), 2, "no duet run has covered")
    proc = duet("state", "reset", "--path", a, "--yes")
    assert proc.returncode == 0, proc.stderr
    (copy,) = glob.glob(str(duet.state / "state.db.*"))
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o600
    kept = sqlite3.connect(copy)
    assert sorted(r[0] for r in kept.execute("SELECT root FROM scopes")) == [a, b]
    assert kept.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    kept.close()
    status = json.loads(duet("status", "--json").stdout)
    assert [sc["scope"] for sc in status["scopes"]] == [b]
    # a starts afresh (round 1 again, every file processed again); b keeps its state.
    assert duet("run", "hexer", "--path", a).returncode == 0
    status = {sc["scope"]: sc["tasks"]["hexer"] for sc in json.loads(duet("status", "--json").stdout)["scopes"]}
    assert (status[a]["round"], status[a]["items_done"]) == (1, len(files_a))
    assert (status[b]["round"], status[b]["items_done"], status[b]["complete"]) == (1, len(files_b), True)
    assert sorted(p for _, p, _ in duet.hex_log()) == sorted([*files_a, *files_a, *files_b])


def test_reset_refuses_while_a_run_holds_a_scope(duet, tmp_path):
    make_scope(tmp_path / "scope", 2)
    scope = str(tmp_path / "scope")
    assert duet("run", "hexer", "--path", scope).returncode == 0
    db = str(duet.state / "state.db")
    before = fingerprint(db)
    with ScopeLock(str(duet.state), scope):
        one_error(duet("state", "reset", "--all", "--yes"), 4, f"(pid {os.getpid()}) is working on {scope}")
        one_error(duet("state", "reset", "--path", scope, "--yes"), 4, "another duet run")
    assert fingerprint(db) == before and not glob.glob(db + ".*")
