"""``duet bench gc``: what the gc task's deduplication costs in device reads, and what it reclaims.

Four runs, each on a fresh copy of the same data set (half of the files have an identical twin elsewhere) on btrfs
over a direct-I/O loop device, every file evicted first (per file, never the global cache), so the loop device's
read counter is what the run read:

* ``reader`` — a task that reads every file and publishes its blake3 (what backup or scrub do): the baseline;
* ``reader+gc`` — the same run with gc: gc must reuse the reader's hashes, so it adds only the kernel's byte
  compare of each duplicate's representative (FIDEDUPERANGE reads both files);
* ``gc`` — gc alone, cold: it reads only the candidate files (same-size twins), plus those compares;
* ``gc, half cached`` — gc alone with half of the candidates read into the cache beforehand (by another process):
  the cached ones are hashed first and from memory.

gc is found through its entry point (``duet.tasks``), like any installed task; the core never imports it.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time

import blake3

from duet_core.errors import DuetError
from duet_core.hookspecs import hookimpl
from duet_core.loopfs import loop_fs
from duet_core.tasks import TaskSpec

CHUNK = 1 << 20


class Blake3Reader:
    """Reads every byte of every file and publishes the whole-file blake3, as backup and scrub do."""

    @hookimpl
    def duet_task(self) -> TaskSpec:
        return TaskSpec("reader", "reads every file, publishes blake3 (bench)")

    @hookimpl
    def duet_process(self, ctx) -> None:
        h, off = blake3.blake3(), 0
        while chunk := os.pread(ctx.fd, CHUNK, off):
            h.update(chunk)
            off += len(chunk)
        ctx.shared.put(ctx.file, "blake3", h.hexdigest())


def make_dataset(root: str, size: int, seed: int = 7) -> dict:
    """About ``size`` bytes in files of 64 KiB–8 MiB; half of the files get an identical copy in another directory.
    Every file has a distinct size except the twins, so the candidates are exactly the duplicated files."""
    rnd = random.Random(seed)
    written = dup = cand = 0
    n = 0
    sizes_used: set[int] = set()
    while written < size:
        fsize = rnd.randint(64 << 10, 8 << 20)
        if fsize in sizes_used:
            continue
        sizes_used.add(fsize)
        data = rnd.randbytes(fsize)
        paths = [os.path.join(root, f"d{n % 8}", f"f{n:05d}")]
        if n % 2 == 0:
            paths.append(os.path.join(root, f"copy{n % 5}", f"f{n:05d}"))
            dup += fsize
            cand += 2 * fsize
        for p in paths:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as fh:
                fh.write(data)
            written += fsize
        n += 1
    os.sync()
    return {"dataset_bytes": written, "duplicate_bytes": dup, "candidate_bytes": cand, "files": n + n // 2}


def evict_tree(root: str) -> None:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def loop_read_bytes(loopdev: str) -> int:
    with open(f"/sys/block/{os.path.basename(loopdev)}/stat") as fh:
        return int(fh.read().split()[2]) * 512


def _registry():
    from duet_core.plugins import load_plugins

    reg = load_plugins()
    if "gc" not in reg.tasks:
        raise DuetError("the gc task is not installed", hint="scripts/dev setup installs plugins/gc")
    reg.add(Blake3Reader(), package="duet-bench")
    return reg


def _one(name: str, tasks: list[str], fs, size: int, precache: bool) -> dict:
    from duet_core.scheduler import Runner, RunOptions
    from duet_core.state import StateStore

    data = os.path.join(fs.mnt, "data")
    facts = make_dataset(data, size)
    evict_tree(data)
    if precache:   # another process reads half of the duplicated files, as an application would
        twins = sorted(os.path.join(dp, n) for dp, _d, ns in os.walk(data) for n in ns if "copy" in dp)[::2]
        subprocess.run(["cat", *twins], stdout=subprocess.DEVNULL, check=True)
    state = os.path.join(fs.mnt, "state-" + name.replace(" ", "-").replace(",", ""))
    store = StateStore(state)
    try:
        before = loop_read_bytes(fs.loopdev)
        t0 = time.monotonic()
        summary = Runner(store, _registry(), tasks, data, RunOptions(source="auto")).run()
        wall = time.monotonic() - t0
        device = loop_read_bytes(fs.loopdev) - before
    finally:
        store.close()
    shutil.rmtree(data)
    shutil.rmtree(state, ignore_errors=True)
    gc = summary["tasks"].get("gc", {}).get("counters", {})
    return {"name": name, "tasks": tasks, **facts, "device_read_bytes": device, "wall_s": round(wall, 3),
            "deduped_bytes": gc.get("deduped_bytes", 0), "reclaimed_bytes": gc.get("reclaimed_bytes", 0),
            "hashed_files": gc.get("hashed_files", 0), "hash_reused_files": gc.get("hash_reused_files", 0),
            "result": summary["result"]}


def run_gc_bench(size: int = 256 << 20, progress=None) -> dict:
    if os.geteuid() != 0:
        raise DuetError("duet bench gc needs root (loop devices)")
    scenarios = [("reader", ["reader"], False), ("reader+gc", ["reader", "gc"], False),
                 ("gc", ["gc"], False), ("gc, half cached", ["gc"], True)]
    out = []
    with loop_fs("btrfs", size_mb=max(512, 3 * (size >> 20)), direct_io=True, prefix="duet-bench-") as fs:
        for name, tasks, precache in scenarios:
            if progress:
                progress(f"{name}…")
            out.append(_one(name, tasks, fs, size, precache))
    by = {r["name"]: r for r in out}
    dup = by["gc"]["duplicate_bytes"]
    reads = {name: r["device_read_bytes"] for name, r in by.items()}
    report = {"scenario": "gc", "runs": out, "duplicate_bytes": dup,
              "gc_extra_reads_next_to_reader": reads["reader+gc"] - reads["reader"],
              "half_cached_vs_cold": round(reads["gc, half cached"] / max(1, reads["gc"]), 3)}
    report["targets"] = {
        # Next to a reader, gc reads nothing to hash; only the kernel's compare of each representative remains.
        "reader+gc_reads_le_reader_plus_duplicates": report["gc_extra_reads_next_to_reader"] <= 1.05 * dup,
        "reader+gc_reuses_every_hash": by["reader+gc"]["hashed_files"] == 0,
        # Alone, gc reads the candidates once to hash them, plus the compares.
        "gc_reads_le_candidates_plus_duplicates": by["gc"]["device_read_bytes"] <= 1.05 * (
            by["gc"]["candidate_bytes"] + dup),
        "reclaims_the_duplicates": by["gc"]["reclaimed_bytes"] >= 0.99 * dup,
    }
    return report


if __name__ == "__main__":   # python -m duet_core.bench.gc [MiB]
    import json

    print(json.dumps(run_gc_bench((int(sys.argv[1]) if len(sys.argv) > 1 else 256) << 20), indent=1))
