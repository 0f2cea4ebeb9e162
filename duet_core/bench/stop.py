"""``duet bench stop``: how fast ``duet run`` honours SIGTERM, in every phase, on a large tree and in a long item.

Two parts, each a real ``duet run`` process of the installed built-in tasks over loop filesystems, stopped with
SIGTERM and timed from the signal to the process's exit (what a service manager waits for):

* **a large tree** — N small files on ext4 (cold: the image is mounted again first), backed up to btrfs: a run is
  started again and again and stopped at spread moments after it began (the first scan, the rescans of later runs,
  the planning, the start-up snapshot, the copies), and once more when every copy is durable (the sync pass of
  ``duet_finish``). Each stop's phase is read from the summary.
* **one long item** — two files of the same size (256 MiB by default) on btrfs over a direct-I/O loop device, read
  at ``--rate-limit``: backup, scrub and gc (the two same-size files make gc hash one) each stopped in the middle of
  the first file.

Target: every stop within a second, exit 5 every time, and no item counted done when it was interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

from duet_core.bench.scale import make_files
from duet_core.errors import DuetError
from duet_core.loopfs import loop_fs, unmount
from duet_core.scheduler import EXIT_STOPPED

TARGET_S = 1.0
TREE_DELAYS = (0.05, 0.3, 0.6, 1.0, 1.5, 2.5, 4.0, 6.0, 9.0)   # seconds after the run began
ITEM_DELAY = 1.5
ITEM_RATE = "32MB/s"


def _duet(*args: str) -> list[str]:
    return [sys.executable, "-m", "duet_core.cli.main", *args]


def run_started(state_dir: str) -> bool:
    """A run has recorded its start in ``state_dir`` (a ``runs`` row without an end: it is past loading plugins
    and config, into the scan). Also used by the tests."""
    path = os.path.join(state_dir, "state.db")
    if not os.path.exists(path):
        return False
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.05)
        try:
            return db.execute("SELECT 1 FROM runs WHERE ended IS NULL").fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:
        return False


def _landed_in(summary: dict) -> str:
    """The phase a stop ended, from what the summary says was completed."""
    phases = summary.get("phases", {})
    for key, name in (("scan_s", "scan"), ("plan_s", "planning"), ("startup_s", "start-up snapshot")):
        if key not in phases:
            return name
    if any(t["items_done"] < t["items_total"] for t in summary["tasks"].values()):
        return "processing"
    return "finishing"


def _stop_at(argv: list[str], state_dir: str, delay: float = 0.0, ready=None) -> dict:
    """Start ``argv``, SIGTERM it ``delay`` s after it began (or once ``ready()``); its exit code, the seconds it
    took from the signal to its exit, and its summary."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 600
        while not (ready or (lambda: run_started(state_dir)))() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.002)
        time.sleep(delay)
        t0 = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    try:
        summary = json.loads(out.splitlines()[-1])
    except (IndexError, ValueError):
        raise DuetError(f"duet run printed no summary (exit {proc.returncode}): {err.strip()[-300:]}") from None
    return {"exit": proc.returncode, "stop_s": round(took, 3), "summary": summary,
            "traceback": "Traceback" in err}


def run_stop_bench(files: int = 200_000, item_size: int = 256 << 20, progress=None) -> dict:
    if os.geteuid() != 0:
        raise DuetError("duet bench stop needs root (loop devices, BPF)")
    say = progress or (lambda _msg: None)
    tree, items = [], []
    size_mb = max(512, files * 6 // 1024)
    with loop_fs("ext4", size_mb=size_mb, mkfs_args=["-N", str(files + files // 8 + 1000)],
                 prefix="duet-bench-") as src, loop_fs("btrfs", size_mb=size_mb, prefix="duet-bench-") as tgt:
        root = os.path.join(src.mnt, "data")
        os.mkdir(root)
        make_files(root, files, say)
        unmount(src.mnt)
        subprocess.run(["mount", "-t", "ext4", src.loopdev, src.mnt], check=True)
        state = os.path.join(os.path.dirname(src.mnt), "state")
        config = os.path.join(os.path.dirname(src.mnt), "empty.toml")
        open(config, "w").close()
        argv = _duet("run", "backup", "--path", root, "--target", tgt.mnt, "--json", "--state-dir", state,
                     "--config", config)
        runs = [(f"{delay} s in", {"delay": delay}) for delay in TREE_DELAYS]
        # ... and once every copy is journaled: inside duet_finish's sync pass over the whole tree.
        runs.append(("all copied", {"ready": lambda: journal_lines(tgt.mnt) >= files}))
        for when, how in runs:
            say(f"{files:,} files: SIGTERM to a backup run, {when}")
            r = _stop_at(argv, state, **how)
            if r["exit"] == 0:
                continue          # finished before the signal: nothing to time
            rep = r["summary"]["tasks"]["backup"]
            tree.append({"when": when, "landed_in": _landed_in(r["summary"]), "exit": r["exit"],
                         "stop_s": r["stop_s"], "traceback": r["traceback"],
                         "files_done": rep["items_done"], "files_total": rep["items_total"]})
    with loop_fs("btrfs", size_mb=max(512, 3 * (item_size >> 20)), direct_io=True, prefix="duet-bench-") as fs, \
            loop_fs("ext4", size_mb=max(512, 2 * (item_size >> 20)), prefix="duet-bench-") as tgt:
        root = os.path.join(fs.mnt, "data")
        os.mkdir(root)
        for name in ("big1", "big2"):
            say(f"writing {name}")
            _write_uncached(os.path.join(root, name), item_size)
        config = os.path.join(os.path.dirname(fs.mnt), "empty.toml")
        open(config, "w").close()
        for task in ("backup", "scrub", "gc"):
            say(f"{task}: SIGTERM {ITEM_DELAY} s into a {item_size >> 20} MiB file at {ITEM_RATE}")
            state = os.path.join(os.path.dirname(fs.mnt), f"state-{task}")
            extra = ("--target", tgt.mnt) if task == "backup" else ()
            r = _stop_at(_duet("run", task, "--path", root, *extra, "--json", "--rate-limit", ITEM_RATE,
                               "--state-dir", state, "--config", config), state, ITEM_DELAY)
            rep = r["summary"]["tasks"][task]
            items.append({"task": task, "exit": r["exit"], "stop_s": r["stop_s"], "traceback": r["traceback"],
                          "files_done": rep["items_done"], "bytes_processed": rep["bytes_processed"]})
    stops = tree + items
    report = {"scenario": "stop", "files": files, "item_bytes": item_size, "item_rate": ITEM_RATE,
              "item_delay_s": ITEM_DELAY,
              "tree": tree, "items": items,
              "max_stop_s": max((s["stop_s"] for s in stops), default=None),
              "phases_hit": sorted({s["landed_in"] for s in tree})}
    report["targets"] = {
        "every_stop_within_1s": bool(stops) and all(s["stop_s"] < TARGET_S for s in stops),
        "every_stop_exits_5_without_traceback": all(s["exit"] == EXIT_STOPPED and not s["traceback"] for s in stops),
        "no_interrupted_item_counted_done": all(s["files_done"] == 0 for s in items),
    }
    return report


def journal_lines(target: str) -> int:
    """Copies the backup task made durable in ``target`` (one line each in its journal; also used by the tests)."""
    try:
        with open(os.path.join(target, ".duet", "journal"), "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _write_uncached(path: str, size: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(size >> 20):
            fh.write(os.urandom(1 << 20))
        fh.flush()
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


if __name__ == "__main__":   # python -m duet_core.bench.stop [files]
    print(json.dumps(run_stop_bench(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000), indent=1))
