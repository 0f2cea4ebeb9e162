"""``duet snapshots`` and ``duet restore``: added to ``duet`` through the entry-point group ``duet.commands``.

A snapshot is a plain directory tree, so ``cp -a`` or ``rsync -aHAX`` from ``TARGET/snapshots/<name>/`` restores
too; ``duet restore`` adds the newest-snapshot default, refuses to overwrite, and restores exactly what a backup
copies (holes, owner, mode, xattrs and ACLs, ns times, symlinks as links, hard links inside what is restored)
without following any symlink in the snapshot or at the destination.
"""

from __future__ import annotations

import errno
import os
import stat
import time

import typer

from duet_core.errors import DuetError, printable

TARGET_HELP = "The backup target (default: target in the config's [task.backup])."
CONFIG_HELP = "Config file for the default target (default /etc/duet/duet.toml)."


def target_of(given: str | None, config_path: str | None) -> str:
    """``--target``, else the ``target`` of the config's ``[task.backup]`` (what ``duet run backup`` uses)."""
    if given:
        return given
    from duet_core.config import DEFAULT_PATH, load_config

    target = load_config(config_path).options_for("backup").get("target")
    if not target:
        raise DuetError(f"no --target given, and {config_path or DEFAULT_PATH} has no target in [task.backup]",
                        hint="duet ... --target /mnt/backup")
    if not isinstance(target, str):
        raise DuetError(f"{config_path or DEFAULT_PATH}: task.backup.target: expected a path, got {target!r}")
    return target


def _manifests(t, have: list[str], names: list[str]) -> dict[str, dict]:
    """The manifests of the snapshots ``names`` (of ``have``, the target's): one line and exit 2 for a snapshot
    that is not there or has no manifest (verify and diff work from it)."""
    out = {}
    for name in names:
        if name not in have:
            raise DuetError(f"no snapshot {name} in {t.path}", hint="see duet snapshots --target")
        out[name] = t.manifest(name)
        if out[name] is None:
            raise DuetError(f"snapshot {name} has no manifest: there is nothing to check it against")
    return out


def _say(line: str) -> None:
    """One line of output: a name with a newline or bytes that are not UTF-8 stays on one line, escaped."""
    print(printable(line))


def snapshots(
    target: str = typer.Option(None, "--target", "-t", help=TARGET_HELP),
    json_out: bool = typer.Option(False, "--json", help="One JSON object."),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """List the snapshots at a backup target, oldest first: name, files, bytes, what changed since the snapshot
    before (files added or with new contents, and their bytes), when duet verify last checked each.

    Examples:
      duet snapshots --target /mnt/backup
      duet snapshots --target /mnt/backup --json | jq -r '.snapshots[-1].name'
    """
    from duet_backup.target import Target
    from duet_core.cli.output import console, emit_json

    t = Target(target_of(target, config), create=False)
    try:
        rows = []
        before = None
        for name in t.snapshot_names():
            m = t.manifest(name) or {}
            new = None
            if before is not None and "files" in m and before.get("scope") == m.get("scope"):
                new = _new_data(before["files"], m["files"])
            rows.append({"name": name, "path": os.path.join(t.path, "snapshots", name), "kind": m.get("kind"),
                         "scope": m.get("scope"), "created": m.get("created"),
                         "files": len(m["files"]) if "files" in m else None, "bytes": m.get("bytes"),
                         "new": new,
                         "changed_during_backup": len(m.get("changed_during_backup", [])),
                         "errors": len(m.get("errors", [])), "verified": t.verified(name)})
            before = m if "files" in m else None
    finally:
        t.close()
    if json_out:
        emit_json({"target": t.path, "snapshots": rows})
        return
    from rich.table import Table

    from duet_core import units

    table = Table(title=f"snapshots at {t.path}", title_justify="left")
    for col in ("snapshot", "kind", "files", "size", "new", "scope", "verified"):
        # The scope gives way to the rest on a narrow screen; a snapshot's name is never cut.
        table.add_column(col, justify="right" if col in ("files", "size", "new") else "left",
                         no_wrap=col != "scope", overflow="fold" if col == "scope" else "ellipsis")
    for r in rows:
        v = r["verified"]
        checked = "never" if not v else f"{str(v.get('verified', '?'))[:10]} " + (f"{v['problems']} bad"
                                                                                  if v.get("problems") else "ok")
        new = "–" if r["new"] is None else f"{r['new']['files']} / {units.format_bytes(r['new']['bytes'])}"
        table.add_row(r["name"], r["kind"] or "?", "?" if r["files"] is None else str(r["files"]),
                      "?" if r["bytes"] is None else units.format_bytes(r["bytes"]), new, r["scope"] or "?",
                      checked)
    console.print(table if rows else f"no snapshots at {t.path}")


def restore(
    paths: list[str] = typer.Argument(..., help="What to restore: paths inside the snapshot (relative, or absolute "
                                               "under the backed-up scope); '.' for everything."),
    to: str = typer.Option(..., "--to", help="Existing directory to restore into (each PATH as DEST/<its name>)."),
    target: str = typer.Option(None, "--target", "-t", help=TARGET_HELP),
    snapshot: str = typer.Option(None, "--snapshot", "-s", help="Snapshot name (default: the newest)."),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Restore files or directories from a snapshot, exactly as they were backed up.

    Each PATH goes to DEST/<its last component> ('.' restores the snapshot's contents into DEST); nothing existing
    is overwritten. Exit 2 for a bad target, snapshot or path.

    Examples:
      duet restore --target /mnt/backup alice/thesis --to /tmp/restored
      duet restore --target /mnt/backup --snapshot 2026-11-26T041500Z /home/alice/.bashrc --to /tmp
    """
    from duet_backup.fsops import copy_file
    from duet_backup.target import Target, in_tree
    from duet_backup.tree import TreeSync

    dest_real = os.path.realpath(to)
    t = Target(target_of(target, config), create=False)
    try:
        names = t.snapshot_names()
        if not names:
            raise DuetError(f"no snapshots at {t.path}")
        if os.path.isdir(dest_real) and in_tree(dest_real, t.path):
            # Into a snapshot (a hard-link tree shares its files with the others), or a tree restored into the
            # very snapshot it is read from, growing while it is walked.
            raise DuetError(f"--to {to} is inside the backup target {t.path}",
                            hint="restore to a directory outside the target")
        name = snapshot or names[-1]
        scope = (t.manifest(name) or {}).get("scope")
        snap = t.open_snapshot(name)
    finally:
        t.close()
    try:
        dest = os.open(dest_real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        os.close(snap)
        raise DuetError(f"--to {to}: {exc.strerror}", hint="give an existing directory") from None
    try:
        for path in paths:
            rel = _relative(path, scope)
            src = _open_restorable(snap, rel, path, name)
            try:
                out_name = os.path.basename(rel)
                if stat.S_ISDIR(os.fstat(src).st_mode):
                    if not out_name:
                        _refuse_not_empty(dest, path)   # the whole snapshot goes into --to itself
                    out = dest if not out_name else _new_dir(dest, out_name, path)
                    try:
                        result = TreeSync(src, out).run()
                    finally:
                        if out != dest:
                            os.close(out)
                    if result.errors:
                        raise DuetError(f"restoring {path}: {len(result.errors)} error(s), first: {result.errors[0]}")
                else:
                    _refuse_existing(dest, out_name, path)
                    copy_file(src, dest, out_name)
            finally:
                os.close(src)
            line = f"restored {path} from {name} to {os.path.join(dest_real, os.path.basename(rel))}"
            _say(line)
    finally:
        os.close(dest)
        os.close(snap)


def _open_restorable(snap: int, rel: str, shown: str, name: str) -> int:
    """Open ``rel`` in the snapshot for reading if it is a directory or a regular file — never anything else: a
    fifo there (the backup recreates the source's fifos) would block the open forever, and a device node would be
    opened as data. Restore the directory holding a symlink, fifo, socket or device to get it back."""
    from duet_core.identity import open_beneath
    from duet_core.scope import open_regular

    try:
        try:
            return open_beneath(snap, rel or ".", os.O_RDONLY | os.O_DIRECTORY)
        except NotADirectoryError:
            return open_regular(snap, rel)
    except OSError as exc:
        if exc.errno == errno.EINVAL:   # open_regular: neither a directory nor a regular file
            raise DuetError(f"{shown}: not a file or directory in snapshot {name} ({exc.strerror})",
                            hint="restore the directory that holds it") from None
        raise DuetError(f"{shown}: not in snapshot {name} ({exc.strerror})") from None


def _relative(path: str, scope: str | None) -> str:
    """A path inside the snapshot: relative as given, or absolute under the backed-up scope."""
    if os.path.isabs(path):
        if not scope or not (path == scope or path.startswith(scope.rstrip("/") + "/")):
            raise DuetError(f"{path} is not under the backed-up scope {scope}",
                            hint="give a path relative to the snapshot, or one under the scope")
        path = os.path.relpath(path, scope)
    path = os.path.normpath(path)
    if path.startswith(".."):
        raise DuetError(f"{path}: leaves the snapshot")
    return "" if path == "." else path


def _refuse_existing(dest: int, name: str, shown: str) -> None:
    try:
        os.stat(name, dir_fd=dest, follow_symlinks=False)
    except FileNotFoundError:
        return
    raise DuetError(f"{shown}: {name} already exists in the destination", hint="restore into an empty directory")


def _refuse_not_empty(dest: int, shown: str) -> None:
    """Restoring a whole snapshot fills --to itself, mirroring the snapshot: what is there already would be
    replaced or removed, so --to must be empty."""
    with os.scandir(dest) as it:
        first = next(it, None)
    if first is not None:
        raise DuetError(f"{shown}: {first.name} already exists in the destination",
                        hint="restore a whole snapshot into an empty directory")


def _new_dir(dest: int, name: str, shown: str) -> int:
    from duet_core.identity import open_beneath

    _refuse_existing(dest, name, shown)
    os.mkdir(name, 0o700, dir_fd=dest)
    return open_beneath(dest, name, os.O_RDONLY | os.O_DIRECTORY)


def verify(
    target: str = typer.Option(None, "--target", "-t", help=TARGET_HELP),
    snapshot: list[str] = typer.Option([], "--snapshot", "-s", help="Snapshot to check (repeatable; default: the "
                                                                    "newest)."),
    every: bool = typer.Option(False, "--all", help="Check every snapshot."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object; damaged files under \"corrupt\"."),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Read snapshots back and check every file against the blake3 its backup recorded (bit rot on the backup disk,
    files changed, missing or added by hand). Exit 0: all as backed up; 6: damage found, each file named; 2: bad
    target or snapshot.

    Examples:
      duet verify --target /mnt/backup
      duet verify --target /mnt/backup --all --json | jq '.corrupt'
      duet verify --config /etc/duet/duet.toml      # the target of its [task.backup], as from cron
    """
    from duet_backup.target import Target
    from duet_backup.verify import check_snapshot
    from duet_core.cli.output import emit_json, is_tty, note

    t = Target(target_of(target, config), create=False)
    try:
        names = t.snapshot_names()
        if not names:
            raise DuetError(f"no snapshots at {t.path}")
        chosen = names if every else (list(dict.fromkeys(snapshot)) or names[-1:])
        manifests = _manifests(t, names, chosen)
        total = sum(rec[1] for m in manifests.values() for rec in m.get("files", {}).values())
        hashed: dict = {}
        results = []
        with _bytes_progress(total, is_tty() and not json_out) as advance:
            for name in chosen:
                snap = t.open_snapshot(name)
                try:
                    results.append(check_snapshot(name, snap, manifests[name], hashed, advance))
                finally:
                    os.close(snap)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for r in results:
            try:
                t.record_verified(r.name, {"verified": when, "files": r.files, "bytes": r.bytes,
                                           "problems": len(r.problems)})
            except OSError as exc:   # a target mounted read-only: checked all the same, not recorded
                note(f"the result for {r.name} is not recorded in the target: {exc.strerror or exc}")
                break
    finally:
        t.close()
    corrupt = [{"snapshot": r.name, "path": os.path.join(t.path, "snapshots", r.name, rel), "problem": why}
               for r in results for rel, why in sorted(r.problems.items())]
    if json_out:
        emit_json({"target": t.path, "snapshots": [{"name": r.name, "files": r.files, "bytes": r.bytes,
                                                    "problems": len(r.problems)} for r in results],
                   "corrupt": corrupt})
    else:
        from duet_core import units

        lines = [f"CORRUPT {c['path']}: {c['problem']}" for c in corrupt]   # one line each, never wrapped
        lines += [f"{r.name}: {r.files} file(s), {units.format_bytes(r.bytes)} read back, "
                  f"{len(r.problems) or 'no'} problem(s)" for r in results]
        for line in lines:
            _say(line)
    raise typer.Exit(6 if corrupt else 0)


class _bytes_progress:
    """A rich progress bar over bytes on a terminal; ``advance(n)`` either way."""

    def __init__(self, total: int, show: bool):
        self.total, self.show, self._bar = total, show, None

    def __enter__(self):
        if not self.show:
            return lambda n: None
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        from duet_core.cli.output import console

        self._bar = Progress("verifying", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                             console=console, transient=True)
        self._bar.__enter__()
        task = self._bar.add_task("verify", total=self.total)
        return lambda n: self._bar.update(task, advance=n)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)


def diff(
    names: list[str] = typer.Argument(None, help="Two snapshots, older first (default: the two newest); with "
                                                 "--live, one (default: the newest)."),
    target: str = typer.Option(None, "--target", "-t", help=TARGET_HELP),
    live: bool = typer.Option(False, "--live", help="Compare the snapshot with the scope as it is now: what the "
                                                    "next backup would copy (regular files)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object: added, removed, modified, metadata."),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """What changed between two snapshots, from their manifests (nothing is read): + added, - removed, M content
    changed, U same content with other times or owner/mode (a new ctime). Directories, symlinks and special files
    show as added or removed. With --live: between a snapshot and the scope now (the scope is walked with the
    snapshot's exclusions; M is another size, mtime or inode; regular files only).

    Examples:
      duet diff --target /mnt/backup                        # the newest snapshot against the one before
      duet diff --target /mnt/backup 2026-11-20T023000Z 2026-11-27T023000Z --json
      duet diff --target /mnt/backup --live                 # what tonight's backup would copy
    """
    from duet_backup.target import Target

    t = Target(target_of(target, config), create=False)
    try:
        have = t.snapshot_names()
        if live:
            if names and len(names) != 1:
                raise DuetError("with --live, give one snapshot, or none for the newest")
            old, new = (names[0] if names else (have[-1] if have else None)), None
            if old is None:
                raise DuetError(f"{t.path} has no snapshot yet: the next backup copies everything")
            manifests = _manifests(t, have, [old])
        else:
            if names and len(names) != 2:
                raise DuetError("give two snapshots (older first), or none for the two newest")
            old, new = names or (have[-2:] if len(have) >= 2 else (None, None))
            if old is None:
                raise DuetError(f"{t.path} has {len(have)} snapshot(s): a diff needs two")
            manifests = _manifests(t, have, [old, new])
    finally:
        t.close()
    if live:
        from duet_backup.live import live_changes

        changes = live_changes(manifests[old])
        _report_diff(t.path, old, None, changes, json_out)
        return
    _report_diff(t.path, old, new, manifest_changes(manifests[old], manifests[new]), json_out)


def _other_content(ra: list, rb: list) -> bool:
    """Two manifest records of a regular file hold other contents: another size, or another blake3."""
    return ra[1] != rb[1] or ra[4:5] != rb[4:5]


def _new_data(fa: dict, fb: dict) -> dict:
    """Regular files of ``fb`` added or with other contents (size, blake3) since ``fa``, their bytes, and the files
    of ``fa`` gone: what ``duet snapshots`` shows as new (counts only: one pass, no lists, for large manifests)."""
    files = nbytes = 0
    for rel, rb in fb.items():
        ra = fa.get(rel)
        if ra is None or _other_content(ra, rb):
            files += 1
            nbytes += rb[1]
    return {"files": files, "bytes": nbytes, "removed": sum(1 for rel in fa if rel not in fb)}


def manifest_changes(a: dict, b: dict) -> dict:
    """What changed from the snapshot of manifest ``a`` to that of ``b``: ``added``, ``removed``, ``modified`` (a
    regular file's size or blake3), ``metadata`` (the same content, another version), sorted; ``added_bytes``,
    ``modified_bytes`` (sizes in ``b``) and ``removed_bytes``."""
    fa, fb = a.get("files", {}), b.get("files", {})
    ea, eb = a.get("entries", {}), b.get("entries", {})
    changes = {"added": sorted((set(fb) - set(fa)) | (set(eb) - set(ea) - {""})),
               "removed": sorted((set(fa) - set(fb)) | (set(ea) - set(eb) - {""})),
               "modified": [], "metadata": []}
    for rel in sorted(set(fa) & set(fb)):
        ra, rb = fa[rel], fb[rel]
        if _other_content(ra, rb):
            changes["modified"].append(rel)
        elif ra[2:4] != rb[2:4]:
            changes["metadata"].append(rel)
    changes["added_bytes"] = sum(fb[r][1] for r in changes["added"] if r in fb)
    changes["modified_bytes"] = sum(fb[r][1] for r in changes["modified"])
    changes["removed_bytes"] = sum(fa[r][1] for r in changes["removed"] if r in fa)
    return changes


def _report_diff(target: str, old: str, new: str | None, changes: dict, json_out: bool) -> None:
    """``duet diff``'s output: a line per path (``+ - M U``) and a summary, or one JSON object. ``new`` None: the
    scope as it is now (``--live``)."""
    if json_out:
        from duet_core.cli.output import emit_json

        emit_json({"target": target, "old": old, "new": new, "live": new is None, **changes})
        return
    from duet_core import units

    lines = [f"{mark} {rel}" for key, mark in (("removed", "-"), ("added", "+"), ("modified", "M"),
                                                ("metadata", "U")) for rel in changes[key]]
    summary = (f"{old} -> {new or 'now'}: {len(changes['added'])} added "
               f"({units.format_bytes(changes['added_bytes'])}), {len(changes['removed'])} removed "
               f"({units.format_bytes(changes['removed_bytes'])}), {len(changes['modified'])} modified, "
               f"{len(changes['metadata'])} with other metadata")
    if new is None:
        read = sum(changes[f"{k}_bytes"] for k in ("added", "modified", "metadata"))
        summary += f"; the next backup reads {units.format_bytes(read)}"
    lines.append(summary)
    for line in lines:
        _say(line)
