"""``duet bench peers``: each duet task against the tool people use for the same job, same data set, same run.

| job | peer | duet |
|---|---|---|
| backup | ``rsync -a DATA/ TARGET/`` (and ``sync -f`` after it, reported apart) | ``duet run backup`` |
| scrub | ``btrfs scrub start -B`` of the filesystem | ``duet run scrub --every 0`` |
| defrag | ``btrfs filesystem defragment -r -f DATA`` | ``duet run defrag`` |
| dedupe | ``duperemove -dr DATA`` (if installed) | ``duet run gc`` |
| all four | the four peers, one after the other (sums) | ``duet run backup scrub defrag gc`` |

The data set, image and cgroup are ``duet bench together``'s (btrfs over a direct-I/O loop device, page cache
capped at a quarter of the data set; every command runs inside the cgroup, evicted data set first, file by file).
defrag and dedupe change the data set, so each of those runs (and duet's run of all four) gets a fresh copy of it —
the generator is seeded, the copies are byte for byte the same. Backups go to a fresh ext4 filesystem each.

Reported per command: device bytes (the loop device's counter), its own read bytes (``wait4`` rusage; btrfs scrub's
are charged to the
``btrfs`` process that waits in the scrub ioctl), wall time and CPU. Targets are the bounds the tasks'
own issues set against their peer: backup at most rsync's time; scrub within 1.5 × btrfs scrub's time, cold.
defrag and gc have none against a peer: their ratios are reported only.
"""

from __future__ import annotations

import shutil
import time

from duet_core.bench.cgroup import MemoryCgroup
from duet_core.bench.together import (
    TASKS,
    check_tools,
    fresh_dataset,
    image_mb,
    machine,
    measure,
    run_duet,
    testbed,
)
from duet_core.loopfs import loop_fs
from duet_core.testing import evict_tree

JOBS = ("backup", "scrub", "defrag", "dedupe")
DUET_TASK = {"backup": "backup", "scrub": "scrub", "defrag": "defrag", "dedupe": "gc"}
TARGETS = {"backup": 1.0, "scrub": 1.5}    # duet's wall time / the peer's, at most
PEER_NAMES = {"backup": "rsync -a", "scrub": "btrfs scrub start -B", "defrag": "btrfs filesystem defragment -r",
              "dedupe": "duperemove -dr"}


def peer_argv(job: str, mnt: str, data: str, target: str | None) -> list[str] | None:
    """The peer's command line for ``job`` (None: dedupe without duperemove installed)."""
    if job == "backup":
        return ["rsync", "-a", data + "/", target + "/"]
    if job == "scrub":
        return ["btrfs", "scrub", "start", "-B", mnt]
    if job == "defrag":
        return ["btrfs", "filesystem", "defragment", "-r", "-f", data]   # -f: wait for the writes, as duet does
    if shutil.which("duperemove") is None:
        return None
    return ["duperemove", "-dr", "-q", data]


def _peer(job: str, fs, data: str, cg: MemoryCgroup, size: int) -> dict | None:
    evict_tree(data)
    if job != "backup":
        argv = peer_argv(job, fs.mnt, data, None)
        return None if argv is None else {"name": PEER_NAMES[job], "argv": argv,
                                          **measure(argv, fs.loopdev, cg).as_dict()}
    with loop_fs("ext4", size_mb=image_mb(size), prefix="duet-bench-") as target:
        argv = peer_argv(job, fs.mnt, data, target.mnt)
        m = measure(argv, fs.loopdev, cg)
        synced = measure(["sync", "-f", target.mnt], fs.loopdev)
        return {"name": PEER_NAMES[job], "argv": argv, **m.as_dict(),
                "wall_with_sync_s": round(m.wall_s + synced.wall_s, 3)}


def run_peers(size: int = 512 << 20, progress=None) -> dict:
    check_tools("rsync", "btrfs")
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    peers: dict[str, dict | None] = {}
    duet: dict[str, dict] = {}
    with testbed("peers", size, say) as tb:
        data, dev, cg = tb.data, tb.fs.loopdev, tb.cgroup
        # Read-only jobs first, on one copy of the data set; each job that changes it gets a fresh copy.
        for job in ("backup", "scrub"):
            say(f"{job}: {PEER_NAMES[job]}")
            peers[job] = _peer(job, tb.fs, data, cg, size)
            say(f"{job}: duet run {DUET_TASK[job]}")
            duet[job] = run_duet([DUET_TASK[job]], data, tb.tmp, job, dev, cg, size=size)
        for job in ("defrag", "dedupe"):
            peers[job] = None
            if peer_argv(job, tb.fs.mnt, data, None) is not None:
                say(f"{job}: {PEER_NAMES[job]}")
                fresh_dataset(data, size)
                peers[job] = _peer(job, tb.fs, data, cg, size)
            say(f"{job}: duet run {DUET_TASK[job]}")
            fresh_dataset(data, size)
            duet[job] = run_duet([DUET_TASK[job]], data, tb.tmp, job, dev, cg, size=size)
        say(f"duet run {' '.join(TASKS)}")
        fresh_dataset(data, size)
        together = run_duet(list(TASKS), data, tb.tmp, "together", dev, cg, size=size)
    return peers_report(tb.facts, tb.cap, peers, duet, together, time.monotonic() - started)


def peers_report(facts: dict, cap: int, peers: dict, duet: dict, together: dict, took_s: float) -> dict:
    ds = facts["dataset_bytes"]
    ran = [p for p in peers.values() if p]
    jobs = {}
    for job in JOBS:
        p, d = peers[job], duet[job]
        jobs[job] = {"peer": p, "duet": d, "duet_task": DUET_TASK[job],
                     "wall_ratio": round(d["wall_s"] / p["wall_s"], 3) if p else None,
                     "device_ratio": round(d["device_read_bytes"] / max(1, p["device_read_bytes"]), 3) if p else None}
    report = {
        "scenario": "peers", "tasks": list(TASKS), **facts, "cache_cap_bytes": cap, "jobs": jobs,
        "duperemove": peers["dedupe"] is not None,
        # "baseline" here is the peers one after the other; "duet" is duet's one run of the four tasks.
        "baseline_device_read_bytes": sum(p["device_read_bytes"] for p in ran),
        "baseline_process_read_bytes": sum(p["process_read_bytes"] for p in ran),
        "baseline_wall_s": round(sum(p["wall_s"] for p in ran), 3),
        "baseline_cpu_s": round(sum(p["cpu_s"] for p in ran), 3),
        "duet_device_read_bytes": together["device_read_bytes"], "duet_process_read_bytes":
        together["process_read_bytes"], "duet_wall_s": together["wall_s"], "duet_cpu_s": together["cpu_s"],
        "duet_alone_device_read_bytes": sum(d["device_read_bytes"] for d in duet.values()),
        "duet_alone_wall_s": round(sum(d["wall_s"] for d in duet.values()), 3),
        "together": together, "duet_device_ratio": round(together["device_read_bytes"] / ds, 3),
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "took_s": round(took_s, 1),
    }
    report["targets"] = {f"{job}_wall_le_{bound}x_{PEER_NAMES[job].split()[0]}":
                         jobs[job]["wall_ratio"] <= bound for job, bound in TARGETS.items()}
    return report
