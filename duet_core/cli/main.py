"""The ``duet`` command. Command functions parse and delegate; :class:`DuetError` becomes one line here only."""

from __future__ import annotations

import importlib
import os
import sqlite3
import sys
from importlib.metadata import entry_points

import typer

from duet_core import __version__
from duet_core.cli import logs
from duet_core.errors import DuetError, printable

# The core's commands, in the order help lists them: name -> (module under duet_core.cli, attribute, how it is
# added). A command imports its module only when it is added, and `duet run` adds only itself (see main()), so a
# run does not pay for importing bench, demo and the rest.
COMMANDS = {
    "doctor": ("doctor", "doctor", "command"),
    "events": ("events", "events", "command"),
    "demo": ("demo", "demo", "command"),
    "bench": ("bench", "app", "group"),
    "run": ("run", "run", "extra"),
    "watch": ("run", "watch", "extra"),
    "status": ("status", "status", "command"),
    "plugins": ("plugins", "app", "group"),
    "install-units": ("install_units", "install_units", "command"),
    "state": ("state", "app", "group"),
}
ROOT_OPTIONS_WITH_VALUE = ("--log-format",)


def build(only: str | None = None) -> typer.Typer:
    """The ``duet`` app with every core command, or with the core command ``only`` alone."""
    app = typer.Typer(name="duet", no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False)
    app.callback()(_root)
    for name, (module, attr, kind) in COMMANDS.items():
        if only is not None and name != only:
            continue
        mod = importlib.import_module(f"duet_core.cli.{module}")
        if kind == "group":
            app.add_typer(getattr(mod, attr), name=name)
        else:
            extra = {"context_settings": mod.EXTRA} if kind == "extra" else {}
            app.command(name, **extra)(getattr(mod, attr))
    return app


def invoked_command(argv: list[str]) -> str | None:
    """The core command ``argv`` (without the program) asks for, or None: no command, a plugin's command, or
    shell completion — which need every command."""
    if any(k.startswith("_DUET_COMPLETE") for k in os.environ):
        return None
    args = iter(argv)
    for arg in args:
        if arg in ROOT_OPTIONS_WITH_VALUE:
            next(args, None)
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def __getattr__(name: str):
    """``duet_core.cli.main.app``: the whole app (the CLI reference and tests read it)."""
    if name == "app":
        return build()
    raise AttributeError(name)


def _version(value: bool) -> None:
    if value:
        print(f"duet {__version__}")
        raise typer.Exit()


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
    only = invoked_command(sys.argv[1:])
    app = build(only)
    if only is None:
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
