"""``duet status``: per scope and task, how far the current round is and what the last run did."""

from __future__ import annotations

import os
import time

import typer
from rich.table import Table

from duet_core import units
from duet_core.cli.output import console, emit_json
from duet_core.cli.run import state_dir
from duet_core.config import load_config
from duet_core.errors import DuetError
from duet_core.state import StateStore


def collect(store: StateStore, path: str | None) -> list[dict]:
    scopes = store.scopes()
    if path:
        want = os.path.realpath(path)
        scopes = [s for s in scopes if s[1] == want]
        if not scopes:
            raise DuetError(f"no duet run has covered {path} yet")
    out = []
    for scope_id, root in scopes:
        last = store.last_runs(scope_id)
        tasks = {}
        for (task,) in store.db.execute("SELECT task FROM progress WHERE scope_id=? ORDER BY task", (scope_id,)):
            p = store.progress(scope_id, task)
            lr = last.get(task, {})
            tasks[task] = {
                "round": p.round, "items_done": len(p.done & p.relevant), "items_total": len(p.relevant),
                "complete": p.complete,
                "bytes_processed": lr.get("bytes_processed", 0), "bytes_from_cache": lr.get("bytes_from_cache", 0),
                "bytes_from_device": lr.get("bytes_from_device", 0),
                "last_run": lr.get("ended"), "last_result": lr.get("result"),
            }
        rules = store.last_summary(scope_id)    # what the last run left out of the scope
        out.append({"scope": root, "exclude": rules.get("exclude", []),
                    "one_file_system": rules.get("one_file_system", False), "tasks": tasks})
    return out


def status(
    path: str = typer.Option(None, "--path", "-p", help="Only this scope."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object."),
    config_path: str = typer.Option(None, "--config", help="Config file (for its state_dir)."),
    state_dir_opt: str = typer.Option(None, "--state-dir", help="State directory (default /var/lib/duet)."),
) -> None:
    """Per scope and task: files done / total in the current round, bytes from cache vs device, last run.

    Examples:
      duet status
      duet status --path /home --json
    """
    directory = state_dir(state_dir_opt, load_config(config_path))
    if not os.path.exists(os.path.join(directory, "state.db")):
        raise DuetError(f"no duet state in {directory}: nothing has run yet")
    store = StateStore(directory)
    scopes = collect(store, path)
    if json_out:
        emit_json({"state_dir": directory, "scopes": scopes})
        return
    for sc in scopes:
        rules = [*sc["exclude"], *(["other filesystems (-x)"] if sc["one_file_system"] else [])]
        title = sc["scope"] + (f" — leaving out {', '.join(rules)}" if rules else "")
        table = Table(title=title, title_justify="left")
        for col in ("task", "round", "done", "processed", "from cache", "from device", "last run", "result"):
            table.add_column(col, justify="left" if col in ("task", "last run", "result") else "right")
        for name, t in sc["tasks"].items():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(t["last_run"])) if t["last_run"] else "-"
            table.add_row(name, str(t["round"]), f"{t['items_done']}/{t['items_total']}",
                          units.format_bytes(t["bytes_processed"]), units.format_bytes(t["bytes_from_cache"]),
                          units.format_bytes(t["bytes_from_device"]), when, t["last_result"] or "-")
        console.print(table)
