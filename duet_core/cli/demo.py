"""``duet demo``: the engine on built-in demo data, end to end, in under a minute.

Makes a btrfs loop image with a home directory (one subvolume per user, and a snapshot — so several files share
an inode number), drops it from the cache, then watches it live while a scripted "foreground" cold-reads part of
the data, writes and fsyncs a file and evicts another. At the end it checks the engine's counts against what the
script did. Then it shows the point of all this: ``duet bench together`` at a small size — backup, scrub, defrag
and gc alone in turn, against one duet run of the four (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import typer

from duet_core import residency
from duet_core.cli.bench import parse_size, render_together
from duet_core.cli.output import console, err_console, note
from duet_core.errors import DuetError
from duet_core.events import EVENTS, PAGE_SIZE
from duet_core.loopfs import loop_fs

USERS = {"alice": [4, 4, 2, 2, 1, 1], "bob": [8, 2, 1]}   # file sizes in MiB


def _make_data(mnt: str) -> dict[str, int]:
    """The demo data set; returns {relative path: size}."""
    home = os.path.join(mnt, "home")
    os.mkdir(home)
    files = {}
    for user, sizes in USERS.items():
        subprocess.run(["btrfs", "-q", "subvolume", "create", os.path.join(home, user)], check=True)
        for i, mib in enumerate(sizes):
            rel = f"home/{user}/file{i}.dat"
            with open(os.path.join(mnt, rel), "wb") as fh:
                fh.write(os.urandom(mib << 20))
            files[rel] = mib << 20
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", os.path.join(home, "alice"),
                    os.path.join(home, "alice-snap")], check=True)
    os.sync()
    return files


def _evict_all(mnt: str) -> None:
    for dirpath, _dirs, names in os.walk(mnt):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            residency.evict(fd)
            os.close(fd)


def _foreground(mnt: str, log: list[str]) -> None:
    """What an application might do meanwhile: the timeline the demo then checks."""
    time.sleep(1.0)
    for rel in ("home/alice/file0.dat", "home/alice/file2.dat", "home/bob/file1.dat"):
        with open(os.path.join(mnt, rel), "rb") as fh:
            fh.read()
        log.append(f"read {rel}")
    time.sleep(1.5)
    path = os.path.join(mnt, "home/bob/notes.txt")
    with open(path, "wb") as fh:
        fh.write(b"duet demo\n" * 10000)
        fh.flush()
        os.fsync(fh.fileno())
    log.append("wrote and fsynced home/bob/notes.txt")
    time.sleep(1.5)
    fd = os.open(os.path.join(mnt, "home/alice/file2.dat"), os.O_RDONLY)
    residency.evict(fd)
    os.close(fd)
    log.append("evicted home/alice/file2.dat")


def demo(
    seconds: float = typer.Option(6.0, "--seconds", help="How long to watch."),
    source: str = typer.Option("auto", "--source", help="auto, bpf or poll."),
    together_size: str = typer.Option("128M", "--together-size",
                                      help="Data set of the `duet bench together` part (0: skip it)."),
) -> None:
    """Watch page-cache events on a demo btrfs image while a scripted foreground reads and writes it.

    Examples:
      duet demo
      duet demo --seconds 20 --source poll
      duet demo --together-size 0
    """
    # Imported here, not at the top: every duet command imports this module to build the command line.
    from duet_core.bench.together import MIN_SIZE
    from duet_core.cli.events import run_view
    from duet_core.engine import Engine

    if os.geteuid() != 0:
        raise DuetError("the demo mounts a loop image and needs root")
    size = parse_size(together_size)
    if 0 < size < MIN_SIZE:
        raise DuetError(f"--together-size must be 0 (skip it) or at least {MIN_SIZE >> 20}MiB")
    console.print("[bold]duet demo[/]: a btrfs image with /home/alice, /home/bob (subvolumes) and a snapshot")
    with loop_fs("btrfs", size_mb=512, prefix="duet-demo-") as fs:
        files = _make_data(fs.mnt)
        _evict_all(fs.mnt)
        console.print(f"{len(files)} files, {sum(files.values()) >> 20} MiB, all evicted from the page cache")
        with Engine(source=source) as engine:
            if engine.source_warning:
                note(engine.source_warning)
            reg = engine.register("demo", EVENTS, fs.mnt)
            console.print(f"engine source: [bold]{engine.source_name}[/]; watching {len(reg.scope.files)} files")
            log: list[str] = []
            worker = threading.Thread(target=_foreground, args=(fs.mnt, log), daemon=True)
            worker.start()
            rows = run_view(engine, reg, seconds, 0.5, json_out=False)
            worker.join()
            engine.unregister(reg)
        for line in log:
            console.print(f"foreground: {line}")
        by_path = {os.path.relpath(r.path, fs.mnt): r.total for r in rows.values()}
        ok = True
        for rel in ("home/alice/file0.dat", "home/alice/file2.dat", "home/bob/file1.dat"):
            want = files[rel] // PAGE_SIZE
            got = by_path.get(rel, {}).get("added", 0)
            ok &= got == want
            console.print(f"check: {rel}: {got} pages added, file has {want}: {'ok' if got == want else 'MISMATCH'}")
        snap = by_path.get("home/alice-snap/file0.dat", {}).get("added", 0)
        console.print(f"check: the snapshot's file0.dat (same inode number as alice's) saw {snap} pages: "
                      + ("ok" if snap == 0 else "MISMATCH"))
        ok &= snap == 0
        notes = by_path.get("home/bob/notes.txt", {})
        console.print(f"check: notes.txt dirtied {notes.get('dirtied', 0)}, flushed {notes.get('flushed', 0)}")
        if not ok:
            raise DuetError("the demo's checks failed")
    if size:
        _together(size)
    console.print("[green]demo ok[/]")


def _together(size: int) -> None:
    """A short ``duet bench together``: what sharing one device read saves, on a fresh data set."""
    from duet_core.bench.together import run_together

    console.print(f"\n[bold]duet bench together --size {size >> 20}M[/]: backup, scrub, defrag and gc over one data "
                  "set, page cache capped at a quarter of it — each alone in turn, then in one duet run")
    with err_console.status("starting") as status:
        report = run_together(size=size, progress=status.update)
    render_together(report)
