"""``duet diff --live``: what changed in the scope since a snapshot — what the next backup would copy.

The question ``rsync -n``, ``borg create --dry-run --list`` and ``git status`` answer. The scope is walked as a run
walks it (:class:`~duet_core.scope.Scope`: never through a symlink), with the exclusions and ``-x`` the snapshot was
made with (its manifest records them), and each regular file's version is compared with the manifest's:

* ``+`` added: the snapshot has no file of that name;
* ``M`` modified: another inode, size or mtime — the next backup reads and copies it;
* ``U`` metadata: the same inode, size and mtime, another ctime (chmod, chown, xattrs, ACLs) — the next backup reads
  and hashes it, and copies it only if the contents differ (always on an ext4 target: docs/backup.md);
* ``-`` removed: a file of the snapshot that is no longer in the scope (deleted, renamed, or now excluded).

Regular files only; nothing but metadata is read, and nothing is written.
"""

from __future__ import annotations

import os
import stat

from duet_core.errors import DuetError
from duet_core.exclude import NOTHING, Exclusions
from duet_core.identity import DevMap, open_beneath
from duet_core.scope import Scope


def live_changes(manifest: dict) -> dict:
    """``added``, ``removed``, ``modified``, ``metadata`` (sorted relpaths) of the scope now against ``manifest``, with
    ``added_bytes``, ``modified_bytes``, ``metadata_bytes`` (their sizes now) and ``removed_bytes``."""
    root = manifest.get("scope")
    if not root or not os.path.isdir(root):
        raise DuetError(f"the snapshot's scope {root} is not a directory here: nothing to compare it with")
    if os.path.realpath(root) != root:
        raise DuetError(f"the snapshot's scope {root} now leads elsewhere ({os.path.realpath(root)}) through a "
                        "symlink: not compared")
    exclude = Exclusions.from_record(manifest["exclude"]) if manifest.get("exclude") else NOTHING
    one_fs = bool(manifest.get("one_file_system"))
    published = manifest.get("files", {})
    out: dict = {"added": [], "modified": [], "metadata": [], "removed": []}
    sizes = {"added": 0, "modified": 0, "metadata": 0, "removed": 0}
    seen = set()
    for f in Scope(root, one_file_system=one_fs, exclude=exclude).scan():
        seen.add(f.relpath)
        rec = published.get(f.relpath)
        want = [f.fid.ino, f.size, f.mtime_ns]
        if rec is not None and rec[:4] == [*want, f.ctime_ns]:
            continue
        kind = "added" if rec is None else "metadata" if rec[:3] == want else "modified"
        out[kind].append(f.relpath)
        sizes[kind] += f.size
    gone = sorted(rel for rel in published if rel not in seen)
    if gone:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            here = _Here(fd, exclude, one_fs)
            for rel in gone:
                if not here(rel):
                    out["removed"].append(rel)
                    sizes["removed"] += published[rel][1]
        finally:
            os.close(fd)
    for names in out.values():
        names.sort()
    return {**out, **{f"{k}_bytes": v for k, v in sizes.items()}}


class _Here:
    """Whether a name of the manifest that the scan did not list is still a regular file of the scope: the scan
    lists a file with several hard links once, under one name; the others are still there. As a run would see it:
    not excluded, and with ``-x`` on the root's filesystem. Looked up below the root without following symlinks."""

    def __init__(self, root: int, exclude: Exclusions, one_file_system: bool):
        self.root, self.exclude = root, exclude
        self.devmap = DevMap() if one_file_system else None
        self.root_dev = self.devmap.info(os.fstat(root).st_dev, root).dev if self.devmap else 0

    def __call__(self, rel: str) -> bool:
        if self.exclude.excluded_path(rel, False):
            return False
        parent, _, name = rel.rpartition("/")
        try:
            fd = open_beneath(self.root, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            return stat.S_ISREG(st.st_mode) and (
                self.devmap is None or self.devmap.info(st.st_dev, name, fd).dev == self.root_dev)
        except OSError:
            return False
        finally:
            os.close(fd)

