"""``duet bench defrag``: what defragmenting costs when part of the data is already in the page cache.

The filesystem must read a file to rewrite it, unless its pages are cached — why the defrag task goes most-cached
first, as the original Duet's did. The same fragmented data set (files written side by side in fsynced chunks, on a
fresh btrfs over a direct-I/O loop device, so the loop device's read counter is the device's) is defragmented by
``duet run defrag`` with none, half or all of it cached beforehand, and by ``btrfs filesystem defragment`` cold, for
reference. The page cache is set per file (``POSIX_FADV_DONTNEED`` / reading), never dropped globally.

Reported: bytes read from the device, wall time, extents before and after (``filefrag``); ratios within one run.
The defrag task is the installed ``duet-defrag`` plugin, run as ``duet`` would run it: a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from duet_core.errors import DuetError
from duet_core.loopfs import loop_fs

SCENARIOS = ("cold", "half cached", "all cached", "btrfs-progs, cold")
CACHED_SHARE = {"cold": 0.0, "half cached": 0.5, "all cached": 1.0, "btrfs-progs, cold": 0.0}


def make_fragmented(root: str, files: int, file_size: int, chunk: int) -> list[str]:
    """``files`` files written round-robin, one fsynced ``chunk`` of each in turn: their extents interleave."""
    paths = [os.path.join(root, f"f{i:03d}") for i in range(files)]
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644) for p in paths]
    try:
        for off in range(0, file_size, chunk):
            for fd in fds:
                os.pwrite(fd, os.urandom(chunk), off)
                os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    return paths


def set_cached(paths: list[str], share: float) -> None:
    """Evict every file, then read the first ``share`` of them back into the page cache."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    for p in paths[:round(len(paths) * share)]:
        with open(p, "rb") as fh:
            while fh.read(1 << 20):
                pass


def extents(paths: list[str]) -> int:
    """Total extents of ``paths`` as ``filefrag`` counts them."""
    out = subprocess.run(["filefrag", *paths], capture_output=True, text=True, check=True).stdout
    return sum(int(n) for n in re.findall(r": (\d+) extents? found", out))


def loop_read_bytes(loopdev: str) -> int:
    with open(f"/sys/block/{os.path.basename(loopdev)}/stat") as fh:
        return int(fh.read().split()[2]) * 512


def _defrag(scenario: str, scope: str, state_dir: str) -> dict:
    """Defragment ``scope`` the scenario's way; returns the task's report (duet) or {} (btrfs-progs)."""
    if scenario.startswith("btrfs-progs"):
        argv = ["btrfs", "filesystem", "defragment", "-r", "-f", scope]   # -f: wait for the writes, as duet does
    else:
        argv = [sys.executable, "-m", "duet_core.cli.main", "run", "defrag", "--path", scope, "--json",
                "--config", os.devnull, "--state-dir", state_dir]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DuetError(f"{argv[0]} failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
    return json.loads(proc.stdout)["tasks"]["defrag"] if proc.stdout.strip() else {}


def one_run(scenario: str, files: int, file_size: int, chunk: int) -> dict:
    """A fresh filesystem and data set, the scenario's cache state, one defrag; what it cost."""
    image_mb = max(512, files * file_size * 8 >> 20)     # room for contiguous rewrites
    with loop_fs("btrfs", size_mb=image_mb, direct_io=True, prefix="duet-bench-") as fs, \
            tempfile.TemporaryDirectory(prefix="duet-bench-state-") as state_dir:
        scope = os.path.join(fs.mnt, "data")
        os.mkdir(scope)
        paths = make_fragmented(scope, files, file_size, chunk)
        set_cached(paths, CACHED_SHARE[scenario])
        before_extents = extents(paths)
        before = loop_read_bytes(fs.loopdev)
        t0 = time.monotonic()
        report = _defrag(scenario, scope, state_dir)
        wall = time.monotonic() - t0
        device = loop_read_bytes(fs.loopdev) - before
        # duet's fixed cost (interpreter, plugins, BPF load, state): the same run over an empty directory.
        empty = os.path.join(fs.mnt, "empty")
        os.mkdir(empty)
        t0 = time.monotonic()
        _defrag(scenario, empty, state_dir)
        return {"wall_s": wall, "device_read_bytes": device, "extents_before": before_extents,
                "extents_after": extents(paths), "defragmented": report.get("defragmented"),
                "empty_scope_wall_s": time.monotonic() - t0}


def run_defrag_bench(files: int = 32, file_size: int = 4 << 20, chunk: int = 64 << 10, runs: int = 3,
                     progress=None) -> dict:
    """Every scenario ``runs`` times, interleaved (so drifting machine load hits them alike); medians."""
    if os.geteuid() != 0:
        raise DuetError("duet bench defrag needs root (loop devices, BPF)")
    samples: dict[str, list[dict]] = {s: [] for s in SCENARIOS}
    t_start = time.monotonic()
    for r in range(runs):
        for scenario in SCENARIOS:
            if progress:
                progress(f"run {r + 1}/{runs}: {scenario}")
            samples[scenario].append(one_run(scenario, files, file_size, chunk))
    med = {s: {k: statistics.median(x[k] for x in v) for k in ("wall_s", "device_read_bytes", "extents_before",
                                                                 "extents_after", "empty_scope_wall_s")}
           for s, v in samples.items()}
    dataset = files * file_size
    cold = med["cold"]["device_read_bytes"] or 1
    ratios = {s: med[s]["device_read_bytes"] / cold for s in SCENARIOS}
    targets = {
        "all_cached_reads_under_5pct_of_cold": ratios["all cached"] <= 0.05,
        "half_cached_reads_35_to_65pct_of_cold": 0.35 <= ratios["half cached"] <= 0.65,
        "cold_reads_the_data_set_once": 0.9 <= med["cold"]["device_read_bytes"] / dataset <= 1.1,
        "duet_leaves_every_file_near_one_extent": all(med[s]["extents_after"] <= 2 * files
                                                      for s in SCENARIOS if not s.startswith("btrfs-progs")),
    }
    return {
        "config": {"files": files, "file_size": file_size, "chunk": chunk, "runs": runs, "dataset_bytes": dataset},
        "medians": med, "device_ratio_vs_cold": ratios,
        "wall_ratio_vs_btrfs_progs": med["cold"]["wall_s"] / (med["btrfs-progs, cold"]["wall_s"] or 1e-9),
        "duet_start_s": med["cold"]["empty_scope_wall_s"],
        "work_ratio_vs_btrfs_progs": (med["cold"]["wall_s"] - med["cold"]["empty_scope_wall_s"])
        / (med["btrfs-progs, cold"]["wall_s"] or 1e-9),
        "targets": targets, "samples": samples, "took_s": round(time.monotonic() - t_start, 1),
    }
