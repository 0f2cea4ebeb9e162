"""``duet bench``: benchmarks. ``duet bench engine`` stresses the event engine (see duet_core/bench/engine.py)."""

from __future__ import annotations

import os

import typer
from rich.table import Table

from duet_core import units
from duet_core.bpf import MERGE_ENTRIES
from duet_core.cli.output import console, emit_json, err_console, is_tty, note
from duet_core.errors import DuetError
from duet_core.events import Event

app = typer.Typer(help="Benchmarks (docs/benchmarks.md).\n\nExamples:\n  duet bench engine\n  duet bench share --json",
                  no_args_is_help=True)


def parse_size(text: str) -> int:
    """``2G``, ``512MiB``, ``0`` → bytes (duet_core.units: a bare G is GiB)."""
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise DuetError(str(exc)) from None


def _fmt(x, spec: str = "", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _yes(ok) -> str:
    return "–" if ok is None else ("[green]yes[/]" if ok else "[red]NO[/]")


COLUMNS = ("workload", "pages", "delivered", "lost", "ok", "base s", "engine s", "slower (min..max)",
           "reader CPU", "events/s", "engine CPU", "BPF ns/ev", "noise", "steal")


def rows(report: dict) -> list[list[str]]:
    out = []
    for w in report["workloads"]:
        rng = w["slowdown_pct_range"]
        out.append([
            f"{w['name']} ({w['readers']}r)", f"{w['pages']:,}", f"{w['delivered_pages']:,}", f"{w['lost_pages']:,}",
            "yes" if w["accounted"] else "NO", f"{w['baseline_s']:.3f}", f"{w['engine_s']:.3f}",
            f"{w['slowdown_pct']:+.1f}% ({rng[0]:+.0f}..{rng[1]:+.0f})" if rng else "–",
            _fmt(w["reader_cpu_slowdown_pct"], "+.1f") + "%", f"{w['events_per_s']:,}",
            f"{w['engine_cpu_pct']:.1f}%", _fmt(w["bpf_ns_per_event"]), f"{w['baseline_noise_pct']:.0f}%",
            f"{w['steal_pct']:.1f}%"])
    return out


TARGET_NAMES = {"all_accounted": "every page delivered or counted lost",
                "none_lost": "no page lost",
                "engine_cpu_at_100k_le_10pct": "engine CPU <= 10% of a core at 100k events/s",
                "cpu_bound_slowdown_le_10pct": "CPU-bound workloads <= 10% slower",
                "device_bound_slowdown_le_2pct": "device-bound workloads <= 2% slower",
                "attach_under_1s": "attach to first event < 1 s"}


def render(report: dict, rich: bool) -> None:
    """The results table (rich on a terminal, aligned plain text otherwise), attach times and targets."""
    m = report["machine"]
    cfg = report["config"]
    title = (f"duet bench engine — {m['nproc']} CPUs, {m['mem_gib']} GiB, {m['kernel']} — "
             f"{cfg['size'] >> 20} MiB sparse file, medians of {cfg['runs']} runs"
             + (f" ({max(cfg['runs'], cfg['device_runs'])} of the device-bound)"
                if cfg.get("device_runs", 0) > cfg["runs"] else ""))
    body = rows(report)
    if rich:
        table = Table(title=title, title_justify="left")
        for col in COLUMNS:
            table.add_column(col, justify="left" if col == "workload" else "right")
        for row in body:
            table.add_row(*[f"[red]{c}[/]" if c == "NO" else c for c in row])
        console.print(table)
    else:
        widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(COLUMNS)]
        print(title)
        for row in [list(COLUMNS), *body]:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    a = report["attach"]
    lines = [f"attach to first event: {_fmt(a['attach_to_first_event_s'], '.3f')} s median, "
             f"{_fmt(a['max_s'], '.3f')} s max (load+attach {_fmt(a['load_attach_s'], '.3f')} s, register "
             f"{_fmt(a['register_s'], '.3f')} s, first event {_fmt(a['first_event_after_read_s'], '.3f')} s "
             f"after the read; imports {_fmt(a['import_s'], '.2f')} s before that)"]
    for key, ok in report["targets"].items():
        doubt = " (inconclusive: some runs met it, some did not)" \
            if key in report.get("inconclusive", ()) else ""
        lines.append(f"  {_yes(ok) if rich else _plain(ok)}  {TARGET_NAMES.get(key, key)}{doubt}")
    lines.append(f"{report['date']}, took {report['took_s']:.0f} s")
    for line in lines:
        console.print(line, soft_wrap=True) if rich else print(line)


def _plain(ok) -> str:
    return "–  " if ok is None else ("yes" if ok else "NO ")


@app.command("engine")
def engine(
    size: str = typer.Option("2G", "--size", help="Size of the sparse file the CPU-bound readers cover."),
    runs: int = typer.Option(5, "--runs", min=1, help="Runs of every workload, each without and with the engine."),
    device_runs: int = typer.Option(9, "--device-runs", min=1,
                                    help="Runs of the device-bound workloads (at least --runs): they are noisier."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    settle: float = typer.Option(1.0, "--settle", min=0, help="Seconds to wait after drop_caches before a run."),
    touch: str = typer.Option("3G", "--touch", help="Memory touched and freed before each run (0 to skip)."),
    drop_caches: bool = typer.Option(True, "--drop-caches/--no-drop-caches",
                                     help="Drop the page cache before each run (slows everyone on the machine)."),
    fstype: str = typer.Option("ext4", "--fstype", help="Loop filesystem: ext4 or btrfs."),
    device_size: str = typer.Option("2G", "--device-size", help="File on the direct-I/O loop device (0: skip)."),
    device_random: int = typer.Option(32768, "--device-random", min=1, help="4 KiB reads of dev-rand."),
    rate: float = typer.Option(100_000, "--rate", min=0, help="Reads/s of the rate-limited workload (0: skip)."),
    rate_seconds: float = typer.Option(2.0, "--rate-seconds", min=0, help="How long the rate-limited workload runs."),
    only: list[str] = typer.Option([], "--only", help="Run only this workload (repeatable)."),
    mask: str = typer.Option("added,removed", "--mask", help="The registration's events/states."),
    merge_entries: int = typer.Option(MERGE_ENTRIES, "--merge-entries", min=64,
                                      help="The engine's merge map entries (small: watch loss being counted)."),
    retries: int = typer.Option(1, "--retries", min=0, help="Re-runs of a run disturbed by steal or other load."),
    bpf_stats: bool = typer.Option(False, "--bpf-stats", help="Measure ns per BPF run (kernel.bpf_stats_enabled; "
                                   "adds a little overhead to the engine runs)."),
) -> None:
    """The event engine under the highest page-event rate this machine makes, against the same work without it.

    Examples:
      duet bench engine
      duet bench engine --only dev-rand --no-drop-caches --json
    """
    from duet_core.bench.engine import run_bench

    try:
        ev = Event.parse(mask)
    except ValueError as exc:
        raise DuetError(str(exc)) from None
    with err_console.status("starting") as status:
        report = run_bench(size=parse_size(size), runs=runs, device_runs=device_runs, settle_s=settle,
                           touch_bytes=parse_size(touch), drop_caches=drop_caches, fstype=fstype,
                           device_size=parse_size(device_size), dev_random_pages=device_random, rate=rate,
                           rate_s=rate_seconds, only=only, mask=ev,
                           merge_entries=merge_entries, retries=retries, bpf_stats=bpf_stats,
                           progress=status.update)
    if report["other_engines_seen"]:
        note("another duet engine was attached during some runs: its programs ran in both modes")
    if json_out:
        emit_json(report)
    else:
        render(report, rich=is_tty())
    if not report["ok"]:
        note("error: some page events were neither delivered nor counted as lost")
        raise typer.Exit(1)


@app.command("share")
def share(
    size: str = typer.Option("1G", "--size", help="Data set size (mixed file sizes)."),
    runs: int = typer.Option(3, "--runs", min=1, help="Repetitions (medians are reported)."),
    jobs: int = typer.Option(1, "--jobs", min=1, max=2, help="duet run --jobs for the tasks together."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Three read-everything tasks over a data set 4x the page cache they may use: alone in turn vs. one duet run.

    Exits 1 if duet reads more than 1.05x the data set from the device or takes more than 1.15x the slowest task
    alone.

    Examples:
      duet bench share
      duet bench share --size 2G --runs 5 --json
    """
    from duet_core.bench.share import run_share

    with err_console.status("starting") as status:
        report = run_share(size=parse_size(size), runs=runs, progress=status.update, jobs=jobs)
    if json_out:
        emit_json({k: v for k, v in report.items() if k != "samples"} | {"samples": report["samples"]})
    else:
        table = Table(title=f"duet bench share — {', '.join(report['tasks'])} over "
                            f"{units.format_bytes(report['dataset_bytes'])}, page cache capped at "
                            f"{units.format_bytes(report['cache_cap_bytes'])}, medians of {runs}",
                      title_justify="left")
        for col in ("", "device read", "x data set", "wall s", "CPU s"):
            table.add_column(col, justify="left" if not col else "right")
        table.add_row("each task alone, in turn", units.format_bytes(report["baseline_device_read_bytes"]),
                      f"{report['baseline_device_ratio']:.2f}", f"{report['baseline_wall_s']:.2f}",
                      f"{report['baseline_cpu_s']:.2f}")
        table.add_row("duet, together", units.format_bytes(report["duet_device_read_bytes"]),
                      f"{report['device_ratio']:.2f}", f"{report['duet_wall_s']:.2f}", f"{report['duet_cpu_s']:.2f}")
        console.print(table)
        console.print(f"slowest task alone: {report['baseline_slowest_task_wall_s']:.2f} s; duet/slowest: "
                      f"{report['wall_ratio_vs_slowest']:.2f}")
        for name, ok in report["targets"].items():
            console.print(f"target {name}: {'[green]met[/]' if ok else '[red]MISSED[/]'}")
    if not all(report["targets"].values()):
        raise typer.Exit(1)


@app.command("scale")
def scale(
    files: int = typer.Option(1_000_000, "--files", help="Number of small files in the scope."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """A million small files and four tasks: start-up rate, peak RSS, `duet status` time, and a no-op run.

    Exits 1 if start-up is slower than 50,000 files/s, peak RSS above 250 MB, `duet status` 1 s or more, or the
    no-op run 30 s or more.

    Examples:
      duet bench scale
      duet bench scale --files 100000 --json
    """
    from duet_core.bench.scale import run_scale

    with err_console.status("starting") as status:
        report = run_scale(files=files, progress=status.update)
    if json_out:
        emit_json(report)
    else:
        first, noop = report["first_run"], report["noop_run"]
        table = Table(title=f"duet bench scale — {report['files']:,} files, {len(report['tasks'])} tasks",
                      title_justify="left")
        for col in ("", "wall s", "scan+sync s", "plan s", "snapshot s", "start-up s", "CPU s (+child)",
                    "peak RSS (+child)"):
            table.add_column(col, justify="left" if not col else "right")
        for name, r in (("first run", first), ("no-op run", noop)):
            ph = r["phases"]
            table.add_row(name, f"{r['wall_s']:.1f}", f"{ph['scan_s']:.1f}", f"{ph['plan_s']:.1f}",
                          f"{ph.get('snapshot_s', 0):.1f}", f"{ph.get('startup_s', 0):.1f}",
                          f"{r['cpu_s']:.1f} (+{r['child_cpu_s']:.1f})",
                          f"{units.format_bytes(r['max_rss_bytes'])} (+{units.format_bytes(r['child_max_rss_bytes'])})")
        console.print(table)
        console.print(f"start-up rate {report['scan_files_per_s']:,} files/s; duet status {report['status_s']:.2f} s")
        for name, ok in report["targets"].items():
            console.print(f"target {name}: {'[green]met[/]' if ok else '[red]MISSED[/]'}")
    if not all(report["targets"].values()):
        raise typer.Exit(1)


@app.command("stop")
def stop(
    files: int = typer.Option(200_000, "--files", help="Number of small files in the large tree."),
    item_size: str = typer.Option("256M", "--item-size", help="Size of the long item (two files of it)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """How fast `duet run` honours SIGTERM: stops at spread moments of backup runs over a large tree, and in the
    middle of one large file for backup, scrub and gc.

    Needs the built-in tasks installed. Exits 1 if any stop takes a second or more, exits other than 5, prints a
    traceback, or counts the interrupted file as done.

    Examples:
      duet bench stop
      duet bench stop --files 1000000 --json
    """
    from duet_core.bench.stop import run_stop_bench

    with err_console.status("starting") as status:
        report = run_stop_bench(files=files, item_size=parse_size(item_size), progress=status.update)
    if json_out:
        emit_json(report)
    else:
        table = Table(title=f"duet bench stop — SIGTERM to duet run; {report['files']:,} files, and one "
                            f"{units.format_bytes(report['item_bytes'])} file at {report['item_rate']}",
                      title_justify="left")
        for col in ("run", "signal", "landed in", "files done", "exit", "stop s"):
            table.add_column(col, justify="right" if col in ("exit", "stop s") else "left")
        for t in report["tree"]:
            table.add_row("backup, tree", t["when"], t["landed_in"],
                          f"{t['files_done']:,}/{t['files_total']:,}", str(t["exit"]), f"{t['stop_s']:.3f}")
        for t in report["items"]:
            table.add_row(f"{t['task']}, 1 file", f"{report['item_delay_s']} s in", "a long item",
                          str(t["files_done"]), str(t["exit"]), f"{t['stop_s']:.3f}")
        console.print(table)
        for name, ok in report["targets"].items():
            console.print(f"target {name}: {'[green]met[/]' if ok else '[red]MISSED[/]'}")
    if not all(report["targets"].values()):
        raise typer.Exit(1)


@app.command("gc")
def gc(
    size: str = typer.Option("256M", "--size", help="Data set size (half of the files have an identical twin)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The gc task's deduplication: device reads alone, next to a hashing reader, and with half of it cached.

    Needs the gc task installed. Exits 1 if gc, next to a reader, reads more than the duplicates' bytes on top of
    the reader (the kernel's byte compare), re-hashes anything, or reclaims less than the duplicates.

    Examples:
      duet bench gc
      duet bench gc --size 1G --json
    """
    from duet_core.bench.gc import run_gc_bench

    with err_console.status("starting") as status:
        report = run_gc_bench(size=parse_size(size), progress=status.update)
    if json_out:
        emit_json(report)
    else:
        first = report["runs"][0]
        table = Table(title=f"duet bench gc — {units.format_bytes(first['dataset_bytes'])} in {first['files']} files, "
                            f"{units.format_bytes(report['duplicate_bytes'])} duplicated, btrfs",
                      title_justify="left")
        for col in ("run", "device read", "hashed", "hashes reused", "reclaimed", "wall s"):
            table.add_column(col, justify="left" if col == "run" else "right")
        for r in report["runs"]:
            table.add_row(r["name"], units.format_bytes(r["device_read_bytes"]), str(r["hashed_files"]),
                          str(r["hash_reused_files"]), units.format_bytes(r["reclaimed_bytes"]), f"{r['wall_s']:.2f}")
        console.print(table)
        for name, ok in report["targets"].items():
            console.print(f"target {name}: {'[green]met[/]' if ok else '[red]MISSED[/]'}")
    if not all(report["targets"].values()):
        raise typer.Exit(1)


@app.command("defrag")
def defrag(
    files: int = typer.Option(32, "--files", min=2, help="Fragmented files in the data set."),
    file_size: str = typer.Option("4MiB", "--file-size", help="Size of each file."),
    chunk: str = typer.Option("64KiB", "--chunk", help="Files are written round-robin in fsynced chunks this big."),
    runs: int = typer.Option(3, "--runs", min=1, help="Repetitions (medians are reported)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The defrag task over a fragmented data set with none, half or all of it cached, and btrfs-progs for reference.

    Exits 1 if a cached file costs a device read, or if the files do not end near one extent each.

    Examples:
      duet bench defrag
      duet bench defrag --files 64 --file-size 8MiB --json
    """
    from duet_core.bench.defrag import SCENARIOS, run_defrag_bench

    with err_console.status("starting") as status:
        report = run_defrag_bench(files=files, file_size=parse_size(file_size), chunk=parse_size(chunk), runs=runs,
                                  progress=status.update)
    if json_out:
        emit_json(report)
    else:
        cfg = report["config"]
        table = Table(title=f"duet bench defrag — {cfg['files']} files of {units.format_bytes(cfg['file_size'])} "
                            f"written in {units.format_bytes(cfg['chunk'])} chunks, btrfs, medians of {runs}",
                      title_justify="left")
        for col in ("", "device read", "vs cold", "wall s", "extents before", "after"):
            table.add_column(col, justify="left" if not col else "right")
        for s in SCENARIOS:
            m = report["medians"][s]
            table.add_row(s, units.format_bytes(m["device_read_bytes"]), f"{report['device_ratio_vs_cold'][s]:.2f}",
                          f"{m['wall_s']:.2f}", f"{m['extents_before']:,.0f}", f"{m['extents_after']:,.0f}")
        console.print(table)
        console.print(f"duet cold / btrfs-progs cold wall time: {report['wall_ratio_vs_btrfs_progs']:.2f}; "
                      f"without duet's start ({report['duet_start_s']:.2f} s over an empty directory): "
                      f"{report['work_ratio_vs_btrfs_progs']:.2f}")
        for name, ok in report["targets"].items():
            console.print(f"target {name}: {'[green]met[/]' if ok else '[red]MISSED[/]'}")
    if not all(report["targets"].values()):
        raise typer.Exit(1)


@app.command("scrub")
def scrub(
    size: str = typer.Option("1G", "--size", help="Data set size (mixed file sizes)."),
    runs: int = typer.Option(3, "--runs", min=1, help="Repetitions (medians are reported)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    layout: str = typer.Option("mixed", "--layout", help="mixed (as bench share: many small files) or large."),
) -> None:
    """duet's scrub against `btrfs scrub start -B` on one btrfs image: cold, and with a foreground reader.

    Exits 1 if cold duet takes more than 1.5x btrfs scrub's time, or if with half the data set read by a
    foreground program the scrub reads more than 55% of it from the device.

    Examples:
      duet bench scrub
      duet bench scrub --layout large --runs 1 --json
    """
    from duet_core.bench.scrub import run_scrub_bench

    with err_console.status("starting") as status:
        if layout not in ("mixed", "large"):
            raise DuetError(f"unknown layout {layout!r}", hint="--layout mixed or --layout large")
        report = run_scrub_bench(size=parse_size(size), runs=runs, layout=layout, progress=status.update)
    if json_out:
        emit_json(report)
    else:
        table = Table(title=f"duet bench scrub — btrfs, {units.format_bytes(report['dataset_bytes'])} in "
                            f"{report['files']} files ({layout}), medians of {runs}", title_justify="left")
        for col in ("", "wall s", "device read", "x data set"):
            table.add_column(col, justify="left" if not col else "right")
        ds = report["dataset_bytes"]
        table.add_row("btrfs scrub start -B, cold", f"{report['btrfs_scrub_wall_s']:.2f}",
                      units.format_bytes(report["btrfs_scrub_device_read_bytes"]),
                      f"{report['btrfs_scrub_device_read_bytes'] / ds:.2f}")
        table.add_row(f"duet run scrub, cold (run alone {report['duet_cold_run_wall_s']:.2f} s)",
                      f"{report['duet_cold_wall_s']:.2f}", units.format_bytes(report["duet_cold_device_read_bytes"]),
                      f"{report['duet_cold_device_read_bytes'] / ds:.2f}")
        table.add_row("cat of every file, one after the other, cold", f"{report['plain_read_wall_s']:.2f}",
                      "", "")
        table.add_row(f"duet run scrub, {report['foreground_reader_bytes'] / ds:.0%} read by a foreground reader",
                      f"{report['foreground_wall_s']:.2f}",
                      f"scrub: {report['foreground_scrub_device_share']:.0%}",
                      f"{report['foreground_total_device_ratio']:.2f} (all)")
        console.print(table)
        console.print(f"cold: duet/btrfs scrub {report['cold_ratio']:.2f} (run alone {report['cold_run_ratio']:.2f}); "
                      f"cat/btrfs scrub {report['plain_read_ratio']:.2f}")
        for name, ok in report["targets"].items():
            console.print(f"target {name}: {'[green]met[/]' if ok else '[red]MISSED[/]'}")
    if not all(report["targets"].values()):
        raise typer.Exit(1)


@app.command("backup")
def backup(
    size: str = typer.Option("1G", "--size", help="Data set size (mixed file sizes)."),
    target_fs: str = typer.Option("ext4", "--target-fs", help="Filesystem of both targets: ext4 or btrfs."),
    runs: int = typer.Option(1, "--runs", min=1, help="Repetitions (medians are reported)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """duet run backup vs rsync -a: initial backup of a mixed data set, then a no-change rerun.

    Needs the backup plugin installed. Exits 1 if duet is slower than rsync -a on either run.

    Examples:
      duet bench backup
      duet bench backup --target-fs btrfs --size 256M --json
    """
    from duet_core.bench.backup import run_backup_bench

    if target_fs not in ("ext4", "btrfs"):
        raise DuetError(f"--target-fs must be ext4 or btrfs, not {target_fs!r}")
    with err_console.status("starting") as status:
        report = run_backup_bench(size=parse_size(size), target_fs=target_fs, runs=runs, progress=status.update)
    if json_out:
        emit_json(report)
    else:
        table = Table(title=f"duet bench backup — {units.format_bytes(report['dataset_bytes'])} in "
                            f"{report['files']:,} files, btrfs → {target_fs}, medians of {runs}",
                      title_justify="left")
        for col in ("", "rsync -a s", "rsync -a + sync s", "duet s", "duet / rsync"):
            table.add_column(col, justify="left" if not col else "right")
        table.add_row("initial backup", f"{report['rsync_initial_s']:.2f}",
                      f"{report['rsync_initial_with_sync_s']:.2f}", f"{report['duet_initial_s']:.2f}",
                      f"{report['initial_ratio']:.2f}")
        table.add_row("no-change rerun", f"{report['rsync_rerun_s']:.2f}", "", f"{report['duet_rerun_s']:.2f}",
                      f"{report['rerun_ratio']:.2f}")
        console.print(table)
        console.print(f"duet --no-idle-io --no-cache-hygiene: initial {report['duet_unthrottled_initial_s']:.2f} s, "
                      f"no-change rerun {report['duet_unthrottled_rerun_s']:.2f} s")
        console.print(f"duet no-change rerun: {report['duet_rerun_in_run_s']:.2f} s inside the run (scan, plan, "
                      "finish), the rest is the process starting and exiting")
        console.print(f"duet no-change rerun read {units.format_bytes(report['duet_rerun_device_read_bytes'])} "
                      f"from the device")
        console.print(f"duet verify of the newest snapshot: {report['verify_s']:.2f} s, cat of the same files "
                      f"{report['read_all_s']:.2f} s ({report['verify_ratio']:.2f} x)")
        for name, ok in report["targets"].items():
            console.print(f"target {name}: {'[green]met[/]' if ok else '[red]MISSED[/]'}")
    if not all(report["targets"].values()):
        raise typer.Exit(1)


def _targets(report: dict) -> None:
    for name, ok in report["targets"].items():
        console.print(f"target {name}: {'[green]met[/]' if ok else '[red]MISSED[/]'}")


def _maintenance_bench(name: str, run, render, json_out: bool, plot: str | None, title: str, **kwargs) -> None:
    """Run a maintenance bench (together, piggyback, peers) with progress, show or print its report, write its
    plot, and exit 1 when a target is missed."""
    from duet_core.bench import plot as plots

    if plot and not os.access(os.path.dirname(os.path.abspath(plot)), os.W_OK):   # known before minutes of work
        raise DuetError(f"cannot write the plot to {plot}: its directory does not exist or is not writable")
    with err_console.status("starting") as status:
        report = run(progress=status.update, **kwargs)
    if json_out:
        emit_json(report)
    else:
        render(report)
        _targets(report)
    if plot:
        plots.plot(plot, f"duet bench {name} — {units.format_bytes(report['dataset_bytes'])} data set, {title}",
                   getattr(plots, f"{name}_panels")(report))
        note(f"plot written to {plot}")
    if not all(report["targets"].values()):
        raise typer.Exit(1)


def render_together(report: dict) -> None:
    """The `together` table: each task alone, their sum, and duet's one run (also shown by `duet demo`)."""
    ds = report["dataset_bytes"]
    table = Table(title=f"duet bench together — {', '.join(report['tasks'])} over "
                        f"{units.format_bytes(ds)} in {report['files']:,} files, btrfs, page cache capped at "
                        f"{units.format_bytes(report['cache_cap_bytes'])}", title_justify="left")
    for col in ("", "device read", "x data set", "process read", "wall s", "CPU s"):
        table.add_column(col, justify="left" if not col else "right")

    def row(name: str, dev: int, proc: int, wall: float, cpu: float, style: str = "") -> None:
        table.add_row(name, units.format_bytes(dev), f"{dev / ds:.2f}", units.format_bytes(proc), f"{wall:.2f}",
                      f"{cpu:.2f}", style=style)

    for r in report["baseline"]:
        row(f"duet run {r['tasks'][0]} (alone)", r["device_read_bytes"], r["process_read_bytes"], r["wall_s"],
            r["cpu_s"])
    row("each alone, in turn", report["baseline_device_read_bytes"], report["baseline_process_read_bytes"],
        report["baseline_wall_s"], report["baseline_cpu_s"], style="bold")
    d = report["duet"]
    row(f"duet run {' '.join(report['tasks'])}", d["device_read_bytes"], d["process_read_bytes"], d["wall_s"],
        d["cpu_s"], style="bold blue")
    console.print(table)
    console.print(f"duet together read {report['duet_vs_baseline_device']:.0%} of what the tasks alone read, in "
                  f"{report['duet_wall_vs_slowest']:.2f}x the time of the slowest task alone")


@app.command("together")
def together(
    size: str = typer.Option("512M", "--size", help="Data set size (mixed file sizes, fragmented files, twins)."),
    jobs: int = typer.Option(1, "--jobs", min=1, max=2, help="duet run --jobs for the four tasks together."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: str = typer.Option(None, "--plot", help="Write grouped bars of device reads and wall time to this PNG."),
) -> None:
    """backup, scrub, defrag and gc over one data set: each alone in turn vs. one duet run of all four.

    The page cache is capped at a quarter of the data set. Exits 1 if duet reads more than 1.05x the data set from
    the device or takes more than 1.15x the slowest task alone.

    Examples:
      duet bench together
      duet bench together --size 1G --json --plot together.png
    """
    from duet_core.bench.together import run_together

    _maintenance_bench("together", run_together, render_together, json_out, plot, "page cache capped at 1/4",
                       size=parse_size(size), jobs=jobs)


def render_piggyback(report: dict) -> None:
    ds = report["dataset_bytes"]
    table = Table(title=f"duet bench piggyback — {', '.join(report['tasks'])} over {units.format_bytes(ds)}, "
                        f"fio zipf reads in the foreground (f = {report['foreground_fraction']:.2f})",
                  title_justify="left")
    for col in ("", "duet read", "x data set", "fio read", "fio MB/s", "loop device read", "wall s"):
        table.add_column(col, justify="left" if not col else "right")
    fa, da, fb, db = (report[k] for k in ("fio_alone", "duet_alone", "fio_with_duet", "duet_with_fio"))
    table.add_row("fio alone", "", "", units.format_bytes(fa["process_read_bytes"]),
                  f"{fa['bw_bytes_per_s'] / 1e6:.0f}", units.format_bytes(fa["device_read_bytes"]),
                  f"{fa['wall_s']:.2f}")
    table.add_row("duet alone", units.format_bytes(da["process_read_bytes"]),
                  f"{da['process_read_bytes'] / ds:.2f}", "", "", units.format_bytes(da["device_read_bytes"]),
                  f"{da['wall_s']:.2f}")
    table.add_row("duet with fio at the same time", units.format_bytes(db["process_read_bytes"]),
                  f"{report['maintenance_ratio']:.2f}", units.format_bytes(fb["process_read_bytes"]),
                  f"{fb['bw_bytes_per_s'] / 1e6:.0f}", units.format_bytes(report["duet_device_read_bytes"]),
                  f"{report['duet_wall_s']:.2f}", style="bold blue")
    console.print(table)
    each = ", ".join(f"{s:+.1%}" for s in report["foreground_slowdowns"])
    console.print(f"maintenance read {report['maintenance_ratio']:.2f}x the data set (target "
                  f"{report['maintenance_target_ratio']:.2f}x); fio {report['foreground_slowdown']:+.1%} slower "
                  f"with duet running (median of {report['runs']}: {each})")


@app.command("piggyback")
def piggyback(
    size: str = typer.Option("512M", "--size", help="Data set size (as `together`)."),
    fraction: float = typer.Option(2.0, "--fraction", help="fio's requests, as a multiple of the data set size "
                                   "(zipf repeats hot blocks: the distinct part f it reads is measured)."),
    runs: int = typer.Option(3, "--runs", min=1, help="Repetitions of fio alone and fio with duet, each pair on a "
                             "fresh copy (the one with the median slowdown is reported)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: str = typer.Option(None, "--plot", help="Write grouped bars of device reads, throughput and wall time."),
) -> None:
    """The four tasks in one duet run while fio reads part of the same data (zipf random reads), against each alone.

    Exits 1 if the maintenance reads more than (1 - f) + 0.05 of the data set from the device, f being the part
    fio reads (in any repetition), or if fio is more than 5% slower than alone (the median of the repetitions).

    Examples:
      duet bench piggyback
      duet bench piggyback --size 1G --fraction 1 --runs 5 --json --plot piggyback.png
    """
    from duet_core.bench.piggyback import run_piggyback

    _maintenance_bench("piggyback", run_piggyback, render_piggyback, json_out, plot, "fio in the foreground",
                       size=parse_size(size), fraction=fraction, runs=runs)


def render_peers(report: dict) -> None:
    ds = report["dataset_bytes"]
    table = Table(title=f"duet bench peers — {units.format_bytes(ds)} in {report['files']:,} files, btrfs, page "
                        f"cache capped at {units.format_bytes(report['cache_cap_bytes'])}", title_justify="left")
    for col in ("", "device read", "x data set", "process read", "wall s", "CPU s", "duet / peer"):
        table.add_column(col, justify="left" if not col else "right")

    def row(name: str, r: dict, ratio: str = "", style: str = "") -> None:
        table.add_row(name, units.format_bytes(r["device_read_bytes"]), f"{r['device_read_bytes'] / ds:.2f}",
                      units.format_bytes(r["process_read_bytes"]), f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                      ratio, style=style)

    for job, j in report["jobs"].items():
        if j["peer"]:
            row(j["peer"]["name"], j["peer"])
        else:
            table.add_row(f"{job}: duperemove is not installed", "", "", "", "", "", "")
        row(f"duet run {j['duet_task']}", j["duet"], f"{j['wall_ratio']:.2f}" if j["wall_ratio"] else "",
            style="blue")
    row("the peers, in turn", {k: report[f"baseline_{k}"] for k in
                               ("device_read_bytes", "process_read_bytes", "wall_s", "cpu_s")}, style="bold")
    row(f"duet run {' '.join(report['tasks'])}", report["together"],
        f"{report['duet_wall_s'] / report['baseline_wall_s']:.2f}", style="bold blue")
    console.print(table)


@app.command("peers")
def peers(
    size: str = typer.Option("512M", "--size", help="Data set size (as `together`)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: str = typer.Option(None, "--plot", help="Write grouped bars of device reads and wall time to this PNG."),
) -> None:
    """Each duet task alone against its peer tool (rsync -a, btrfs scrub, btrfs filesystem defragment, duperemove),
    and duet's run of all four against the four tools in turn: same data set, same run.

    Exits 1 if duet's backup is slower than rsync -a or its scrub takes more than 1.5x btrfs scrub's time.

    Examples:
      duet bench peers
      duet bench peers --size 1G --json --plot peers.png
    """
    from duet_core.bench.peers import run_peers

    _maintenance_bench("peers", run_peers, render_peers, json_out, plot, "each tool alone", size=parse_size(size))
