"""``duet bench scrub``: duet's scrub against ``btrfs scrub start -B`` on the same btrfs filesystem, same run.

A btrfs image on a direct-I/O loop device (so the loop device's read counter is what reached the "disk") holds a
data set of mixed file sizes (the one ``duet bench share`` uses). Two scenarios, alternating in every repetition:

* **cold** — nothing of the data set is cached (every file evicted, one by one: the global page cache is never
  dropped, other people's page-cache experiments share this machine). ``btrfs scrub start -B`` and
  ``duet run scrub --every 0`` each verify everything; both wall times are taken around the command, so duet's
  includes Python's start-up and loading the BPF programs (``run_wall_s`` is the run alone).
* **foreground** — the same duet scrub while a foreground reader reads half of the data set (the files the scrub
  would come to last, largest file id first) as soon as the scrub has started: those pages are verified by the
  kernel as they are read, so the scrub should read only the other half from the device.

A third command runs cold in every repetition for reference: ``cat`` of every file (in the scrub's order, output to
/dev/null) — a plain file-by-file read, one file at a time, with no per-file work of its own. It shows what reading
by file costs against btrfs scrub's reading of the device in physical order; duet's scrub keeps several files'
reads in flight and can beat it.

``--layout large`` uses only large files (16–48 MiB), to separate the cost per byte from the cost per file.

Targets (docs/benchmarks.md, "scrub"): cold, duet within 1.5x of btrfs scrub's time; foreground, duet's scrub reads
at most 55% of the data set from the device.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

from duet_core import residency
from duet_core.bench.share import loop_read_bytes, make_dataset
from duet_core.errors import DuetError
from duet_core.loopfs import loop_fs
from duet_core.testing import evict_tree

COLD_RATIO = 1.5
FOREGROUND_DEVICE_SHARE = 0.55


def make_large_files(root: str, size: int, seed: int = 1) -> int:
    """Only large files (16–48 MiB of random data): what the per-byte path costs, without per-file overheads."""
    import random

    rnd = random.Random(seed)
    written, n = 0, 0
    while written < size:
        fsize = min(size - written, rnd.randint(16 << 20, 48 << 20))
        with open(os.path.join(root, f"f{n:04d}"), "wb") as fh:
            for pos in range(0, fsize, 1 << 20):
                fh.write(os.urandom(min(1 << 20, fsize - pos)))
        written += fsize
        n += 1
    os.sync()
    return written


def cached_tree_bytes(root: str) -> int:
    """How many bytes of ``root``'s files are in the page cache now (cachestat, file by file)."""
    pages = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                pages += residency.resident_count(fd)
            finally:
                os.close(fd)
    return pages * residency.PAGE_SIZE


def btrfs_scrub(mnt: str, loopdev: str) -> dict:
    """``btrfs scrub start -B`` of the whole filesystem: wall time and bytes read from the loop device."""
    before, t0 = loop_read_bytes(loopdev), time.monotonic()
    proc = subprocess.run(["btrfs", "scrub", "start", "-B", mnt], capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise DuetError(f"btrfs scrub failed: {proc.stderr.strip()}")
    return {"wall_s": round(wall, 3), "device_read_bytes": loop_read_bytes(loopdev) - before}


CAT_BATCH = 1000          # paths per cat process (far below ARG_MAX)


def plain_read(paths: list[str], loopdev: str) -> dict:
    """``cat`` of every file of ``paths`` to /dev/null (argv lists, no shell): wall time and device reads."""
    before, t0 = loop_read_bytes(loopdev), time.monotonic()
    with open(os.devnull, "wb") as null:
        for i in range(0, len(paths), CAT_BATCH):
            subprocess.run(["cat", "--", *paths[i:i + CAT_BATCH]], stdout=null, check=True)
    return {"wall_s": round(time.monotonic() - t0, 3), "device_read_bytes": loop_read_bytes(loopdev) - before}


def duet_scrub(root: str, state_dir: str, config: str, loopdev: str, reader_files: list[str] | None = None) -> dict:
    """One ``duet run scrub --every 0`` as a user runs it; with ``reader_files``, a foreground reader reads them
    once the scrub has started reading (the engine is attached by then)."""
    argv = [sys.executable, "-m", "duet_core.cli.main", "run", "scrub", "--path", root, "--json", "--every", "0",
            "--state-dir", state_dir, "--config", config]
    before, t0 = loop_read_bytes(loopdev), time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader_bytes = 0
    if reader_files:
        while loop_read_bytes(loopdev) - before < (1 << 20) and proc.poll() is None:
            time.sleep(0.002)
        for path in reader_files:
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    reader_bytes += len(chunk)
    out, err = proc.communicate()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise DuetError(f"duet run scrub failed (exit {proc.returncode}): {err.strip()[-800:]}")
    summary = json.loads(out)
    task = summary["tasks"]["scrub"]
    return {"wall_s": round(wall, 3), "run_wall_s": summary["wall_s"],
            "device_read_bytes": loop_read_bytes(loopdev) - before,
            "scrub_from_device_bytes": task["bytes_from_device"], "scrub_from_cache_bytes": task["bytes_from_cache"],
            "pages_observed": task["counters"].get("pages_observed", 0), "reader_bytes": reader_bytes,
            "kernel_scrub": task["counters"].get("kernel_scrub", 0),
            "kernel_scrub_gave_way": task["counters"].get("kernel_scrub_gave_way", 0),
            "phases": summary.get("phases", {})}   # start-up inside the run: BPF, scan, planning (duet's fixed cost)


def scan_order(state_dir: str, root: str) -> list[tuple[str, int]]:
    """(path, size) of the scope's files in file-id order: the order the scrub reads uncached files in."""
    db = sqlite3.connect(os.path.join(state_dir, "state.db"))
    try:
        (sid,) = db.execute("SELECT id FROM scopes WHERE root=?", (os.path.realpath(root),)).fetchone()
        rows = db.execute("SELECT relpath, size FROM files WHERE scope_id=? ORDER BY id", (sid,)).fetchall()
    finally:
        db.close()
    return [(os.path.join(root, rel), size) for rel, size in rows]


def scan_order_fallback(root: str) -> list[tuple[str, int]]:
    """Before duet has scanned: every file under ``root``, in walk order."""
    return [(os.path.join(d, n), 0) for d, _dirs, names in os.walk(root) for n in sorted(names)]


def last_half(order: list[tuple[str, int]], dataset: int) -> list[str]:
    """The files the scrub comes to last, largest id first, as near half the data set as whole files come: the
    file that crosses the half is taken if that brings the total nearer (with 16-48 MiB files, stopping short of
    the half could leave the reader well under it)."""
    chosen, total, half = [], 0, dataset // 2
    for path, size in reversed(order):
        if total + size > half:
            if total + size - half < half - total:
                chosen.append(path)
            break
        chosen.append(path)
        total += size
    return chosen


def run_scrub_bench(size: int = 1 << 30, runs: int = 3, layout: str = "mixed", progress=None) -> dict:
    if os.geteuid() != 0:
        raise DuetError("duet bench scrub needs root (loop devices, BPF, btrfs scrub)")
    started = time.monotonic()
    samples = []
    with loop_fs("btrfs", size_mb=max(512, (size >> 20) * 2), direct_io=True, prefix="duet-bench-") as fs, \
            tempfile.TemporaryDirectory(prefix="duet-bench-scrub-") as tmp:
        data = os.path.join(fs.mnt, "data")
        os.mkdir(data)
        if progress:
            progress(f"writing a {size >> 20} MiB data set")
        dataset = make_dataset(data, size) if layout == "mixed" else make_large_files(data, size)
        config = os.path.join(tmp, "empty.toml")
        open(config, "w").close()
        state = os.path.join(tmp, "state")
        order = None
        for i in range(runs):
            sample = {}
            steps = ("btrfs", "duet", "cat") if i % 2 == 0 else ("cat", "duet", "btrfs")
            for step in steps:
                if progress:
                    progress(f"run {i + 1}/{runs}: cold, {step}")
                evict_tree(data)
                if step == "btrfs":
                    sample[step] = btrfs_scrub(fs.mnt, fs.loopdev)
                elif step == "duet":
                    sample[step] = duet_scrub(data, state, config, fs.loopdev)
                    order = order or scan_order(state, data)
                else:
                    sample[step] = plain_read([p for p, _ in order or scan_order_fallback(data)], fs.loopdev)
            if progress:
                progress(f"run {i + 1}/{runs}: duet scrub with a foreground reader")
            evict_tree(data)
            sample["foreground"] = duet_scrub(data, state, config, fs.loopdev, last_half(order, dataset))
            samples.append(sample)
        evict_tree(data)
    med = statistics.median
    b_wall = med(s["btrfs"]["wall_s"] for s in samples)
    d_wall = med(s["duet"]["wall_s"] for s in samples)
    d_run = med(s["duet"]["run_wall_s"] for s in samples)
    fg_share = med(s["foreground"]["scrub_from_device_bytes"] / dataset for s in samples)
    fg_device = med(s["foreground"]["device_read_bytes"] / dataset for s in samples)
    report = {
        "scenario": "scrub", "runs": runs, "layout": layout, "dataset_bytes": dataset,
        "files": len(order or []),
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "btrfs_scrub_wall_s": b_wall,
        "btrfs_scrub_device_read_bytes": med(s["btrfs"]["device_read_bytes"] for s in samples),
        "duet_cold_wall_s": d_wall, "duet_cold_run_wall_s": d_run,
        "duet_cold_device_read_bytes": med(s["duet"]["device_read_bytes"] for s in samples),
        "cold_ratio": round(d_wall / b_wall, 3), "cold_run_ratio": round(d_run / b_wall, 3),
        "plain_read_wall_s": med(s["cat"]["wall_s"] for s in samples),
        "plain_read_ratio": round(med(s["cat"]["wall_s"] for s in samples) / b_wall, 3),
        "foreground_reader_bytes": med(s["foreground"]["reader_bytes"] for s in samples),
        "foreground_scrub_device_share": round(fg_share, 3),
        "foreground_total_device_ratio": round(fg_device, 3),
        "foreground_wall_s": med(s["foreground"]["wall_s"] for s in samples),
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "took_s": round(time.monotonic() - started, 1),
        "samples": samples,
    }
    report["targets"] = {"cold_within_1.5x_btrfs_scrub": d_wall <= COLD_RATIO * b_wall,
                         "foreground_scrub_reads_le_55pct": fg_share <= FOREGROUND_DEVICE_SHARE}
    return report
