"""``duet bench share``: N read-everything tasks over a data set larger than the page cache they may use.

Baseline: each task alone in turn (a duet run of that one task), caches dropped between — what running backup,
scrub and an indexer from cron one after the other costs. duet: the same tasks in one run, where each file read from
the device is handed to every task while it is cached. Both run in a memory cgroup that caps the page cache at a
quarter of the data set, on a loop device in direct-I/O mode, so the loop device's read counter is the device's.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time

from duet_core.bench.cgroup import MemoryCgroup
from duet_core.bench.stabilize import drop_caches, touch_memory
from duet_core.bench.tasks import TASKS
from duet_core.errors import DuetError
from duet_core.loopfs import loop_fs

RSS_HEADROOM = 192 << 20   # the duet process itself (Python, numpy, BPF maps) is charged to the cgroup too


def make_dataset(root: str, size: int, seed: int = 1) -> int:
    """Mixed file sizes: a quarter of the bytes in small files (4–64 KiB), a quarter in medium (256 KiB–4 MiB), half
    in large ones (16–48 MiB), spread over a few directories. Random (incompressible) data. Returns bytes written."""
    rnd = random.Random(seed)
    classes = [(size // 4, 4 << 10, 64 << 10), (size // 4, 256 << 10, 4 << 20), (size // 2, 16 << 20, 48 << 20)]
    written, n = 0, 0
    for budget, lo, hi in classes:
        left = budget
        while left > 0:
            fsize = min(left, rnd.randint(lo, hi))
            d = os.path.join(root, f"d{n % 16:02d}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"f{n:06d}"), "wb") as fh:
                pos = 0
                while pos < fsize:
                    chunk = min(1 << 20, fsize - pos)
                    fh.write(os.urandom(chunk))
                    pos += chunk
            left -= fsize
            written += fsize
            n += 1
    os.sync()
    return written


def loop_read_bytes(loopdev: str) -> int:
    with open(f"/sys/block/{os.path.basename(loopdev)}/stat") as fh:
        return int(fh.read().split()[2]) * 512


def _child(tasks: list[str], root: str, state_dir: str, cgroup: MemoryCgroup, loopdev: str, jobs: int = 1) -> dict:
    drop_caches()
    time.sleep(0.5)
    touch_memory(1 << 30)
    before = loop_read_bytes(loopdev)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "duet_core.bench.share", "--child", json.dumps(
        {"tasks": tasks, "root": root, "state_dir": state_dir, "jobs": jobs})], capture_output=True, text=True,
        preexec_fn=cgroup.join)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise DuetError(f"bench child failed: {proc.stderr.strip()[-800:]}")
    out = json.loads(proc.stdout)
    out["loop_read_bytes"] = loop_read_bytes(loopdev) - before
    out["outer_wall_s"] = wall
    return out


def run_share(size: int = 1 << 30, runs: int = 3, progress=None, jobs: int = 1) -> dict:
    if os.geteuid() != 0:
        raise DuetError("duet bench share needs root (loop devices, cgroups, BPF)")
    tasks = list(TASKS)
    cap = size // 4
    samples = []
    with loop_fs("btrfs", size_mb=max(512, (size >> 20) * 2), direct_io=True, prefix="duet-bench-") as fs:
        data = os.path.join(fs.mnt, "data")
        os.mkdir(data)
        dataset = make_dataset(data, size)
        with MemoryCgroup(cap + RSS_HEADROOM) as cg:
            for i in range(runs):
                base = []
                for t in tasks:
                    if progress:
                        progress(f"run {i + 1}/{runs}: {t} alone")
                    base.append(_child([t], data, os.path.join(fs.mnt, f"state-b{i}-{t}"), cg, fs.loopdev))
                if progress:
                    progress(f"run {i + 1}/{runs}: {', '.join(tasks)} together")
                together = _child(tasks, data, os.path.join(fs.mnt, f"state-d{i}"), cg, fs.loopdev, jobs)
                samples.append({"baseline": base, "duet": together})
    med = statistics.median
    b_dev = med(sum(r["loop_read_bytes"] for r in s["baseline"]) for s in samples)
    b_proc = med(sum(r["device_read_bytes"] for r in s["baseline"]) for s in samples)
    b_wall = med(sum(r["wall_s"] for r in s["baseline"]) for s in samples)
    b_slowest = med(max(r["wall_s"] for r in s["baseline"]) for s in samples)
    b_cpu = med(sum(r["cpu_s"] for r in s["baseline"]) for s in samples)
    d_dev = med(s["duet"]["loop_read_bytes"] for s in samples)
    d_proc = med(s["duet"]["device_read_bytes"] for s in samples)
    d_wall = med(s["duet"]["wall_s"] for s in samples)
    d_cpu = med(s["duet"]["cpu_s"] for s in samples)
    report = {
        "scenario": "share", "tasks": tasks, "runs": runs, "jobs": jobs,
        "dataset_bytes": dataset, "cache_cap_bytes": cap, "cgroup_limit_bytes": cap + RSS_HEADROOM,
        "baseline_device_read_bytes": b_dev, "duet_device_read_bytes": d_dev,
        "baseline_process_read_bytes": b_proc, "duet_process_read_bytes": d_proc,
        "baseline_wall_s": round(b_wall, 3), "baseline_slowest_task_wall_s": round(b_slowest, 3),
        "duet_wall_s": round(d_wall, 3), "baseline_cpu_s": round(b_cpu, 3), "duet_cpu_s": round(d_cpu, 3),
        "device_ratio": round(d_dev / dataset, 3), "baseline_device_ratio": round(b_dev / dataset, 3),
        "wall_ratio_vs_slowest": round(d_wall / b_slowest, 3) if b_slowest else None,
        "samples": samples,
    }
    report["targets"] = {"device_le_1.05x_dataset": d_dev <= 1.05 * dataset,
                         "wall_le_1.15x_slowest_alone": d_wall <= 1.15 * b_slowest}
    return report


def _child_main(args: dict) -> int:
    """Inside the cgroup: one duet run of the bench tasks; prints its summary (with CPU seconds) as JSON."""
    from duet_core.bench.tasks import registry
    from duet_core.scheduler import Runner, RunOptions
    from duet_core.state import StateStore

    store = StateStore(args["state_dir"])
    opts = RunOptions(source="bpf", jobs=args.get("jobs", 1), registry="duet_core.bench.tasks:registry")
    summary = Runner(store, registry(), args["tasks"], args["root"], opts).run()
    t = os.times()
    summary["cpu_s"] = t.user + t.system + t.children_user + t.children_system   # --jobs 2: the second process too
    import resource

    summary["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(summary))
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    sys.exit(_child_main(json.loads(sys.argv[2])))
