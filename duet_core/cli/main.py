"""The ``duet`` command. Command functions parse and delegate; :class:`DuetError` becomes one line here only."""

from __future__ import annotations

import os
import sqlite3
import sys
from importlib.metadata import entry_points

import typer

from duet_core import __version__
from duet_core.cli import bench, demo, doctor, events, install_units, logs, plugins, run, state, status
from duet_core.errors import DuetError, printable

app = typer.Typer(
    name="duet",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
app.command("doctor")(doctor.doctor)
app.command("events")(events.events)
app.command("demo")(demo.demo)
app.add_typer(bench.app, name="bench")
app.command("run", context_settings=run.EXTRA)(run.run)
app.command("watch", context_settings=run.EXTRA)(run.watch)
app.command("status")(status.status)
app.add_typer(plugins.app, name="plugins")
app.command("install-units")(install_units.install_units)
app.add_typer(state.app, name="state")


def _version(value: bool) -> None:
    if value:
        print(f"duet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="More log lines: -v one line per run and notable event, -vv debug."),
    log_format: str = typer.Option("text", "--log-format", envvar="DUET_LOG_FORMAT",
                                   help="Log lines as text (journald priorities under systemd) or json."),
) -> None:
    """Page-cache-aware storage maintenance: backup, scrub, defrag and gc that process cached data first.

    Examples:
      duet doctor
      duet run backup --path /home --target /mnt/backup
      duet -v --log-format json run --config /etc/duet/duet.toml --quiet
    """
    if log_format not in logs.FORMATS:
        raise DuetError(f"bad --log-format {log_format!r}", hint="text or json")
    logs.setup(verbose, log_format)


def _working_directory_off_path() -> None:
    """Plugins come from installed distributions only. ``python -m`` puts the working directory first on sys.path,
    and duet runs as root in directories others write (a scope): a ``duet_*.py`` or a ``*.dist-info`` planted
    there must not be imported or found as an entry point."""
    try:
        cwd = os.getcwd()
    except OSError:   # deleted meanwhile
        cwd = None
    sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]


COMMANDS_GROUP = "duet.commands"


def add_plugin_commands(target: typer.Typer, group: str = COMMANDS_GROUP) -> list[str]:
    """Add the sub-commands installed packages publish under the entry-point group ``duet.commands``.

    An entry point's name is the command's name; it loads a ``typer.Typer`` (added as a command group) or a function
    (added as one command). This is how a plugin brings its own commands (``duet restore`` from the backup
    package) without the core importing it. One that fails to load, is neither, or would shadow an existing command
    is reported in one line on stderr and skipped. Returns the names added.
    """
    taken = {c.name for c in target.registered_commands} | {g.name for g in target.registered_groups}
    added = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            if ep.name in taken:
                raise ValueError(f"a command named {ep.name!r} already exists")
            obj = ep.load()
            if isinstance(obj, typer.Typer):
                target.add_typer(obj, name=ep.name)
            elif callable(obj):
                target.command(ep.name)(obj)
            else:
                raise TypeError(f"{ep.value} is {type(obj).__name__}, not a typer.Typer or a function")
        except Exception as exc:  # noqa: BLE001 - a broken plugin command is that plugin's, reported and skipped
            print(f"duet: command {ep.name} ({ep.value}) is broken and was skipped: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            continue
        taken.add(ep.name)
        added.append(ep.name)
    return added


def main() -> None:
    """Entry point: typer reports usage errors itself (exit 2); a DuetError becomes one line and its exit code.

    A state database that turns out damaged in the middle of its use (SQLite checks pages as it reads them) is an
    expected failure too: one line, exit 2, and the way out.
    """
    _working_directory_off_path()
    add_plugin_commands(app)   # after the working directory is off the path: installed packages only
    try:
        app()
    except DuetError as exc:
        print(f"duet: error: {printable(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except sqlite3.DatabaseError as exc:
        what = "busy" if "locked" in str(exc) else "damaged"
        hint = ("another program holds it" if what == "busy" else
                "duet state reset --all moves it aside and starts afresh; the old file is kept")
        print(f"duet: error: the state database is {what}: {printable(str(exc))} ({hint})", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
