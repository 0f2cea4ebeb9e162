"""Helpers for the reliability tests of the four built-in plugins (tests/test_reliability_plugins_*.py).

:func:`make_source` writes one small data set that gives every plugin work: files of several sizes in nested
directories (backup, scrub), same-content twins in different directories (gc's dedupe), files written in
interleaved fsynced chunks so they are fragmented (defrag), a 0600 file and a 0700 directory owned by another user
(backup must keep both theirs and private), a hard link, symlinks (one pointing out of the scope), an empty
directory. :func:`exact_snapshots` checks every published snapshot of a target against the source with rsync
(``-aHAX -c --delete -n``) and for leftovers of killed runs.
"""

from __future__ import annotations

import os
import random
import re

import backup_helpers as bh

OTHER_UID, OTHER_GID = 4321, 8765
TWINS = 6
# Names a killed run could leave behind if it ever published them: backup's copies under temporary names, and
# write_atomic's temporary manifests.
DEBRIS = re.compile(r"(^\.duet-tmp|\.tmp\.\d+$)")


def make_source(root: str, rng: random.Random, name: str = "data") -> str:
    """The data set described in the module docstring under ``root/name`` (about 4 MiB), written, fsynced and
    evicted from the page cache; returns its path."""
    scope = os.path.join(root, name)
    for i in range(24):
        bh.write(os.path.join(scope, f"d{i % 3}", f"sub{i % 2}", f"f{i:02d}"), rng.randbytes(16_384 + 9_973 * i))
    for i in range(TWINS):
        data = rng.randbytes(96 << 10)
        bh.write(os.path.join(scope, "twins", "a", f"t{i}"), data)
        bh.write(os.path.join(scope, "twins", "b", f"t{i}"), data)
    frag = [os.path.join(scope, "frag", f"g{i}") for i in range(3)]
    os.makedirs(os.path.dirname(frag[0]))
    handles = [open(p, "wb") for p in frag]
    try:
        for _ in range(24):                  # interleaved, fsynced 16 KiB chunks: many extents per file
            for fh in handles:
                fh.write(rng.randbytes(16 << 10))
                fh.flush()
                os.fsync(fh.fileno())
    finally:
        for fh in handles:
            fh.close()
    private_dir = os.path.join(scope, "home", "other")
    bh.write(os.path.join(private_dir, "secret"), b"another user's 0600 file\n")
    os.chown(os.path.join(private_dir, "secret"), OTHER_UID, OTHER_GID)
    os.chmod(os.path.join(private_dir, "secret"), 0o600)
    os.chown(private_dir, OTHER_UID, OTHER_GID)
    os.chmod(private_dir, 0o700)
    os.link(os.path.join(scope, "d0", "sub0", "f00"), os.path.join(scope, "d1", "hardlink"))
    os.symlink("../d0/sub0/f00", os.path.join(scope, "d2", "rel-link"))
    os.symlink("/etc/passwd", os.path.join(scope, "out-link"))
    os.makedirs(os.path.join(scope, "empty"))
    bh.evict_regular(scope)
    return scope


def snapshot_dirs(target: str) -> list[str]:
    try:
        return [os.path.join(target, "snapshots", n) for n in bh.snapshot_names(target)]
    except FileNotFoundError:
        return []


def debris_in(tree: str) -> list[str]:
    """Names under ``tree`` that look like a killed run's temporary files."""
    found = []
    for dirpath, dirs, files in os.walk(tree):
        found += [os.path.join(dirpath, n) for n in dirs + files if DEBRIS.search(n)]
    return found


def exact_snapshots(source: str, target: str, why: str, seen: set[str] | None = None) -> list[str]:
    """Every published snapshot of ``target`` (or only those not in ``seen``, which is updated) is exactly
    ``source``: rsync finds nothing to do, no temporary name is in it, and its manifest exists. Returns the
    snapshot directories."""
    snaps = snapshot_dirs(target)
    for snap in snaps:
        if seen is not None and snap in seen:
            continue
        diff = bh.rsync_diff(source, snap)
        assert diff == [], f"{why}: snapshot {snap} differs from the source: {diff[:10]}"
        assert debris_in(snap) == [], f"{why}: temporary files published in {snap}"
        assert os.path.exists(os.path.join(target, ".duet", "manifests", os.path.basename(snap) + ".json")), why
        if seen is not None:
            seen.add(snap)
    return snaps
