"""What a scope leaves out — ``--exclude`` patterns, ``--one-file-system``, duet's own state — is left out by every
walk of it: no task is handed an excluded file, and a backup's snapshot holds none of it (the backup's own sync pass
walks the tree, so this is checked there, against rsync given the same rules).
"""

from __future__ import annotations

import json
import os

import backup_helpers as bh
import fsimage
import pytest
from test_backup import Duet, one_error, snap, source, target  # noqa: F401 - fixtures: btrfs source, btrfs/ext4 target

from duet_core.exclude import Exclusions

pytestmark = pytest.mark.bpf

duet = Duet.fixture()

PATTERNS = ["*.tmp", ".cache/", "/var/tmp", "home/*/.thumbs", "**/build"]
KEPT = ["a.txt", "var/log/syslog", "home/al/notes.txt", "home/al/deep/.thumbs/x", "x/var/tmp/kept",
        "cache.d/.cache", "docs/build.txt"]   # the last but two and one: ".cache/" matches directories only
LEFT_OUT = ["b.tmp", "home/al/y.tmp", "home/al/.cache/big", "var/tmp/scratch", "home/al/.thumbs/t1",
            "build/out.o", "src/deep/build/out.o"]


def make_tree(scope: str) -> None:
    for i, rel in enumerate(KEPT + LEFT_OUT):
        bh.write(os.path.join(scope, rel), f"{rel}\n".encode() * (i + 1))
    os.symlink("a.txt", os.path.join(scope, "link.tmp"))       # a symlink matching a pattern: left out too


def tree_files(root: str) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def test_the_patterns_match_as_documented():
    """Names at any depth, paths from the scope's root, ``**`` across directories, ``/`` at the end for
    directories only, ``\\`` for a literal character; the own paths are taken literally."""
    ex = Exclusions(PATTERNS + [r"\*lit", "[!a]y", "a[[]b"], own=["state/duet"])

    def left_out(rel: str) -> bool:
        """As a walk sees it: the file itself, or a directory on its way (not entered) is excluded."""
        parts = rel.split("/")
        return any(ex.excluded("/".join(parts[:i + 1]), parts[i], i < len(parts) - 1) for i in range(len(parts)))

    for rel in LEFT_OUT + ["*lit", "by", "a[b", "state/duet/state.db"]:
        assert left_out(rel), rel
    for rel in KEPT + ["xlit", "ay", "state/x", "state/duet2"]:
        assert not left_out(rel), rel
    assert not Exclusions()


def test_a_path_looked_at_alone_is_excluded_by_a_directory_above_it():
    ex = Exclusions(["cache/", "*.tmp", "/top"], own=["state"])
    assert ex.excluded_path("a/cache/deep/file.txt", False)       # a directory above it, at any depth
    assert ex.excluded_path("top/x", False) and ex.excluded_path("state/duet.db", False)
    assert ex.excluded_path("a/b.tmp", False)
    assert not ex.excluded_path("a/cache", False)                  # a file named cache: the pattern is dirs only
    assert not ex.excluded_path("a/top/x", False)                  # /top is anchored at the root
    assert not Exclusions().excluded_path("a/cache/x", False)


def test_excluded_entries_are_in_no_snapshot_and_a_new_pattern_takes_them_out(duet, source, target):
    scope = os.path.join(source.mnt, "data")
    make_tree(scope)
    args = [a for p in PATTERNS for a in ("--exclude", p)]
    rep = duet.backup(scope, target.mnt, *args)
    taken = snap(target, rep["snapshot"])
    assert tree_files(taken) == set(KEPT), tree_files(taken) ^ set(KEPT)
    assert bh.rsync_diff(scope, taken, *(f"--exclude={p}" for p in PATTERNS)) == []
    assert rep["_summary"]["dataset_bytes"] == sum(os.path.getsize(os.path.join(scope, r)) for r in KEPT)
    assert rep["_summary"]["exclude"] == PATTERNS and rep["_summary"]["one_file_system"] is False
    status = json.loads(duet("status", "--path", scope, "--json").stdout)["scopes"][0]
    assert status["exclude"] == PATTERNS and status["one_file_system"] is False

    # Nothing changed in the source, one more pattern: the next snapshot leaves that out too (no shortcut taken
    # from the last snapshot, made under other rules). From a file, as --exclude-from reads them.
    rules = os.path.join(str(duet.state) + "-rules")
    with open(rules, "w") as fh:
        fh.write("# comments and blank lines are skipped\n\n/home/al/deep\n")
    rep2 = duet.backup(scope, target.mnt, *args, "--exclude-from", rules)
    assert tree_files(snap(target, rep2["snapshot"])) == set(KEPT) - {"home/al/deep/.thumbs/x"}
    assert tree_files(taken) == set(KEPT)       # the earlier snapshot is as it was

    # Without the patterns the next snapshot is the whole source again.
    rep3 = duet.backup(scope, target.mnt)
    bh.assert_same_tree(scope, snap(target, rep3["snapshot"]))


def test_one_file_system_keeps_the_mount_point_but_not_what_is_mounted_on_it(duet, source, target):
    """rsync -x: the directory a filesystem is mounted on is copied, empty; a nested btrfs subvolume is the same
    filesystem and is copied whole. Without -x everything is."""
    scope = os.path.join(source.mnt, "data")
    bh.write(os.path.join(scope, "top"), b"top\n")
    fsimage.run(["btrfs", "subvolume", "create", os.path.join(scope, "sub")])
    bh.write(os.path.join(scope, "sub", "in-subvolume"), b"sub\n")
    with fsimage.loop_fs("ext4") as other:
        bh.write(os.path.join(other.mnt, "deep", "elsewhere"), b"other filesystem\n")
        with fsimage.bind_mount(other.mnt, os.path.join(scope, "mnt")):
            rep = duet.backup(scope, target.mnt, "--one-file-system")
            taken = snap(target, rep["snapshot"])
            assert os.path.isdir(os.path.join(taken, "mnt"))
            assert tree_files(taken) == {"top", "sub/in-subvolume"}
            assert bh.rsync_diff(scope, taken, "-x") == []
            assert rep["_summary"]["dataset_bytes"] == 8

            rep = duet.backup(scope, target.mnt)        # crossing file systems again: the other one is in
            bh.assert_same_tree(scope, snap(target, rep["snapshot"]))
            assert "mnt/deep/elsewhere" in tree_files(snap(target, rep["snapshot"]))

            rep = duet.backup(scope, target.mnt, "-x")  # and out again, from a snapshot that had it
            assert tree_files(snap(target, rep["snapshot"])) == {"top", "sub/in-subvolume"}


def test_a_state_directory_inside_the_scope_is_never_part_of_it(duet, source, target):
    """duet's own database changes all through a run: were it in the scope, every backup would copy it (as it was
    at some moment) and every run would find it changed."""
    scope = os.path.join(source.mnt, "data")
    bh.write(os.path.join(scope, "f"), b"data\n")
    state = os.path.join(scope, "var", "lib", "duet")
    proc = duet("run", "backup", "--path", scope, "--target", target.mnt, "--state-dir", state, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert os.path.exists(os.path.join(state, "state.db"))
    taken = snap(target, summary["tasks"]["backup"]["snapshot"])
    assert tree_files(taken) == {"f"}
    assert summary["dataset_bytes"] == 5 and summary["tasks"]["backup"]["items_total"] == 1


def test_bad_exclude_patterns_are_one_line_and_exit_2(duet, source, tmp_path):
    scope = os.path.join(source.mnt, "data")
    bh.write(os.path.join(scope, "f"), b"x")
    one_error(duet("run", "backup", "--path", scope, "--target", str(tmp_path), "--exclude", "/"), 2,
              "names nothing")
    one_error(duet("watch", "scrub", "--path", scope, "--exclude", ""), 2, "names nothing")
    one_error(duet("run", "backup", "--path", scope, "--target", str(tmp_path), "--exclude-from",
                   str(tmp_path / "missing")), 2, "cannot read --exclude-from")
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[[scope]]\npath = "{scope}"\ntasks = ["scrub"]\nexclude = "*.tmp"\n')
    one_error(duet("run", "--config", str(bad)), 2, "scope[0].exclude: expected a list of exclude patterns")
    bad.write_text('[defaults]\nexclude = ["ok", "//"]\n')
    one_error(duet("run", "--config", str(bad), "scrub", "--path", scope), 2, "defaults.exclude[1]")
    assert not os.path.exists(os.path.join(tmp_path, "snapshots"))
    # An absolute path under the scope is taken as rsync takes it (from the scope's root): said, not refused.
    proc = duet("run", "scrub", "--path", scope, "--exclude", os.path.join(scope, "f"))
    assert proc.returncode == 0, proc.stderr
    assert f"for {os.path.join(scope, 'f')} write '/f'" in proc.stderr, proc.stderr
