"""The ``duet`` command. Command functions parse and delegate; :class:`DuetError` becomes one line here only."""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points

import typer

from duet_core import __version__
from duet_core.cli import bench, demo, doctor, events, plugins, run, status
from duet_core.errors import DuetError

app = typer.Typer(
    name="duet",
    help="Page-cache-aware storage maintenance: backup, scrub, defrag and gc that process cached data first.",
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
app.command("plugins")(plugins.plugins)


def _version(value: bool) -> None:
    if value:
        print(f"duet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log lines (-vv for debug)."),
) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="duet: %(message)s", stream=sys.stderr)


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
    """Entry point: typer reports usage errors itself (exit 2); a DuetError becomes one line and its exit code."""
    add_plugin_commands(app)
    try:
        app()
    except DuetError as exc:
        print(f"duet: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
