"""``duet verify``: snapshots read back against the blake3 their backup recorded, on real btrfs and ext4 targets.

Damage is made as it happens: a bit flipped on the btrfs target's device under a snapshot's file (btrfs then refuses
the block: EIO), and on ext4 bytes changed in place, a file truncated, removed, or added by hand.
"""

from __future__ import annotations

import json
import os

import backup_helpers as bh
import pytest
from test_backup import Duet, one_error, snap, source  # noqa: F401 - source: the btrfs source fixture
from test_scrub import flip_bit

from duet_core import residency
from duet_core.testing import evict_tree

pytestmark = pytest.mark.bpf

duet = Duet.fixture()


def verify(duet: Duet, target: str, *args: str) -> tuple[int, dict]:
    proc = duet("verify", "--target", target, "--json", *args)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 6), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def problems(report: dict) -> dict[tuple[str, str], str]:
    """(snapshot, path inside it) -> problem."""
    return {(c["snapshot"], c["path"].split(f"/snapshots/{c['snapshot']}/", 1)[1]): c["problem"]
            for c in report["corrupt"]}


def listed(duet: Duet, target: str) -> list[dict]:
    proc = duet("snapshots", "--target", target, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["snapshots"]


def test_damage_in_hard_link_snapshots_is_found_in_every_snapshot_sharing_it(duet, source, ext4_fs):
    scope = bh.make_tree(source.mnt)
    first = duet.backup(scope, ext4_fs.mnt)["snapshot"]
    code, report = verify(duet, ext4_fs.mnt)
    assert code == 0 and report["corrupt"] == [], report
    (checked,) = report["snapshots"]
    assert checked["files"] == len(bh.manifest(ext4_fs.mnt, first)["files"]) and checked["bytes"] > 3 << 20
    assert [r["verified"]["problems"] for r in listed(duet, ext4_fs.mnt)] == [0]

    bh.write(os.path.join(scope, "docs", "note00.txt"), b"changed for the second snapshot")
    second = duet.backup(scope, ext4_fs.mnt)["snapshot"]
    # The second snapshot links every unchanged file to the first: damage to one inode is damage to both.
    taken = snap(ext4_fs, second)
    with open(os.path.join(taken, "big", "blob.bin"), "r+b") as fh:     # one bit, in place: same size, same times
        fh.seek(123456)
        byte = fh.read(1)
        fh.seek(123456)
        fh.write(bytes([byte[0] ^ 1]))
    os.truncate(os.path.join(taken, "docs", "note03.txt"), 10)
    os.unlink(os.path.join(taken, "docs", "note00.txt"))
    bh.write(os.path.join(taken, "docs", "planted"), b"nobody backed this up")
    os.rmdir(os.path.join(taken, "empty-dir"))
    os.unlink(os.path.join(taken, "dangling"))
    os.symlink("/etc/shadow", os.path.join(taken, "docs", "planted-link"))
    evict_tree(ext4_fs.mnt)

    note03 = os.path.getsize(os.path.join(scope, "docs", "note03.txt"))
    code, report = verify(duet, ext4_fs.mnt, "--all")
    assert code == 6
    found = problems(report)
    assert found == {
        (first, "big/blob.bin"): "content differs from what the backup recorded (blake3)",
        (second, "big/blob.bin"): "content differs from what the backup recorded (blake3)",
        (first, "docs/note03.txt"): f"size 10, the backup recorded {note03}",
        (second, "docs/note03.txt"): found[(first, "docs/note03.txt")],
        (second, "docs/note00.txt"): "missing",
        (second, "docs/planted"): "not put there by the backup (not in the manifest)",
        (second, "empty-dir"): "missing",
        (second, "dangling"): "missing",
        (second, "docs/planted-link"): "not put there by the backup (not in the manifest)",
    }, found
    # duet snapshots shows what the last check of each found; a snapshot never checked says so.
    assert [r["verified"]["problems"] for r in listed(duet, ext4_fs.mnt)] == [2, 7]
    # What the check read is not left in the page cache.
    assert report["snapshots"][1]["bytes"] > 3 << 20
    fd = os.open(os.path.join(taken, "big", "blob.bin"), os.O_RDONLY)
    try:
        assert residency.resident_count(fd) == 0
    finally:
        os.close(fd)

    code, report = verify(duet, ext4_fs.mnt, "--snapshot", first)
    assert code == 6 and {s for s, _ in problems(report)} == {first}
    third = duet.backup(scope, ext4_fs.mnt)["snapshot"]
    assert [r["name"] for r in listed(duet, ext4_fs.mnt) if r["verified"] is None] == [third]
    assert "never" in duet("snapshots", "--target", ext4_fs.mnt).stdout


def test_a_bit_flipped_on_a_btrfs_target_is_found(duet, source, btrfs_fs):
    scope = os.path.join(source.mnt, "data")
    for i in range(4):
        bh.write(os.path.join(scope, f"f{i}"), os.urandom(256 << 10))
    name = duet.backup(scope, btrfs_fs.mnt)["snapshot"]
    assert verify(duet, btrfs_fs.mnt)[0] == 0
    flip_bit(btrfs_fs, os.path.join(snap(btrfs_fs, name), "f2"), 100_000)
    code, report = verify(duet, btrfs_fs.mnt)
    assert code == 6
    assert problems(report) == {(name, "f2"): "unreadable: Input/output error"}, report
    proc = duet("verify", "--target", btrfs_fs.mnt)       # the same, for people: one line per damaged file
    assert proc.returncode == 6
    assert f"CORRUPT {snap(btrfs_fs, name)}/f2: unreadable" in proc.stdout, proc.stdout


def test_the_target_comes_from_the_config_when_not_given(duet, source, ext4_fs, tmp_path):
    """As from cron: duet verify / snapshots / restore with the config duet run backup uses."""
    scope = os.path.join(source.mnt, "data")
    bh.write(os.path.join(scope, "f"), b"from the config\n")
    name = duet.backup(scope, ext4_fs.mnt)["snapshot"]
    config = tmp_path / "duet.toml"
    config.write_text(f'[task.backup]\ntarget = "{ext4_fs.mnt}"\n')
    assert verify(duet, ext4_fs.mnt)[0] == 0
    proc = duet("verify", "--config", str(config), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["snapshots"][0]["name"] == name, proc.stderr
    proc = duet("snapshots", "--config", str(config), "--json")
    assert [r["name"] for r in json.loads(proc.stdout)["snapshots"]] == [name]
    out = tmp_path / "restored"
    out.mkdir()
    assert duet("restore", "--config", str(config), "f", "--to", str(out)).returncode == 0
    assert (out / "f").read_bytes() == b"from the config\n"
    config.write_text("")
    one_error(duet("verify", "--config", str(config)), 2, "has no target in [task.backup]")


def test_bad_input_is_one_line(duet, tmp_path, ext4_fs):
    one_error(duet("verify", "--target", ext4_fs.mnt), 2, "no snapshots")
    one_error(duet("verify", "--target", str(tmp_path / "nowhere")), 2, "nowhere")
    os.makedirs(os.path.join(ext4_fs.mnt, "snapshots", "2026-01-01T000000Z"))
    one_error(duet("verify", "--target", ext4_fs.mnt, "--snapshot", "2027-01-01T000000Z"), 2, "no snapshot")
    one_error(duet("verify", "--target", ext4_fs.mnt), 2, "has no manifest")


def test_diff_between_snapshots_from_their_manifests(duet, source, ext4_fs):
    scope = os.path.join(source.mnt, "data")
    for rel in ("a", "b", "c", "d/keep"):
        bh.write(os.path.join(scope, rel), rel.encode() * 1000)
    first = duet.backup(scope, ext4_fs.mnt)["snapshot"]
    os.unlink(os.path.join(scope, "a"))
    bh.write(os.path.join(scope, "b"), b"new content")
    os.chmod(os.path.join(scope, "c"), 0o600)                  # same bytes, another mode: metadata only
    bh.write(os.path.join(scope, "e"), b"e" * 3000)
    os.makedirs(os.path.join(scope, "f"))
    os.symlink("../e", os.path.join(scope, "f", "link"))
    second = duet.backup(scope, ext4_fs.mnt)["snapshot"]
    proc = duet("diff", "--target", ext4_fs.mnt, "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert (got["old"], got["new"]) == (first, second)
    assert {k: got[k] for k in ("added", "removed", "modified", "metadata")} == {
        "added": ["e", "f", "f/link"], "removed": ["a"], "modified": ["b"], "metadata": ["c"]}, got
    assert (got["added_bytes"], got["removed_bytes"]) == (3000, 1000)
    text = duet("diff", "--target", ext4_fs.mnt, first, second).stdout.splitlines()
    assert text[:6] == ["- a", "+ e", "+ f", "+ f/link", "M b", "U c"], text
    one_error(duet("diff", "--target", ext4_fs.mnt, first), 2, "give two snapshots")


def test_diff_live_says_what_the_next_backup_would_copy(duet, source, ext4_fs):
    """``duet diff --live``: the newest snapshot against the scope now, walked with the snapshot's exclusions;
    a file with several names is not taken for removed; the next backup then copies exactly what it listed."""
    scope = os.path.join(source.mnt, "data")
    one_error(duet("diff", "--target", ext4_fs.mnt, "--live"), 2, "no snapshot yet")
    for rel in ("a", "b", "c", "d/keep", "linked"):
        bh.write(os.path.join(scope, rel), rel.encode() * 1000)
    os.link(os.path.join(scope, "linked"), os.path.join(scope, "d", "other-name"))
    first = duet.backup(scope, ext4_fs.mnt, "--exclude", "*.tmp")["snapshot"]
    nothing = json.loads(duet("diff", "--target", ext4_fs.mnt, "--live", "--json").stdout)
    assert (nothing["old"], nothing["new"], nothing["live"]) == (first, None, True)
    assert [nothing[k] for k in ("added", "removed", "modified", "metadata")] == [[], [], [], []], nothing
    os.unlink(os.path.join(scope, "a"))
    bh.write(os.path.join(scope, "b"), b"new content")
    os.chmod(os.path.join(scope, "c"), 0o600)
    bh.write(os.path.join(scope, "e"), b"e" * 3000)
    bh.write(os.path.join(scope, "scratch.tmp"), b"excluded when the snapshot was made")
    proc = duet("diff", "--target", ext4_fs.mnt, "--live", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert {k: got[k] for k in ("added", "removed", "modified", "metadata")} == {
        "added": ["e"], "removed": ["a"], "modified": ["b"], "metadata": ["c"]}, got
    assert (got["added_bytes"], got["removed_bytes"], got["modified_bytes"]) == (3000, 1000, 11)
    text = duet("diff", "--target", ext4_fs.mnt, "--live", first).stdout.splitlines()
    assert text[:4] == ["- a", "+ e", "M b", "U c"], text
    assert text[4].startswith(f"{first} -> now: 1 added") and "the next backup reads" in text[4], text
    one_error(duet("diff", "--target", ext4_fs.mnt, "--live", first, first), 2, "give one snapshot")
    # The next backup (same rules) copies what was listed, and nothing else.
    second = duet.backup(scope, ext4_fs.mnt, "--exclude", "*.tmp")
    assert second["items_total"] == 3 and second["counters"]["copied"] == 3, second
    after = json.loads(duet("diff", "--target", ext4_fs.mnt, "--live", "--json").stdout)
    assert [after[k] for k in ("added", "removed", "modified", "metadata")] == [[], [], [], []], after
