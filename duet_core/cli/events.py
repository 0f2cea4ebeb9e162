"""``duet events``: a live, per-file view of page-cache events under a path."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from duet_core import residency
from duet_core.cli.output import console, emit_json, is_tty, note
from duet_core.errors import DuetError, printable, require_directory
from duet_core.events import EVENTS, Batch, Event, FileId
from duet_core.exclude import Exclusions

if TYPE_CHECKING:   # the engine (numpy, BPF) is imported by the command that uses it
    from duet_core.engine import Engine

COLUMNS = (("added", Event.ADDED), ("removed", Event.REMOVED), ("dirtied", Event.DIRTIED), ("flushed", Event.FLUSHED))


@dataclass
class FileRow:
    path: str
    total: dict[str, int] = field(default_factory=lambda: {n: 0 for n, _ in COLUMNS})
    last_seen: float = 0.0
    resident_pct: float = 0.0


def count_pages(batch: Batch) -> dict[FileId, dict[str, int]]:
    """Pages per file and event in one batch."""
    out: dict[FileId, dict[str, int]] = {}
    for name, ev in COLUMNS:
        for fid, n in batch.pages(ev).items():
            out.setdefault(fid, {c: 0 for c, _ in COLUMNS})[name] = n
    return out


def resident_pct(path: str) -> float:
    try:
        fd = residency.open_noatime(path)
    except OSError:
        return 0.0
    try:
        size = os.fstat(fd).st_size
        pages = residency.file_pages(size)
        return 100.0 * residency.resident_count(fd) / pages if pages else 0.0
    finally:
        os.close(fd)


def _table(rows: dict[FileId, FileRow], engine: Engine, root: str, elapsed: float, limit: int) -> Group:
    stats = engine.stats()
    lost = sum(v for k, v in stats.items() if k.startswith("kernel_lost"))
    header = Text(f"duet events — {root} — source {engine.source_name} — {elapsed:.0f} s — "
                  f"{len(rows)} files active, {lost} pages lost, {stats['resyncs']} resyncs")
    table = Table(expand=False)
    table.add_column("file", overflow="fold")
    for name, _ in COLUMNS:
        table.add_column(name, justify="right")
    table.add_column("resident", justify="right")
    ranked = sorted(rows.values(), key=lambda r: (-r.last_seen, r.path))[:limit]
    for r in ranked:
        table.add_row(Text(printable(os.path.relpath(r.path, root))),   # Text: a name is never rich markup
                      *(str(r.total[n]) for n, _ in COLUMNS), f"{r.resident_pct:.0f}%")
    return Group(header, table)


def events(
    path: str = typer.Option(..., "--path", "-p", help="Directory whose files to watch (subvolumes included)."),
    mask: str = typer.Option("added,removed,dirtied,flushed", "--mask", "-m",
                             help="Events to show, comma-separated: added, removed, dirtied, flushed."),
    duration: float = typer.Option(0, "--duration", "-d", help="Stop after SECONDS (0: until Ctrl-C)."),
    interval: float = typer.Option(1.0, "--interval", "-i", help="Seconds between refreshes / JSON intervals."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line per file with activity."),
    source: str = typer.Option("auto", "--source", help="auto, bpf or poll."),
    one_file_system: bool = typer.Option(False, "--one-file-system", "-x",
                                         help="Stay on the filesystem of PATH (subvolumes still included)."),
    exclude: list[str] = typer.Option([], "--exclude", "-e", help="Leave out what matches (repeatable), as duet run "
                                      "does: a name at any depth ('*.tmp', '.cache/') or a path from PATH's root."),
) -> None:
    """Show page-cache events for files under PATH, live, like top.

    Examples:
      duet events --path /home
      duet events --path /srv/data --mask added,removed --duration 10 --json | jq .
    """
    try:
        ev_mask = Event.parse(mask)
    except ValueError as exc:
        raise DuetError(f"bad --mask: {exc}") from None
    if not ev_mask or ev_mask & ~EVENTS:
        raise DuetError("bad --mask: choose events from added, removed, dirtied, flushed")
    if interval <= 0 or duration < 0:
        raise DuetError("--interval must be > 0 and --duration >= 0")
    require_directory(path)
    rules = Exclusions(exclude)
    signal.signal(signal.SIGTERM, _sigterm)
    from duet_core.engine import Engine

    with Engine(source=source) as engine:
        if engine.source_warning:
            note(engine.source_warning)
        reg = engine.register("events", ev_mask, path, one_file_system=one_file_system, exclude=rules)
        note(f"watching {reg.path} ({len(reg.scope.files)} files) with the {engine.source_name} source")
        try:
            run_view(engine, reg, duration, interval, json_out)
        finally:
            engine.unregister(reg)


def _sigterm(*_):
    raise KeyboardInterrupt


def run_view(engine: Engine, reg, duration: float, interval: float, json_out: bool) -> dict[FileId, FileRow]:
    """Refresh every ``interval`` seconds until ``duration`` (0: Ctrl-C/SIGTERM); return the per-file totals."""
    rows: dict[FileId, FileRow] = {}
    start = time.monotonic()
    live = None
    if not json_out and is_tty():
        live = Live(console=console, auto_refresh=False, transient=False)
        live.start()
    try:
        deadline = start + duration if duration else float("inf")
        while True:
            now = time.monotonic()
            last = now + interval >= deadline
            time.sleep(max(0.0, min(interval, deadline - now)))
            engine.pump(force=True)
            _report(engine, reg, rows, json_out, live, reg.path, start)
            if last:
                break
    except KeyboardInterrupt:
        engine.pump(force=True)
        _report(engine, reg, rows, json_out, live, reg.path, start)
    finally:
        if live:
            live.stop()
    return rows


def _report(engine: Engine, reg, rows: dict[FileId, FileRow], json_out: bool, live, root: str, start: float) -> None:
    batch = engine.fetch(reg)
    now = time.monotonic()
    if batch.resync:
        note("events were lost (a kernel buffer was full); residency re-read")
    for fid, counts in count_pages(batch).items():
        p = engine.path_of(reg, fid)
        if p is None:
            continue
        row = rows.setdefault(fid, FileRow(p))
        row.last_seen = now
        row.resident_pct = resident_pct(p)
        for k, v in counts.items():
            row.total[k] += v
        if json_out:
            emit_json({"time": round(time.time(), 3), "path": p, **counts,
                       "resident_pct": round(row.resident_pct, 1), "file": str(fid)})
        elif live is None:
            print(f"{printable(os.path.relpath(p, root))}: " + " ".join(f"{k} {v}" for k, v in counts.items())
                  + f" resident {row.resident_pct:.0f}%", flush=True)
    if live is not None:
        live.update(_table(rows, engine, root, now - start, max(5, console.size.height - 8)), refresh=True)
