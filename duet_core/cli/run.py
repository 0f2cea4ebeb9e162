"""``duet run`` and ``duet watch``: tasks over a scope, cache first, from the command line or the config."""

from __future__ import annotations

import os
import sys
import time

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from duet_core import units
from duet_core.cli.output import console, emit_json, is_tty, note
from duet_core.config import Config, load_config
from duet_core.errors import DuetError, printable
from duet_core.plugins import TaskRegistry, load_plugins
from duet_core.scheduler import Runner, RunOptions, resolve_options
from duet_core.state import DEFAULT_STATE_DIR, StateStore
from duet_core.tasks import TaskReport

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def state_dir(option: str | None, config: Config) -> str:
    """--state-dir, else $DUET_STATE_DIR, else the config's state_dir, else /var/lib/duet."""
    return option or os.environ.get("DUET_STATE_DIR") or config.state_dir or DEFAULT_STATE_DIR


def parse_task_args(extra: list[str], opts: list[str], tasks: list[str], registry: TaskRegistry,
                    config: Config, all_tasks: list[str] | None = None) -> dict[str, dict]:
    """Task options from the config, then ``-o TASK.KEY=VALUE``, then ``--KEY VALUE`` (to every task having KEY).

    ``tasks`` are this scope's tasks; ``all_tasks`` those of the whole invocation (several config scopes): an
    option is an error only if no task of the invocation takes it, and applies where its task runs.
    """
    everyone = all_tasks or tasks
    out = {t: config.options_for(t) for t in tasks}
    for o in opts:
        name, sep, value = o.partition("=")
        task, dot, key = name.partition(".")
        if not sep or not dot or not key:
            raise DuetError(f"bad -o {o!r}", hint="use -o TASK.KEY=VALUE, e.g. -o backup.target=/mnt/backup")
        if task not in everyone:
            raise DuetError(f"-o {o!r} names task {task!r}, which is not part of this run")
        if task in out:
            out[task][key] = value
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise DuetError(f"unexpected argument {arg!r}", hint="tasks come first: duet run TASK... --path P")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(extra):
                raise DuetError(f"option {arg} needs a value")
            value = extra[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        takers = [t for t in everyone if any(o.name == key for o in registry.get(t).spec.options)]
        if not takers:
            raise DuetError(f"no such option: {arg.split('=')[0]}", hint="see duet run --help and duet plugins")
        for t in takers:
            if t in out:
                out[t][key] = value
    return out


class LiveUI:
    """Per-task progress bars on a terminal; plain log lines (every 5 s and at the end) otherwise."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bars: Progress | None = None
        self.ids: dict[str, int] = {}
        self._last_line = 0.0

    def started(self, reports: dict[str, TaskReport], dataset_bytes: int, source: str) -> None:
        if self.quiet:
            return
        note(f"{len(reports)} task(s) over {units.format_bytes(dataset_bytes)} with the {source} source")
        if is_tty():
            self.bars = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console)
            self.bars.start()
            for name, rep in reports.items():
                self.ids[name] = self.bars.add_task(name, total=rep.items_total or 1, completed=rep.items_done,
                                                    detail="")

    def advanced(self, reports: dict[str, TaskReport]) -> None:
        if self.quiet:
            return
        if self.bars:
            for name, rep in reports.items():
                self.bars.update(self.ids[name], total=rep.items_total or 1, completed=rep.items_done,
                                 detail=_detail(rep))
        elif time.monotonic() - self._last_line >= 5:
            self._last_line = time.monotonic()
            for name, rep in reports.items():
                print(f"duet: {name}: {rep.items_done}/{rep.items_total} files, {_detail(rep)}", file=sys.stderr)

    def message(self, line: str) -> None:
        line = printable(line)   # it may hold a file name: one line, no terminal escapes
        if self.bars:
            self.bars.console.print(line, markup=False)
        else:
            print(f"duet: {line}", file=sys.stderr)

    def finished(self, summary: dict) -> None:
        if self.bars:
            self.bars.stop()
            self.bars = None


def _detail(rep: TaskReport) -> str:
    return (f"{units.format_bytes(rep.bytes_processed)} ({units.format_bytes(rep.bytes_from_cache)} from cache, "
            f"{units.format_bytes(rep.bytes_from_device)} from device)")


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"duet run — {summary['scope']} — {summary['result']}", title_justify="left")
    for col in ("task", "files", "processed", "from cache", "from device", "failed"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, t in summary["tasks"].items():
        table.add_row(name, f"{t['items_done']}/{t['items_total']}", units.format_bytes(t["bytes_processed"]),
                      units.format_bytes(t["bytes_from_cache"]), units.format_bytes(t["bytes_from_device"]),
                      str(t["items_failed"]))
    console.print(table)
    console.print(f"data set {units.format_bytes(summary['dataset_bytes'])}, read from the device by this run: "
                  f"{units.format_bytes(summary['device_read_bytes'])}, {summary['wall_s']:.1f} s")


def _runs(tasks: list[str], path: str | None, config: Config) -> list[tuple[str, list[str], object]]:
    """(root, tasks, scope config or None) for each run this invocation makes."""
    if path is not None:
        if not path:
            raise DuetError("--path is empty")
        if not tasks:
            sc = config.scope_for(path)
            if sc is None:
                raise DuetError("no task given", hint="duet run TASK... --path P, or list tasks for P in the config")
            tasks = list(sc.tasks)
        return [(path, tasks, config.scope_for(path))]
    if not config.scopes:
        raise DuetError("no --path given and no scope in the config",
                        hint=f"duet run TASK... --path P, or add [[scope]] to {config.source or '/etc/duet/duet.toml'}")
    out = []
    for sc in config.scopes:
        chosen = [t for t in sc.tasks if not tasks or t in tasks]
        if chosen:
            out.append((sc.path, chosen, sc))
    if not out:
        raise DuetError(f"no scope in the config runs {', '.join(tasks)}")
    return out


def _execute(*args) -> None:
    """Unit parse errors (ValueError from duet_core.units) become a DuetError line."""
    try:
        _execute_runs(*args)
    except ValueError as exc:
        raise DuetError(str(exc)) from None


def split_args(tokens: list[str]) -> tuple[list[str], list[str]]:
    """typer hands unknown ``--KEY VALUE`` options over mixed with the task names: take them apart."""
    names, extra = [], []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            extra.append(tok)
            if "=" not in tok and i + 1 < len(tokens):
                extra.append(tokens[i + 1])
                i += 1
        else:
            names.append(tok)
        i += 1
    return names, extra


def _execute_runs(ctx: typer.Context, tasks: list[str], path: str | None, budget: str | None, rate_limit: str | None,
             idle_io: bool | None, cache_hygiene: bool | None, one_file_system: bool | None, json_out: bool,
             config_path: str | None, state_dir_opt: str | None, source: str, opts: list[str], mode: str,
             quiet: bool) -> None:
    tasks, extra = split_args(list(tasks) + list(ctx.args))
    config = load_config(config_path)
    registry = load_plugins()
    for b in registry.broken:
        note(f"plugin {b.name} ({b.package}) is broken and was skipped: {b.error}")
    runs = _runs(tasks, path, config)
    everyone = sorted({n for _, names, _ in runs for n in names})
    for n in everyone:
        registry.get(n)
    for root, names, _sc in runs:   # every input checked before anything is written, the state database included
        task_args = parse_task_args(extra, opts, names, registry, config, everyone)
        if len(set(names)) != len(names):
            raise DuetError("a task is named twice")
        for n in names:
            resolve_options(registry.get(n), task_args.get(n, {}))
        if not os.path.isdir(root):
            raise DuetError(f"not a directory: {root}")
    for text, parse in ((budget, units.parse_duration), (rate_limit, units.parse_rate)):
        if text:
            parse(text)
    if source not in ("auto", "bpf", "poll"):
        raise DuetError(f"unknown event source {source!r} (use auto, bpf or poll)")
    store = StateStore(state_dir(state_dir_opt, config))
    worst = 0
    for root, names, sc in runs:
        d = config.defaults
        ro = RunOptions(
            budget_s=units.parse_duration(budget) if budget else (sc.budget if sc and sc.budget else d.budget),
            rate_limit=(units.parse_rate(rate_limit) if rate_limit else
                        (sc.rate_limit if sc and sc.rate_limit else d.rate_limit)),
            idle_io=d.idle_io if idle_io is None else idle_io,
            cache_hygiene=d.cache_hygiene if cache_hygiene is None else cache_hygiene,
            one_file_system=(one_file_system if one_file_system is not None else
                             (sc.one_file_system if sc else d.one_file_system)),
            source=source, mode=mode,
            task_options=parse_task_args(extra, opts, names, registry, config, everyone))
        runner = Runner(store, registry, names, root, ro, LiveUI(quiet=quiet or json_out))
        summary = runner.run()
        if json_out:
            emit_json(summary)
        elif not quiet:
            _print_summary(summary)
        worst = max(worst, runner.exit_code(summary))
    raise typer.Exit(worst)


def run(
    ctx: typer.Context,
    tasks: list[str] = typer.Argument(None, help="Tasks to run (see duet plugins); default: the config's."),
    path: str = typer.Option(None, "--path", "-p", help="The scope: a directory tree (subvolumes included)."),
    budget: str = typer.Option(None, "--for", help="Stop cleanly after this long (e.g. 2h); the next run resumes."),
    rate_limit: str = typer.Option(None, "--rate-limit", help="Cap device reads, e.g. 50MB/s."),
    idle_io: bool = typer.Option(None, "--idle-io/--no-idle-io", help="Idle I/O priority (default on)."),
    cache_hygiene: bool = typer.Option(None, "--cache-hygiene/--no-cache-hygiene",
                                       help="Evict what the run itself brought into the cache (default on)."),
    one_file_system: bool = typer.Option(None, "--one-file-system/--cross-file-systems", "-x",
                                         help="Stay on PATH's filesystem (nested subvolumes still count)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary object per scope."),
    config_path: str = typer.Option(None, "--config", help="Config file (default /etc/duet/duet.toml)."),
    state_dir_opt: str = typer.Option(None, "--state-dir", help="State directory (default /var/lib/duet)."),
    source: str = typer.Option("auto", "--source", help="Event source: auto, bpf or poll."),
    opts: list[str] = typer.Option([], "--option", "-o", help="Task option TASK.KEY=VALUE (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
) -> None:
    """Run maintenance tasks over a scope: cached files first, one device read shared by all tasks.

    Task options may also be given as --KEY VALUE (e.g. --target /mnt/backup). Exit codes: 0 done, 1 some items
    failed, 2 bad input, 4 another run holds the scope, 5 stopped early (--for, SIGTERM) with progress saved.

    Examples:
      duet run backup scrub --path /home --target /mnt/backup
      duet run --config /etc/duet/duet.toml --for 2h --rate-limit 50MB/s
    """
    _execute(ctx, tasks or [], path, budget, rate_limit, idle_io, cache_hygiene, one_file_system,
                            json_out, config_path, state_dir_opt, source, opts, "run", quiet)


def watch(
    ctx: typer.Context,
    tasks: list[str] = typer.Argument(None, help="Tasks to run on what arrives in the cache."),
    path: str = typer.Option(None, "--path", "-p", help="The scope."),
    budget: str = typer.Option(None, "--for", help="Stop after this long (default: until SIGTERM)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary object when stopped."),
    config_path: str = typer.Option(None, "--config", help="Config file."),
    state_dir_opt: str = typer.Option(None, "--state-dir", help="State directory."),
    source: str = typer.Option("auto", "--source", help="Event source: auto, bpf or poll."),
    opts: list[str] = typer.Option([], "--option", "-o", help="Task option TASK.KEY=VALUE (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
) -> None:
    """Daemon: process only files (or pages) that are already in the page cache — no extra device reads.

    Stops cleanly on SIGTERM/SIGINT, saving progress (exit 5: stopped, as a watch always is).

    Examples:
      duet watch scrub --path /srv
    """
    _execute(ctx, tasks or [], path, budget, None, True, False, None, json_out, config_path,
                            state_dir_opt, source, opts, "watch", quiet)
