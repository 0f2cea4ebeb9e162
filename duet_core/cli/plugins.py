"""``duet plugins``: the installed tasks and the broken ones with why; ``duet plugins new``: start a new one."""

from __future__ import annotations

import typer
from rich.table import Table

from duet_core import scaffold
from duet_core.cli.output import console, emit_json
from duet_core.plugins import load_plugins

app = typer.Typer()


@app.callback(invoke_without_command=True)
def plugins(ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """List task plugins: name, version, providing package, description; broken plugins with the reason.

    Examples:
      duet plugins
      duet plugins --json | jq '.tasks[].name'
      duet plugins new thumbnails --dir ~/src
    """
    if ctx.invoked_subcommand:
        return
    reg = load_plugins()
    tasks = [{"name": t.name, "version": t.version, "package": t.package, "description": t.spec.description,
              "granularity": t.spec.granularity, "options": [o.name for o in t.spec.options]}
             for t in sorted(reg.tasks.values(), key=lambda t: t.name)]
    broken = [{"name": b.name, "package": b.package, "error": b.error} for b in reg.broken]
    if json_out:
        emit_json({"tasks": tasks, "broken": broken})
        return
    table = Table(title="duet tasks", title_justify="left")
    for col in ("task", "version", "package", "description"):
        table.add_column(col)
    for t in tasks:
        table.add_row(t["name"], t["version"], t["package"], t["description"])
    for b in broken:
        table.add_row(f"[red]{b['name']}[/]", "", b["package"], f"[red]broken:[/] {b['error']}")
    console.print(table if tasks or broken else "no task plugins installed")


@app.command("new")
def new(
    name: str = typer.Argument(..., help="The task's name (lower-case letters, digits, - and _)."),
    directory: str = typer.Option(".", "--dir", "-d", help="Where to create the project directory duet-NAME."),
) -> None:
    """Create an installable task plugin project: pyproject.toml with the entry point, a task module, a test.

    The task hashes every file with BLAKE3, cached files first; its test runs it over a loop filesystem with the
    fixtures duet ships (duet_core.testing). Replace the work, keep the shape.

    Examples:
      duet plugins new thumbnails --dir ~/src
      cd ~/src/duet-thumbnails && pip install -e '.[test]' && duet plugins && pytest
    """
    project = scaffold.create(name, directory)
    print(f"created {project}\nnext: cd {project} && pip install -e '.[test]' && duet plugins && pytest")
