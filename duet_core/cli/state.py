"""``duet state reset``: the way out when the state database is damaged or a scope should start afresh.

Nothing is deleted silently. ``--all`` renames the database (and its write-ahead log) to
``state.db.<YYYY-MM-DDTHHMMSSZ>`` beside it, without opening it, so it works on a damaged file; ``--path`` keeps a
copy of the whole database under that name, then forgets the one scope. Both refuse while a run holds a scope
they would change (exit 4).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import sys
from collections.abc import Iterator

import typer

from duet_core.cli.output import note
from duet_core.cli.run import state_dir
from duet_core.config import load_config
from duet_core.errors import DuetError
from duet_core.lock import ScopeBusy, ScopeLock
from duet_core.state import DB_COMPANIONS, DB_NAME, StateStore, aside_name, move_aside

app = typer.Typer(help="The state database: reset it when it is damaged or a scope should start afresh.\n\n"
                       "Examples:\n  duet state reset --all --yes\n  duet state reset --path /home",
                  no_args_is_help=True)


@contextlib.contextmanager
def _every_scope_locked(directory: str) -> Iterator[None]:
    """Hold the lock of every scope that has one, or raise :class:`ScopeBusy` naming a run that holds one."""
    fds = []
    try:
        for path in sorted(glob.glob(os.path.join(directory, "locks", "*.lock"))):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                raise DuetError(f"cannot open lock file {path}: {exc.strerror}") from None
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").split("\n")
                who = f"pid {holder[0]}" if holder[0] else "another process"
                scope = holder[1] if len(holder) > 1 and holder[1] else "a scope"
                raise ScopeBusy(f"a duet run ({who}) is working on {scope}",
                                hint="wait for it to finish, or stop it, before resetting the state") from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _confirm(what: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise DuetError(f"not confirmed: {what}", hint="add --yes")
    if not typer.confirm(f"{what}?"):
        raise DuetError("nothing was changed")


def reset(
    path: str = typer.Option(None, "--path", "-p", help="Forget this scope only (its files, progress, runs)."),
    everything: bool = typer.Option(False, "--all", help="Move the whole database aside (works when it is damaged)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
    config_path: str = typer.Option(None, "--config", help="Config file (for its state_dir)."),
    state_dir_opt: str = typer.Option(None, "--state-dir", help="State directory (default /var/lib/duet)."),
) -> None:
    """Start afresh: the next run scans and processes everything again. The old database is kept, renamed.

    Examples:
      duet state reset --all --yes                # the database is damaged: move it aside
      duet state reset --path /home               # forget one scope (a copy of the database is kept)
    """
    if bool(path) == everything:
        raise DuetError("say what to reset: --path P (one scope) or --all (the whole database)")
    directory = os.path.abspath(state_dir(state_dir_opt, load_config(config_path)))
    db = os.path.join(directory, DB_NAME)
    if not any(os.path.lexists(db + c) for c in ("", *DB_COMPANIONS)):
        raise DuetError(f"no duet state in {directory}: nothing to reset")
    if everything:
        _confirm(f"move {db} aside and start afresh", yes)
        with _every_scope_locked(directory):
            moved = move_aside(directory)
        note(f"moved {db} aside to {moved}; the next run starts afresh")
        return
    root = os.path.realpath(path)
    with ScopeLock(directory, root):
        store = StateStore(directory)
        try:
            if not any(r == root for _, r in store.scopes()):
                raise DuetError(f"no duet run has covered {path}: nothing to reset")
            _confirm(f"forget everything duet recorded about {root}", yes)
            copy = aside_name(directory)
            store.copy_to(copy)
            store.forget_scope(root)
        finally:
            store.close()
    note(f"forgot {root} (a copy of the database before is {copy}); the next run there starts afresh")


app.command("reset")(reset)
