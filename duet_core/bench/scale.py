"""``duet bench scale``: a million small files, four tasks — start-up rate, memory, ``duet status``, a no-op run.

The bench makes an ext4 image on a loop device with N small files (1 KiB each, 1,000 per directory), unmounts and
mounts it again so nothing starts in the page cache, then, each in a fresh child process:

1. a first ``duet run`` of four incremental tasks over the scope: the scan, the state-store sync, the tasks'
   planning and the engine's start-up snapshot (everything before the first file is processed) give
   ``scan_files_per_s``; the run then processes every file (the tasks only ``fstat`` it);
2. ``duet status --json`` on that state (a subprocess, timed from outside: what a user waits for);
3. a second ``duet run``: nothing changed, so every task plans nothing — the no-op run cron would do nightly.

Peak RSS is the largest of the two runs' own ``ru_maxrss`` plus that of their start-up snapshot's process (the sum
of the two peaks: an upper bound, the two run side by side only during start-up). The tasks are incremental the way
a backup is: each plans the files whose ctime is newer than the start of its last complete round.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from duet_core.errors import DuetError
from duet_core.hookspecs import hookimpl
from duet_core.loopfs import loop_fs, unmount
from duet_core.tasks import TaskSpec

PER_DIR = 1000
FILE_BYTES = 1024
TASKS = ("stamp-a", "stamp-b", "stamp-c", "stamp-d")
TARGETS = {"scan_files_per_s": 50_000, "peak_rss_bytes": 250 << 20, "status_s": 1.0, "noop_run_s": 30.0}


class Incremental:
    """A task that wants the files changed since its last complete round, and only ``fstat``s them."""

    def __init__(self, name: str):
        self.name = name
        self.started: dict[int, int] = {}   # run id -> when its planning began

    @hookimpl
    def duet_task(self) -> TaskSpec:
        return TaskSpec(self.name, "plans files changed since its last round; fstat only (bench)")

    @hookimpl
    def duet_plan(self, run, files):
        since = run.state.get("since", -1)
        self.started.setdefault(run.run_id, time.time_ns())
        return [f.id for f in files if f.ctime_ns > since]

    @hookimpl
    def duet_process(self, ctx) -> None:
        os.fstat(ctx.fd)

    @hookimpl
    def duet_finish(self, run, report) -> None:
        if report.complete:
            run.state.put("since", self.started.get(run.run_id, -1))


def registry():
    from duet_core.plugins import TaskRegistry

    reg = TaskRegistry()
    for name in TASKS:
        reg.add(Incremental(name), package="duet-bench")
    return reg


def make_files(root: str, n: int, progress=None) -> None:
    data = b"\0" * FILE_BYTES
    for d in range(0, n, PER_DIR):
        path = os.path.join(root, f"d{d // PER_DIR:05d}")
        os.mkdir(path)
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(min(PER_DIR, n - d)):
                fd = os.open(f"f{i:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
                os.write(fd, data)
                os.close(fd)
        finally:
            os.close(dfd)
        if progress and d % 50_000 == 0:
            progress(f"making files: {d:,} of {n:,}")
    os.sync()


def _child_run(root: str, state_dir: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "duet_core.bench.scale", "--child",
                          json.dumps({"root": root, "state_dir": state_dir})],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise DuetError(f"bench run failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.splitlines()[-1])


def run_scale(files: int = 1_000_000, progress=None) -> dict:
    if os.geteuid() != 0:
        raise DuetError("duet bench scale needs root (loop devices, BPF)")
    if files < PER_DIR:
        raise DuetError(f"--files must be at least {PER_DIR}")
    say = progress or (lambda _msg: None)
    # ext4 with an inode per file: 4 KiB per file (block) plus inode tables, and room to spare.
    size_mb = max(512, files * 6 // 1024)
    with loop_fs("ext4", size_mb=size_mb, mkfs_args=["-N", str(files + files // 8 + 1000)],
                 prefix="duet-bench-") as fs:
        root = os.path.join(fs.mnt, "data")
        os.mkdir(root)
        t0 = time.monotonic()
        make_files(root, files, say)
        make_s = time.monotonic() - t0
        say("remounting (a cold page cache)")
        unmount(fs.mnt)
        subprocess.run(["mount", "-t", "ext4", fs.loopdev, fs.mnt], check=True)
        state_dir = os.path.join(os.path.dirname(fs.mnt), "state")
        say(f"first run over {files:,} files")
        first = _child_run(root, state_dir)
        say("duet status")
        t0 = time.monotonic()
        st = subprocess.run([sys.executable, "-m", "duet_core.cli.main", "status", "--path", root,
                             "--state-dir", state_dir, "--json"], capture_output=True, text=True)
        status_s = time.monotonic() - t0
        if st.returncode != 0:
            raise DuetError(f"duet status failed: {st.stderr.strip()}")
        say("no-op run")
        noop = _child_run(root, state_dir)
    startup = first["phases"]["startup_s"]
    report = {
        "scenario": "scale", "files": files, "tasks": list(TASKS), "make_files_s": round(make_s, 1),
        "first_run": first, "noop_run": noop,
        "scan_files_per_s": round(files / startup) if startup else None,
        "peak_rss_bytes": max(r["max_rss_bytes"] + r["child_max_rss_bytes"] for r in (first, noop)),
        "status_s": round(status_s, 3), "noop_run_s": noop["wall_s"],
        "first_run_s": first["wall_s"],
    }
    report["targets"] = {
        "scan_ge_50k_files_per_s": (report["scan_files_per_s"] or 0) >= TARGETS["scan_files_per_s"],
        "peak_rss_le_250MB": report["peak_rss_bytes"] <= TARGETS["peak_rss_bytes"],
        "status_under_1s": status_s < TARGETS["status_s"],
        "noop_run_under_30s": noop["wall_s"] < TARGETS["noop_run_s"],
    }
    return report


def _child_main(args: dict) -> int:
    """One duet run of the four bench tasks, in its own process (so its peak RSS is its own)."""
    from duet_core.scheduler import Runner, RunOptions
    from duet_core.state import StateStore

    store = StateStore(args["state_dir"])
    summary = Runner(store, registry(), list(TASKS), args["root"], RunOptions(source="bpf")).run()
    summary["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary["child_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    t = os.times()
    summary["cpu_s"] = round(t.user + t.system, 2)
    summary["child_cpu_s"] = round(t.children_user + t.children_system, 2)   # the start-up snapshot's process
    summary.pop("engine", None)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    sys.exit(_child_main(json.loads(sys.argv[2])))
