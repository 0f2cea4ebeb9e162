"""``duet plugins``: the installed tasks, and the broken ones with why."""

from __future__ import annotations

import typer
from rich.table import Table

from duet_core.cli.output import console, emit_json
from duet_core.plugins import load_plugins


def plugins(json_out: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """List task plugins: name, version, providing package, description.

    Examples:
      duet plugins
      duet plugins --json | jq '.tasks[].name'
    """
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
