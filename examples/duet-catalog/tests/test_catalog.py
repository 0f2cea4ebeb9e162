"""The catalog task, installed, run by duet over a real filesystem (fixtures duet_fs and duet_cli come with duet)."""

import os
import sqlite3

import blake3


def catalog(index, root):
    """{relpath: (size, blake3)} as the catalog holds them for this scope."""
    with sqlite3.connect(index) as db:
        rows = db.execute("SELECT relpath, size, blake3 FROM files WHERE root=?", (os.path.realpath(root),))
        return {relpath: (size, digest) for relpath, size, digest in rows}


def tree(root):
    """{relpath: (size, blake3)} of the files as they are."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                data = fh.read()
            out[os.path.relpath(path, root)] = (len(data), blake3.blake3(data).hexdigest())
    return out


def test_catalog_matches_the_files_and_follows_changes(duet_fs, duet_cli, tmp_path):
    for i, size in enumerate((0, 4096, 100_000, 1_500_000)):
        duet_fs.write(f"dir{i % 2}/file{i}", os.urandom(size))
    duet_fs.evict()
    duet_fs.read("dir1/file3")                 # an application just read this one: it is hashed from memory
    index = str(tmp_path / "catalog.db")

    first = duet_cli.run("catalog", duet_fs.root, index=index)
    assert first.exit_code == 0, first
    report = first.task("catalog")
    assert report["items_done"] == report["items_total"] == 4
    assert report["bytes_from_cache"] > 1_000_000   # most of the file the application read (pages may be reclaimed)
    assert report["catalogued"] == 4
    assert catalog(index, duet_fs.root) == tree(duet_fs.root)
    assert os.stat(index).st_mode & 0o077 == 0

    duet_fs.write("dir0/file2", b"changed")    # changed, removed, added: the next round hashes only what is new
    os.unlink(duet_fs.path("dir1/file1"))
    duet_fs.write("new/file", os.urandom(10_000))

    second = duet_cli.run("catalog", duet_fs.root, index=index)
    assert second.exit_code == 0, second
    report = second.task("catalog")
    assert report["items_total"] == 2
    assert report["counters"]["hashed_bytes"] == len(b"changed") + 10_000
    assert report["removed"] == 1
    assert catalog(index, duet_fs.root) == tree(duet_fs.root)


def test_catalog_needs_its_index_option(duet_fs, duet_cli):
    duet_fs.write("a", b"x")
    result = duet_cli.run("catalog", duet_fs.root)
    assert result.exit_code == 2
    assert "needs option 'index'" in result.stderr
