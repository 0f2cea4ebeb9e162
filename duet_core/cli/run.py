"""``duet run`` and ``duet watch``: tasks over a scope, cache first, from the command line or the config."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

import typer

from duet_core import metrics, units
from duet_core.cli.output import console, emit_json, is_tty, note
from duet_core.config import Config, load_config
from duet_core.errors import DuetError, printable, require_directory
from duet_core.exclude import Exclusions
from duet_core.plugins import TaskRegistry, load_plugins
from duet_core.state import DEFAULT_STATE_DIR, StateStore
from duet_core.tasks import TaskReport

if TYPE_CHECKING:   # the scheduler (numpy, the engine, BPF) is imported by the commands that run: see _execute_runs
    from rich.progress import Progress

    from duet_core.scheduler import Runner

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
log = logging.getLogger("duet.cli")
EXCLUDE_HELP = ("Leave out what matches (repeatable): a name at any depth ('*.tmp', '.cache/': directories only) "
                "or a path from PATH's root ('/var/tmp', 'home/*/.cache'); added to the config's.")
EXCLUDE_FROM_HELP = "Read exclude patterns from FILE, one per line ('#' comments and blank lines skipped)."


def read_patterns(path: str | None) -> list[str]:
    """The patterns of an ``--exclude-from`` file: one per line, blank lines and ``#`` comments skipped."""
    if path is None:
        return []
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DuetError(f"cannot read --exclude-from {path}: {exc.strerror or exc}") from None
    lines = os.fsdecode(raw).splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def state_dir(option: str | None, config: Config) -> str:
    """--state-dir, else $DUET_STATE_DIR, else the config's state_dir, else /var/lib/duet."""
    return option or os.environ.get("DUET_STATE_DIR") or config.state_dir or DEFAULT_STATE_DIR


def complete_task(incomplete: str) -> list[str]:
    """Shell completion of task names: the installed tasks."""
    return [name for name in sorted(load_plugins().tasks) if name.startswith(incomplete)]


def parse_task_args(extra: list[str], opts: list[str], tasks: list[str], registry: TaskRegistry,
                    config: Config, all_tasks: list[str] | None = None) -> dict[str, dict]:
    """Task options from the config, then ``-o TASK.KEY=VALUE``, then ``--KEY VALUE`` (to every task having KEY).

    A boolean option given alone (``--prune``, followed by nothing or by another ``--option``) means true.

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
        key = key.replace("-", "_")
        takers = [t for t in everyone if any(o.name == key for o in registry.get(t).spec.options)]
        if not takers:
            raise DuetError(f"no such option: {arg.split('=')[0]}", hint="see duet run --help and duet plugins")
        if not sep:
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value = extra[i + 1]
                i += 1
            elif all(o.type == "bool" for t in takers for o in registry.get(t).spec.options if o.name == key):
                value = "true"
            else:
                raise DuetError(f"option {arg} needs a value")
        i += 1
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
            # Imported here: runs from cron and systemd (no terminal) never draw bars, and rich.progress is 20 ms of
            # every start.
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
        """A notable event (an item failed, a fallback): above the bars, else a log line (JSON, journal priority)."""
        line = printable(line)   # it may hold a file name: one line, no terminal escapes
        if self.bars:
            self.bars.console.print(line, markup=False)
        else:
            log.warning("%s", line)

    def finished(self, summary: dict) -> None:
        if self.bars:
            self.bars.stop()
            self.bars = None


class MetricsUI:
    """Shows the run through ``display`` and keeps the scope's Prometheus file current (:mod:`duet_core.metrics`).

    ``runner`` is set once the runner exists: the engine's counters (events absorbed, lost) are read from it while
    it runs, and the last reading is what the final file reports.
    """

    def __init__(self, display: LiveUI, writer: metrics.MetricsWriter, mode: str):
        self.display, self.writer, self.mode = display, writer, mode
        self.runner: Runner | None = None
        self.engine_stats: dict[str, int] = {}
        self._started = time.monotonic()
        self._head: dict = {}

    def started(self, reports: dict[str, TaskReport], dataset_bytes: int, source: str) -> None:
        self.display.started(reports, dataset_bytes, source)
        self._started = time.monotonic()
        self._head = {"scope": self.runner.root if self.runner else "", "dataset_bytes": dataset_bytes,
                      "source": source, "result": "watching" if self.mode == "watch" else "running"}
        self._write(reports, force=True)

    def advanced(self, reports: dict[str, TaskReport]) -> None:
        self.display.advanced(reports)
        self._write(reports)

    def message(self, line: str) -> None:
        self.display.message(line)

    def finished(self, summary: dict) -> None:
        self.display.finished(summary)   # the final file is written by the caller, who knows the exit code

    def _write(self, reports: dict[str, TaskReport], force: bool = False) -> None:
        engine = getattr(self.runner, "engine", None)
        if engine is not None:
            self.engine_stats = engine.stats()
        so_far = {**self._head, "wall_s": round(time.monotonic() - self._started, 3),
                  "tasks": {name: rep.as_dict() for name, rep in reports.items()}}
        self.writer.update(so_far, self.engine_stats, force=force)


def _detail(rep: TaskReport) -> str:
    return (f"{units.format_bytes(rep.bytes_processed)} ({units.format_bytes(rep.bytes_from_cache)} from cache, "
            f"{units.format_bytes(rep.bytes_from_device)} from device)")


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    result = summary["result"]
    failed = sum(t["items_failed"] for t in summary["tasks"].values())
    if failed:      # "complete" says nothing is left this run could do, not that all went well (exit code 1)
        result += f", {failed} failed"
    table = Table(title=f"duet run — {summary['scope']} — {result}", title_justify="left")
    for col in ("task", "files", "processed", "from cache", "from device", "failed"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, t in summary["tasks"].items():
        table.add_row(name, f"{t['items_done']}/{t['items_total']}", units.format_bytes(t["bytes_processed"]),
                      units.format_bytes(t["bytes_from_cache"]), units.format_bytes(t["bytes_from_device"]),
                      str(t["items_failed"]))
    console.print(table)
    for name, t in summary["tasks"].items():
        if t.get("items_damaged"):
            console.print(f"{name}: damage found in {t['items_damaged']} file(s) (listed above; exit code 6)")
    console.print(f"data set {units.format_bytes(summary['dataset_bytes'])}, read from the device by this run: "
                  f"{units.format_bytes(summary['device_read_bytes'])}, {summary['wall_s']:.1f} s")
    waited = summary.get("phases", {}).get("foreground_wait_s")
    if waited:
        console.print(f"waited {waited:.1f} s in all while other programs were reading the scope (idle I/O)")


def _log_fields(summary: dict, code: int, mode: str) -> str:
    """One run as ``key=value`` pairs (logfmt), for the journal and log search: one line per run and scope."""
    fields = {"scope": summary["scope"], "mode": mode, "result": summary["result"], "exit": code,
              "source": summary["source"], "wall_s": summary["wall_s"],
              "device_read_bytes": summary["device_read_bytes"]}
    if summary.get("phases", {}).get("foreground_wait_s"):
        fields["foreground_wait_s"] = summary["phases"]["foreground_wait_s"]
    for name, t in summary["tasks"].items():
        fields[f"{name}.done"] = f"{t['items_done']}/{t['items_total']}"
        fields[f"{name}.failed"] = t["items_failed"]
        fields[f"{name}.from_cache"] = t["bytes_from_cache"]
        fields[f"{name}.from_device"] = t["bytes_from_device"]
    return " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())


def _logfmt(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


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


class Reload:
    """SIGHUP to ``duet watch``: the current pass stops as on SIGTERM (progress saved, metrics written), then the
    config and the installed plugins are read again and the watch goes on — ``systemctl reload duet-watch@...``."""

    def __init__(self) -> None:
        self.requested = False
        self.runner: Runner | None = None

    def __call__(self, _signum, _frame) -> None:
        self.requested = True
        if self.runner is not None:
            self.runner.stop_reason = "SIGHUP"


def _execute(*args, reload: Reload | None = None, exclude: list[str] | None = None,
             exclude_from: str | None = None, jobs: int = 1) -> None:
    """Unit parse errors (ValueError from duet_core.units) become a DuetError line."""
    try:
        _execute_runs(*args, reload=reload, exclude=list(exclude or []) + read_patterns(exclude_from), jobs=jobs)
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
            if "=" not in tok and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                extra.append(tokens[i + 1])
                i += 1
        else:
            names.append(tok)
        i += 1
    return names, extra


def _execute_runs(ctx: typer.Context, tasks: list[str], path: str | None, budget: str | None, rate_limit: str | None,
             idle_io: bool | None, cache_hygiene: bool | None, one_file_system: bool | None, json_out: bool,
             config_path: str | None, state_dir_opt: str | None, source: str, opts: list[str], mode: str,
             quiet: bool, metrics_dir: str | None, reload: Reload | None = None, exclude: list[str] | None = None,
             jobs: int = 1) -> None:
    from duet_core.scheduler import Runner, RunOptions, resolve_options

    tasks, extra = split_args(list(tasks) + list(ctx.args))
    config = load_config(config_path)
    metrics_dir = metrics_dir or config.metrics_dir
    if metrics_dir:
        metrics_dir = metrics.check_dir(metrics_dir)
    registry = load_plugins()
    for b in registry.broken:
        note(f"plugin {b.name} ({b.package}) is broken and was skipped: {b.error}")
    runs = _runs(tasks, path, config)
    if mode == "watch" and len(runs) > 1:
        raise DuetError(f"duet watch watches one scope, and {len(runs)} were given by the config",
                        hint="--path P, e.g. one duet-watch@ unit per scope (docs/operations.md)")
    everyone = sorted({n for _, names, _ in runs for n in names})
    for n in everyone:
        registry.get(n)
    for root, names, _sc in runs:   # every input checked before anything is written, the state database included
        task_args = parse_task_args(extra, opts, names, registry, config, everyone)
        if len(set(names)) != len(names):
            raise DuetError("a task is named twice")
        resolved = {n: resolve_options(registry.get(n), task_args.get(n, {})) for n in names}
        require_directory(root)
        for n in names:
            registry.get(n).hook.duet_check(root=os.path.realpath(root), options=resolved[n])
    for text, parse in ((budget, units.parse_duration), (rate_limit, units.parse_rate)):
        if text:
            parse(text)
    patterns = {root: (sc.exclude if sc else config.defaults.exclude) + tuple(exclude or ()) for root, _, sc in runs}
    for root, pats in patterns.items():
        Exclusions(pats)   # each pattern checked: one line for a bad one
        real = os.path.realpath(root)
        for p in pats:
            if real != "/" and p.startswith(real + "/"):
                note(f"exclude pattern {p!r} is relative to the scope {real}: it names "
                     f"{printable(real + p)}; for {printable(p)} write {p[len(real):]!r}")
    if source not in ("auto", "bpf", "poll"):
        raise DuetError(f"unknown event source {source!r} (use auto, bpf or poll)")
    if jobs not in (1, 2):
        raise DuetError(f"--jobs {jobs}: use 1 (every task in this process) or 2 (the first task named in this "
                        "process, the others in a second one)")
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
            exclude=patterns[root], source=source, mode=mode, jobs=jobs,
            task_options=parse_task_args(extra, opts, names, registry, config, everyone))
        ui: LiveUI | MetricsUI = LiveUI(quiet=quiet or json_out)
        if metrics_dir:
            ui = MetricsUI(ui, metrics.MetricsWriter(metrics_dir, os.path.realpath(root), mode, store), mode)
        runner = Runner(store, registry, names, root, ro, ui)
        if isinstance(ui, MetricsUI):
            ui.runner = runner
        if reload is not None:
            reload.runner = runner
            if reload.requested:         # a SIGHUP while the config was being read: take it now
                runner.stop_reason = "SIGHUP"
        summary = runner.run()
        code = runner.exit_code(summary)
        if isinstance(ui, MetricsUI):
            ui.writer.finished(summary, ui.engine_stats, code)
        if json_out:
            emit_json(summary)
        elif not quiet:
            _print_summary(summary)
        log.info("run finished: %s", _log_fields(summary, code, mode))
        worst = max(worst, code)
        if runner.stop_reason in ("SIGTERM", "SIGINT", "SIGHUP"):   # stop means stop: no further scope starts
            break
    raise typer.Exit(worst)


def run(
    ctx: typer.Context,
    tasks: list[str] = typer.Argument(None, help="Tasks to run (see duet plugins); default: the config's.",
                                      autocompletion=complete_task),
    path: str = typer.Option(None, "--path", "-p", help="The scope: a directory tree (subvolumes included)."),
    budget: str = typer.Option(None, "--for", help="Stop cleanly after this long (e.g. 2h); the next run resumes."),
    rate_limit: str = typer.Option(None, "--rate-limit", help="Cap device reads, e.g. 50MB/s."),
    idle_io: bool = typer.Option(None, "--idle-io/--no-idle-io",
                                 help="Idle I/O: the idle priority class, and files not cached wait while other "
                                      "programs read the scope (default on)."),
    cache_hygiene: bool = typer.Option(None, "--cache-hygiene/--no-cache-hygiene",
                                       help="Evict what the run itself brought into the cache (default on)."),
    one_file_system: bool = typer.Option(None, "--one-file-system/--cross-file-systems", "-x",
                                         help="Stay on PATH's filesystem (nested subvolumes still count)."),
    exclude: list[str] = typer.Option([], "--exclude", "-e", help=EXCLUDE_HELP),
    exclude_from: str = typer.Option(None, "--exclude-from", help=EXCLUDE_FROM_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary object per scope."),
    config_path: str = typer.Option(None, "--config", help="Config file (default /etc/duet/duet.toml)."),
    state_dir_opt: str = typer.Option(None, "--state-dir", help="State directory (default /var/lib/duet)."),
    source: str = typer.Option("auto", "--source", help="Event source: auto, bpf or poll."),
    opts: list[str] = typer.Option([], "--option", "-o", help="Task option TASK.KEY=VALUE (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display or summary table; log lines only."),
    metrics_dir: str = typer.Option(None, "--metrics-dir", help="Write Prometheus metrics (*.prom) here, for "
                                    "node_exporter's textfile collector (default: the config's metrics_dir)."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="2: the first task named runs in this process and reads, the "
                             "others in a second process on another CPU, fed each file while it is cached."),
) -> None:
    """Run maintenance tasks over a scope: cached files first, one device read shared by all tasks.

    Task options may also be given as --KEY VALUE (e.g. --target /mnt/backup). Exit codes: 0 done, 1 some items
    failed or parts of the scope unreadable, 2 bad input, 4 another run holds the scope, 5 stopped early (--for;
    SIGTERM or SIGINT: within a second) with progress saved, 6 a task found damage in the data (scrub: corruption).

    Examples:
      duet run backup scrub --path /home --target /mnt/backup
      duet run --config /etc/duet/duet.toml --for 2h --rate-limit 50MB/s
    """
    _execute(ctx, tasks or [], path, budget, rate_limit, idle_io, cache_hygiene, one_file_system,
             json_out, config_path, state_dir_opt, source, opts, "run", quiet, metrics_dir,
             exclude=exclude, exclude_from=exclude_from, jobs=jobs)


def watch(
    ctx: typer.Context,
    tasks: list[str] = typer.Argument(None, help="Tasks to run on what arrives in the cache.",
                                      autocompletion=complete_task),
    path: str = typer.Option(None, "--path", "-p", help="The scope."),
    exclude: list[str] = typer.Option([], "--exclude", "-e", help=EXCLUDE_HELP),
    exclude_from: str = typer.Option(None, "--exclude-from", help=EXCLUDE_FROM_HELP),
    budget: str = typer.Option(None, "--for", help="Stop after this long (default: until SIGTERM)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary object when stopped."),
    config_path: str = typer.Option(None, "--config", help="Config file."),
    state_dir_opt: str = typer.Option(None, "--state-dir", help="State directory."),
    source: str = typer.Option("auto", "--source", help="Event source: auto, bpf or poll."),
    opts: list[str] = typer.Option([], "--option", "-o", help="Task option TASK.KEY=VALUE (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display or summary table; log lines only."),
    metrics_dir: str = typer.Option(None, "--metrics-dir", help="Keep Prometheus metrics (*.prom) current here "
                                    "(default: the config's metrics_dir)."),
) -> None:
    """Daemon: process only files (or pages) that are already in the page cache — no extra device reads.

    Stops cleanly on SIGTERM/SIGINT, saving progress (exit 5: stopped, as a watch always is). On SIGHUP it stops
    the current pass the same way, reads the config and the plugin list again and goes on (systemctl reload).
    Without tasks, those of the config's [[scope]] for --path.

    Examples:
      duet watch scrub --path /srv
      duet watch --path /srv --config /etc/duet/duet.toml --metrics-dir /var/lib/prometheus/node-exporter
      kill -HUP $(pidof -s duet)      # re-read the config
    """
    reload = Reload()
    old = signal.signal(signal.SIGHUP, reload)
    try:
        while True:
            try:
                _execute(ctx, tasks or [], path, budget, None, True, False, None, json_out, config_path,
                         state_dir_opt, source, opts, "watch", quiet, metrics_dir, reload=reload,
                         exclude=exclude, exclude_from=exclude_from)
            except typer.Exit:
                if reload.runner is None or reload.runner.stop_reason != "SIGHUP":   # SIGTERM wins over SIGHUP
                    raise
                reload.requested, reload.runner = False, None
                log.warning("SIGHUP: reloading the config and plugins")
                continue
    finally:
        signal.signal(signal.SIGHUP, old)
