"""``duet bench backup``: ``duet run backup`` against ``rsync -a`` — an initial backup and a no-change rerun.

Both copy the same mixed data set (share.make_dataset: small, medium and large files) from a btrfs loop
filesystem in direct-I/O mode to a fresh target filesystem of their own (same type for both), in the same bench
run, so only ratios are compared. Before every timed run the source files are evicted from the page cache one by
one (fadvise; never the global drop_caches, other work on this machine relies on its cache) and everything written
so far goes to disk (``sync``): the loop devices of the targets are files here, and the copies a tool left in
their page cache would otherwise be written back during the next tool's run. The tools take turns at going first
(the order rotates with each repetition). rsync's time is
reported alone and with the ``sync -f`` that makes its copies durable (duet fsyncs every file before it counts as
backed up); the target is duet (defaults) at most as slow as plain ``rsync -a``, on both runs. duet is also timed
"unthrottled" (``--no-idle-io --no-cache-hygiene``: normal I/O priority and a page cache left full, as rsync
runs), to show what its politeness costs. Last, ``duet verify`` reads duet's newest snapshot back against its
blake3s, timed against ``cat`` of the same files (no target: for the record). The backup plugin is run as a
subprocess through its entry point: the core never imports it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time

from duet_core.bench.share import make_dataset
from duet_core.errors import DuetError
from duet_core.loopfs import loop_fs
from duet_core.testing import evict_tree

# duet as rsync runs: normal I/O priority, and what it read left in the page cache.
UNTHROTTLED = ("--no-idle-io", "--no-cache-hygiene")


def settle(src: str) -> None:
    """The same start for every timed run: the source not cached, nothing of an earlier run left to write back."""
    evict_tree(src)
    os.sync()


def _timed(argv: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise DuetError(f"{argv[0]} failed in the bench: {proc.stderr.strip()[-600:]}")
    return wall, proc


def _rsync(src: str, dst: str) -> dict:
    wall, _ = _timed(["rsync", "-a", src + "/", dst + "/"])
    t0 = time.monotonic()
    subprocess.run(["sync", "-f", dst], check=True)
    return {"wall_s": wall, "wall_with_sync_s": wall + time.monotonic() - t0}


def _duet(src: str, dst: str, state: str, config: str, *extra: str) -> dict:
    env = dict(os.environ, DUET_STATE_DIR=state)
    wall, proc = _timed([sys.executable, "-m", "duet_core.cli.main", "run", "backup", "--path", src, "--target", dst,
                         "--json", "--config", config, *extra], env)
    summary = json.loads(proc.stdout)
    rep = summary["tasks"].get("backup", {})
    return {"wall_s": wall, "device_read_bytes": summary["device_read_bytes"], "files": rep.get("files"),
            "copied": rep.get("counters", {}).get("copied", 0), "snapshot": rep.get("snapshot"),
            "unchanged": rep.get("unchanged"), "duet_wall_s": summary.get("wall_s")}


def _verify(dst: str) -> dict:
    """``duet verify`` of the target's newest snapshot: every file read back and hashed (docs/backup.md)."""
    wall, proc = _timed([sys.executable, "-m", "duet_core.cli.main", "verify", "--target", dst, "--json"])
    report = json.loads(proc.stdout)
    if report["corrupt"]:
        raise DuetError(f"duet verify found damage in the bench's own snapshot: {report['corrupt'][:3]}")
    return {"wall_s": wall, "files": report["snapshots"][0]["files"], "bytes": report["snapshots"][0]["bytes"]}


def _read_all(tree: str) -> dict:
    """What reading the same snapshot costs without checking it: ``cat`` of every regular file."""
    files = [p for d, _, names in os.walk(tree) for p in (os.path.join(d, f) for f in names)
             if stat.S_ISREG(os.lstat(p).st_mode)]
    t0 = time.monotonic()
    subprocess.run(["xargs", "-0", "cat"], input=b"\0".join(os.fsencode(f) for f in files),
                   stdout=subprocess.DEVNULL, check=True)
    return {"wall_s": time.monotonic() - t0}


def run_backup_bench(size: int = 1 << 30, target_fs: str = "ext4", runs: int = 1, progress=None) -> dict:
    if os.geteuid() != 0:
        raise DuetError("duet bench backup needs root (loop devices, BPF)")
    if shutil.which("rsync") is None:
        raise DuetError("duet bench backup compares with rsync, which is not installed", hint="apt-get install rsync")
    say = progress or (lambda msg: None)
    image_mb = max(256, (size >> 20) * 3 // 2 + 128)
    samples: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="duet-bench-backup-") as tmp:
        config = os.path.join(tmp, "empty.toml")
        open(config, "w").close()
        with loop_fs("btrfs", size_mb=image_mb, direct_io=True, prefix="duet-bench-") as srcfs:
            src = os.path.join(srcfs.mnt, "data")
            say(f"writing a {size >> 20} MiB mixed data set")
            dataset = make_dataset(src, size)
            nfiles = sum(len(f) for _, _, f in os.walk(src))
            for i in range(runs):
                with loop_fs(target_fs, size_mb=image_mb, prefix="duet-bench-") as rt, \
                        loop_fs(target_fs, size_mb=image_mb, prefix="duet-bench-") as dt, \
                        loop_fs(target_fs, size_mb=image_mb, prefix="duet-bench-") as ut:
                    state, ustate = os.path.join(tmp, f"state{i}"), os.path.join(tmp, f"ustate{i}")
                    sample = {}
                    tools = (("rsync", functools.partial(_rsync, src, rt.mnt)),
                             ("duet", functools.partial(_duet, src, dt.mnt, state, config)),
                             ("duet_unthrottled", functools.partial(_duet, src, ut.mnt, ustate, config, *UNTHROTTLED)))
                    tools = tools[i % len(tools):] + tools[:i % len(tools)]
                    for label, fn in tools:
                        say(f"run {i + 1}/{runs}: {label}, initial backup")
                        settle(src)
                        sample[f"{label}_initial"] = fn()
                    for label, fn in tools:
                        say(f"run {i + 1}/{runs}: {label}, no-change rerun")
                        settle(src)
                        sample[f"{label}_rerun"] = fn()
                    # Reading the backup back: duet verify of duet's newest snapshot, and cat of the same tree.
                    checks = (("verify", functools.partial(_verify, dt.mnt)),
                              ("read_all", functools.partial(_read_all, os.path.join(dt.mnt, "snapshots"))))
                    for label, fn in checks[i % 2:] + checks[:i % 2]:
                        say(f"run {i + 1}/{runs}: {label} of the snapshot")
                        settle(os.path.join(dt.mnt, "snapshots"))
                        sample[label] = fn()
                    samples.append(sample)

    def med(key: str, field: str = "wall_s") -> float:
        return round(statistics.median(s[key][field] for s in samples), 3)

    report = {
        "dataset_bytes": dataset, "files": nfiles, "target_fs": target_fs, "runs": runs,
        "rsync_initial_s": med("rsync_initial"), "rsync_initial_with_sync_s": med("rsync_initial", "wall_with_sync_s"),
        "duet_initial_s": med("duet_initial"),
        "rsync_rerun_s": med("rsync_rerun"), "duet_rerun_s": med("duet_rerun"),
        "duet_unthrottled_initial_s": med("duet_unthrottled_initial"),
        "duet_unthrottled_rerun_s": med("duet_unthrottled_rerun"),
        "duet_rerun_device_read_bytes": int(med("duet_rerun", "device_read_bytes")),
        # Of duet's no-change rerun, the time inside the run (scan, plan, finish: its summary's wall_s); the rest
        # is the process starting (Python, imports, configuration) and exiting.
        "duet_rerun_in_run_s": med("duet_rerun", "duet_wall_s"),
        # duet verify of one snapshot, against cat of every file of it (all snapshots: two links to each file)
        "verify_s": med("verify"), "read_all_s": med("read_all"),
        "machine": {"nproc": os.cpu_count(), "kernel": os.uname().release},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "samples": samples,
    }
    report["initial_ratio"] = round(report["duet_initial_s"] / report["rsync_initial_s"], 3)
    report["rerun_ratio"] = round(report["duet_rerun_s"] / report["rsync_rerun_s"], 3)
    report["verify_ratio"] = round(report["verify_s"] / report["read_all_s"], 3)
    report["targets"] = {"initial_at_most_rsync": report["initial_ratio"] <= 1.0,
                         "rerun_at_most_rsync": report["rerun_ratio"] <= 1.0}
    return report
