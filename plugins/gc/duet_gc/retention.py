"""Snapshot retention for a backup target: which snapshots a ``--keep-*`` policy keeps, and removing the others.

The target layout is the one backup writes (docs/gc.md)::

    TARGET/snapshots/2026-11-26T041500Z/    a published snapshot (a plain tree, or a read-only btrfs subvolume)
    TARGET/.duet/manifests/<name>.json      backup's manifest of that snapshot
    TARGET/.duet/verified/<name>.json       what duet verify found in that snapshot
    TARGET/.duet/trash/                     where gc moves a plain-tree snapshot before removing it

The policy is restic's ``forget`` policy (``internal/restic/snapshot_policy.go``), so users get what they know:
snapshots are sorted newest first; ``last`` keeps the N newest; each calendar rule (hourly, daily, weekly, monthly,
yearly) keeps the newest snapshot of each of its N most recent buckets that hold a snapshot — and, when it still
has buckets to fill after the oldest snapshot, that oldest one too (restic ≥ 0.16), so the history kept is as long
as it can be. A count of -1 means every bucket. ``within`` (restic's ``--keep-within``) keeps every snapshot made
at most that long before the newest one. A snapshot is kept if any rule keeps it. Buckets are computed in
UTC, the time zone of the snapshot names. On top of restic: the newest snapshot is never removed, whatever the
policy, and an empty policy removes nothing.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from duet_core.errors import DuetError
from duet_core.filesystems import BTRFS_SUPER_MAGIC, fs_magic, remove_tree_at
from duet_core.identity import BTRFS_FIRST_FREE_OBJECTID
from duet_core.units import format_duration

NAME_FORMAT = "%Y-%m-%dT%H%M%SZ"
NAME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{6}Z$")

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def _bucket(rule: str, t: datetime, nr: int) -> object:
    """The bucket a snapshot falls in for one rule; ``last`` gives every snapshot its own bucket."""
    if rule == "last":
        return nr
    if rule == "hourly":
        return (t.year, t.month, t.day, t.hour)
    if rule == "daily":
        return (t.year, t.month, t.day)
    if rule == "weekly":
        iso = t.isocalendar()
        return (iso.year, iso.week)
    if rule == "monthly":
        return (t.year, t.month)
    return t.year


@dataclass(frozen=True)
class Policy:
    """How many snapshots (``last``) or buckets each rule keeps; 0 = the rule is off, -1 = unlimited."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: float = 0.0     # seconds: every snapshot made this long or less before the newest one (0: off)

    def __post_init__(self) -> None:
        for rule in RULES:
            if getattr(self, rule) < -1:
                raise DuetError(f"--keep-{rule} {getattr(self, rule)}: use a count ≥ 0, or -1 for all")
        if self.within < 0:
            raise DuetError(f"--keep-within {self.within}: use a duration like 30d")

    @property
    def empty(self) -> bool:
        return not any(getattr(self, rule) for rule in RULES) and not self.within

    def describe(self) -> str:
        rules = [f"--keep-{r} {getattr(self, r)}" for r in RULES if getattr(self, r)]
        if self.within:
            rules.append(f"--keep-within {format_duration(self.within)}")
        return " ".join(rules) or "(no keep rule)"


@dataclass(frozen=True)
class Snapshot:
    name: str
    time: datetime


@dataclass
class Decision:
    """What a policy does to a target's snapshots: ``keep`` (name -> the rules that keep it) and ``remove``."""

    keep: dict[str, list[str]] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)


def parse_name(name: str) -> datetime | None:
    """The UTC time a snapshot name stands for, or None if the name is not a snapshot name."""
    if not NAME_RE.match(name):
        return None
    try:
        return datetime.strptime(name, NAME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def apply_policy(snapshots: Iterable[Snapshot], policy: Policy) -> Decision:
    """Decide which snapshots ``policy`` keeps (restic's algorithm, see the module docstring)."""
    ordered = sorted(snapshots, key=lambda s: s.time, reverse=True)
    out = Decision()
    if policy.empty:
        out.keep = {s.name: ["policy is empty"] for s in ordered}
        return out
    counts = {rule: getattr(policy, rule) for rule in RULES}
    last_bucket: dict[str, object] = {rule: None for rule in RULES}
    since = ordered[0].time - timedelta(seconds=policy.within) if ordered and policy.within else None
    for nr, snap in enumerate(ordered):
        reasons = ["within"] if since is not None and snap.time >= since else []
        for rule in RULES:
            if counts[rule] == 0:
                continue
            bucket = _bucket(rule, snap.time, nr)
            if bucket != last_bucket[rule] or nr == len(ordered) - 1:
                last_bucket[rule] = bucket
                if counts[rule] > 0:
                    counts[rule] -= 1
                reasons.append(rule)
        if nr == 0 and not reasons:
            reasons.append("newest")     # never removed, whatever the policy
        if reasons:
            out.keep[snap.name] = reasons
        else:
            out.remove.append(snap.name)
    return out


# ------------------------------------------------------------------------------------------------- the target
class Target:
    """A backup target: its published snapshots and the trash gc empties them through."""

    def __init__(self, path: str):
        self.path = os.path.realpath(path)
        self.snapshots_dir = os.path.join(self.path, "snapshots")
        self.internal_dir = os.path.join(self.path, ".duet")
        self.trash_dir = os.path.join(self.internal_dir, "trash")
        self.manifests_dir = os.path.join(self.internal_dir, "manifests")
        self.verified_dir = os.path.join(self.internal_dir, "verified")   # duet verify's record of each snapshot
        try:
            st = os.lstat(self.snapshots_dir)
        except FileNotFoundError:
            raise DuetError(f"{path} is not a backup target: it has no snapshots/ directory",
                            hint="give the --target a backup task writes to") from None
        if not stat.S_ISDIR(st.st_mode):
            raise DuetError(f"{self.snapshots_dir} is not a directory")

    def snapshots(self) -> tuple[list[Snapshot], list[str]]:
        """The published snapshots, and the names in snapshots/ gc leaves alone (not a snapshot name, not a
        directory — a symlink is never followed)."""
        found, ignored = [], []
        with os.scandir(self.snapshots_dir) as it:
            for entry in it:
                when = parse_name(entry.name)
                if when is not None and entry.is_dir(follow_symlinks=False):
                    found.append(Snapshot(entry.name, when))
                else:
                    ignored.append(entry.name)
        return found, sorted(ignored)

    def remove(self, name: str) -> None:
        """Remove one published snapshot so that no crash leaves a partial tree under snapshots/.

        A btrfs subvolume goes in one step (``btrfsutil.delete_subvolume``: the name disappears at once, the
        cleaner frees its extents later). A plain tree is first renamed into ``.duet/trash/`` — an atomic step,
        made durable with an fsync of snapshots/ — and then removed there; :meth:`empty_trash` finishes what a
        crash interrupted. Its manifest (and ``duet verify``'s record of it) go once the snapshot is gone.
        """
        if parse_name(name) is None:
            raise DuetError(f"refusing to remove {name!r}: not a snapshot name")
        path = os.path.join(self.snapshots_dir, name)
        if _is_subvolume(path):
            import btrfsutil

            btrfsutil.delete_subvolume(path)
            _fsync_dir(self.snapshots_dir)
        else:
            self._ensure_trash()
            os.rename(path, os.path.join(self.trash_dir, name))
            _fsync_dir(self.snapshots_dir)
            _fsync_dir(self.trash_dir)
        for records in (self.manifests_dir, self.verified_dir):
            try:
                os.unlink(os.path.join(records, name + ".json"))
            except (FileNotFoundError, NotADirectoryError):
                continue
            _fsync_dir(records)
        self.empty_trash()

    def empty_trash(self) -> int:
        """Remove every tree in ``.duet/trash/`` (left by this or an interrupted run); returns how many."""
        try:
            names = os.listdir(self.trash_dir)
        except FileNotFoundError:
            return 0
        trash_fd = os.open(self.trash_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            dev = os.fstat(trash_fd).st_dev
            for name in names:
                remove_tree_at(trash_fd, name, dev)
            os.fsync(trash_fd)
        finally:
            os.close(trash_fd)
        return len(names)

    def _ensure_trash(self) -> None:
        for d in (self.internal_dir, self.trash_dir):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode):
                raise DuetError(f"{d} is not a directory (a symlink?): refusing to use it as gc's trash")
        if os.lstat(self.trash_dir).st_dev != os.lstat(self.snapshots_dir).st_dev:
            raise DuetError(f"{self.trash_dir} is on another filesystem than {self.snapshots_dir}",
                            hint="gc renames a snapshot into the trash, which needs one filesystem")


def _is_subvolume(path: str) -> bool:
    """Whether ``path`` (not followed if a symlink) is the root of a btrfs subvolume."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_ino != BTRFS_FIRST_FREE_OBJECTID:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return fs_magic(fd) == BTRFS_SUPER_MAGIC
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- running
@dataclass
class RetentionReport:
    """What one retention pass did (or, dry run, would do)."""

    target: str
    policy: str
    pruned: bool
    keep: dict[str, list[str]]
    remove: list[str]
    removed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    trash_emptied: int = 0

    def as_dict(self) -> dict:
        return {"target": self.target, "policy": self.policy, "prune": self.pruned, "keep": self.keep,
                "remove": self.remove, "removed": self.removed, "ignored": self.ignored, "errors": self.errors,
                "trash_emptied": self.trash_emptied}


def run_retention(target: str, policy: Policy, prune: bool,
                  say: Callable[[str], None] = lambda line: None) -> RetentionReport:
    """Apply ``policy`` to ``target``: list what goes; with ``prune``, remove it (newest first kept, oldest first
    removed, one snapshot at a time, so an interrupted prune leaves only whole snapshots)."""
    t = Target(target)
    snaps, ignored = t.snapshots()
    decision = apply_policy(snaps, policy)
    rep = RetentionReport(t.path, policy.describe(), prune, decision.keep, decision.remove, ignored=ignored)
    if not prune:
        for name in decision.remove:
            say(f"would remove snapshot {name} (dry run: add --prune to remove)")
        return rep
    rep.trash_emptied = t.empty_trash()
    for name in reversed(decision.remove):       # oldest first
        try:
            t.remove(name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:    # gone meanwhile (another gc on the same target)
                continue
            rep.errors.append(f"{name}: {exc.strerror or exc}")
            say(f"cannot remove snapshot {name}: {exc.strerror or exc}")
            continue
        except DuetError as exc:
            rep.errors.append(f"{name}: {exc}")
            say(f"cannot remove snapshot {name}: {exc}")
            continue
        rep.removed.append(name)
        say(f"removed snapshot {name}")
    return rep
