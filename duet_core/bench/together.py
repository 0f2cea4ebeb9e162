"""``duet bench together``: backup, scrub, defrag and gc over one data set — each alone in turn, then in one run.

The claim it measures is duet's: *less I/O for the same maintenance*. A btrfs image on a direct-I/O loop device (so
its read counter is what reached the disk, DESIGN.md) holds a data set with work for every task: mixed file sizes
as ``duet bench share`` (a quarter of the bytes in 4–64 KiB files, a quarter in 256 KiB–4 MiB, half in 16–48 MiB),
the medium files written side by side in fsynced chunks (fragmented: defrag's work) and one file in eight with an
identical twin (gc's work). Every ``duet run`` is a subprocess, as a user runs it, inside a memory cgroup capped at
a quarter of the data set (plus room for the process itself), so the data set does not fit in the page cache.

* **baseline** — ``duet run backup``, ``scrub``, ``defrag``, ``gc``, each alone, the data set evicted from the
  page cache before each (file by file: the global cache is never dropped, others share this machine);
* **duet** — ``duet run backup scrub defrag gc`` once, over a fresh copy of the same data set (defrag and gc changed
  the first one; the generator is seeded, so the copy is byte for byte the same).

Per run: device bytes (the loop device's counter), the process's own read bytes (``ru_inblock``, i.e. its
``/proc/PID/io`` read_bytes, taken with ``wait4``), wall time and CPU. Targets (issue #6): duet reads at most
1.05 × the data set from the device, and takes at most 1.15 × the slowest task alone.

The helpers here (:func:`make_dataset`, :func:`measure`, :func:`duet_argv`) are shared by ``duet bench piggyback``
and ``duet bench peers``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

from duet_core.bench.cgroup import MemoryCgroup
from duet_core.bench.share import RSS_HEADROOM, loop_read_bytes
from duet_core.errors import DuetError
from duet_core.loopfs import loop_fs
from duet_core.testing import evict_tree

TASKS = ("backup", "scrub", "defrag", "gc")
DEVICE_TARGET = 1.05     # × data set, duet together
WALL_TARGET = 1.15       # × the slowest task alone
FRAGMENT_CHUNK = 64 << 10
FRAGMENT_GROUP = 8       # medium files written round-robin in groups of this many
TWIN_EVERY = 8           # one small or medium file in this many has an identical copy under dup/
MIN_SIZE = 8 << 20


def _write_group(paths: list[str], blobs: list[bytes]) -> None:
    """Write ``blobs`` to ``paths`` side by side, one fsynced chunk of each in turn: their extents interleave."""
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644) for p in paths]
    try:
        for off in range(0, max(map(len, blobs)), FRAGMENT_CHUNK):
            for fd, blob in zip(fds, blobs):
                if off < len(blob):
                    os.pwrite(fd, blob[off:off + FRAGMENT_CHUNK], off)
                    os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def make_dataset(root: str, size: int, seed: int = 6) -> dict:
    """About ``size`` bytes of seeded random data with work for every task (module docstring). The same ``seed``
    gives the same bytes, so a data set changed by defrag or gc can be made again exactly. Returns its facts."""
    rnd = random.Random(seed)
    classes = [("small", size // 4, 4 << 10, 64 << 10), ("medium", size // 4, 256 << 10, 4 << 20),
               ("large", size - size // 2, 16 << 20, 48 << 20)]
    written = files = twins = fragmented = 0
    group: tuple[list[str], list[bytes]] = ([], [])
    n = 0
    for kind, budget, lo, hi in classes:
        left = budget
        while left > 0:
            fsize = min(left, rnd.randint(lo, hi))
            path = os.path.join(root, f"d{n % 16:02d}", f"f{n:06d}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            blob = rnd.randbytes(fsize)
            if kind == "medium":
                group[0].append(path)
                group[1].append(blob)
                fragmented += fsize
                if len(group[0]) == FRAGMENT_GROUP:
                    _write_group(*group)
                    group = ([], [])
            else:
                with open(path, "wb") as fh:
                    fh.write(blob)
            if kind != "large" and n % TWIN_EVERY == 0:
                twin = os.path.join(root, "dup", f"f{n:06d}")
                os.makedirs(os.path.dirname(twin), exist_ok=True)
                with open(twin, "wb") as fh:
                    fh.write(blob)
                twins += fsize
                written += fsize
                files += 1
            left -= fsize
            written += fsize
            files += 1
            n += 1
    if group[0]:
        _write_group(*group)
    os.sync()
    return {"dataset_bytes": written, "files": files, "duplicate_bytes": twins, "fragmented_bytes": fragmented}


@dataclass
class Measured:
    """One finished child process: what it read and cost, and its output."""
    argv: list[str]
    returncode: int
    wall_s: float
    cpu_s: float
    process_read_bytes: int    # ru_inblock × 512: the child's (and its children's) read_bytes
    device_read_bytes: int     # the loop device's read counter over the child's lifetime
    stdout: str
    stderr: str

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3),
                "process_read_bytes": self.process_read_bytes, "device_read_bytes": self.device_read_bytes}


class Child:
    """A child process whose rusage is collected with ``wait4`` (so two can run at once and each is counted apart).

    ``cgroup`` places it in a memory cgroup before it execs. Output goes to temporary files, so a chatty child
    never blocks on a full pipe while the bench waits for it.
    """

    def __init__(self, argv: list[str], loopdev: str, cgroup: MemoryCgroup | None = None):
        self.argv, self.loopdev = argv, loopdev
        self._out = tempfile.TemporaryFile("w+")
        self._err = tempfile.TemporaryFile("w+")
        self.device_before = loop_read_bytes(loopdev)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err,
                                     preexec_fn=cgroup.join if cgroup else None)

    _done: tuple | None = None    # (exit code, rusage, end time, loop read counter) once reaped

    def _reap(self, flags: int) -> None:
        pid, status, ru = os.wait4(self.proc.pid, flags)
        if pid:
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self._done = (self.proc.returncode, ru, time.monotonic(), loop_read_bytes(self.loopdev))

    def finished(self) -> bool:
        """True once the child has exited (and has been reaped, its rusage kept)."""
        if self._done is None:
            self._reap(os.WNOHANG)
        return self._done is not None

    def wait(self, check: bool = True) -> Measured:
        if self._done is None:
            self._reap(0)
        code, ru, end, device_after = self._done
        self._out.seek(0)
        self._err.seek(0)
        m = Measured(self.argv, code, end - self.t0, ru.ru_utime + ru.ru_stime,
                     ru.ru_inblock * 512, device_after - self.device_before,
                     self._out.read(), self._err.read())
        self._out.close()
        self._err.close()
        if check and m.returncode != 0:
            raise DuetError(f"{os.path.basename(self.argv[0])} {' '.join(self.argv[1:4])} failed in the bench "
                            f"(exit {m.returncode}): {m.stderr.strip()[-800:]}")
        return m


def measure(argv: list[str], loopdev: str, cgroup: MemoryCgroup | None = None) -> Measured:
    """Run ``argv`` to the end and measure it (:class:`Child`); a non-zero exit is a :class:`DuetError`."""
    return Child(argv, loopdev, cgroup).wait()


def duet_argv(tasks: list[str] | tuple[str, ...], data: str, state_dir: str, target: str | None,
              jobs: int = 1) -> list[str]:
    """``duet run TASKS`` as a user runs it, with what each task needs to do all its work: backup a target, scrub
    ``--every 0`` (verify everything now). gc gets no target (that would be snapshot retention, not dedupe).
    ``jobs``: ``--jobs``, for a run of several tasks."""
    argv = [sys.executable, "-m", "duet_core.cli.main", "run", *tasks, "--path", data, "--json",
            "--config", os.devnull, "--state-dir", state_dir]
    if "backup" in tasks:
        argv += ["-o", f"backup.target={target}"]
    if "scrub" in tasks:
        argv += ["-o", "scrub.every=0"]
    if len(tasks) > 1 and jobs > 1:
        argv += ["--jobs", str(jobs)]
    return argv


def check_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise DuetError(f"the bench needs {tool}, which is not installed", hint="scripts/dev setup installs it")


def image_mb(size: int) -> int:
    """A btrfs image with room for the data set, its rewrites (defrag) and metadata."""
    return max(512, (size >> 20) * 5 // 2 + 256)


def fresh_dataset(data: str, size: int) -> dict:
    """(Re)make the data set under ``data`` and evict it from the page cache."""
    if os.path.exists(data):
        shutil.rmtree(data)
    os.mkdir(data)
    facts = make_dataset(data, size)
    evict_tree(data)
    return facts


def run_duet(tasks, data: str, tmp: str, label: str, loopdev: str, cgroup: MemoryCgroup | None, size: int,
             jobs: int = 1) -> dict:
    """One measured ``duet run TASKS`` over the evicted data set; a backup goes to a fresh ext4 filesystem."""
    evict_tree(data)
    state = os.path.join(tmp, f"state-{label}")
    if "backup" not in tasks:
        m = measure(duet_argv(tasks, data, state, None, jobs), loopdev, cgroup)
    else:
        with loop_fs("ext4", size_mb=image_mb(size), prefix="duet-bench-") as target:
            m = measure(duet_argv(tasks, data, state, target.mnt, jobs), loopdev, cgroup)
    summary = json.loads(m.stdout)
    return {"tasks": list(tasks), **m.as_dict(), "result": summary["result"],
            "counters": {t: r.get("counters", {}) for t, r in summary["tasks"].items()}}


@dataclass
class Testbed:
    fs: object              # the LoopFs of the btrfs image (direct-I/O loop device)
    data: str               # the data set's root on it
    tmp: str                # scratch space off the measured device (state directories, fio's output)
    cgroup: MemoryCgroup    # page cache capped at a quarter of the data set
    facts: dict             # make_dataset's facts
    cap: int


@contextlib.contextmanager
def testbed(name: str, size: int, say) -> Iterator[Testbed]:
    """What every maintenance bench runs on (module docstring), torn down on the way out."""
    if os.geteuid() != 0:
        raise DuetError(f"duet bench {name} needs root (loop devices, cgroups, BPF)")
    if size < MIN_SIZE:
        raise DuetError(f"--size must be at least {MIN_SIZE >> 20}MiB (files of every kind, twins for gc)")
    cap = size // 4
    with loop_fs("btrfs", size_mb=image_mb(size), direct_io=True, prefix="duet-bench-") as fs, \
            tempfile.TemporaryDirectory(prefix=f"duet-bench-{name}-") as tmp, \
            MemoryCgroup(cap + RSS_HEADROOM) as cg:
        data = os.path.join(fs.mnt, "data")
        say(f"writing a {size >> 20} MiB data set")
        yield Testbed(fs, data, tmp, cg, fresh_dataset(data, size), cap)


def run_together(size: int = 512 << 20, progress=None, jobs: int = 1) -> dict:
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    with testbed("together", size, say) as tb:
        baseline = []
        for task in TASKS:
            say(f"baseline: duet run {task} alone")
            baseline.append(run_duet([task], tb.data, tb.tmp, f"alone-{task}", tb.fs.loopdev, tb.cgroup, size=size))
        say("writing the same data set again (defrag and gc changed it)")
        fresh_dataset(tb.data, size)
        say(f"duet run {' '.join(TASKS)}" + (f" --jobs {jobs}" if jobs > 1 else ""))
        together = run_duet(list(TASKS), tb.data, tb.tmp, "together", tb.fs.loopdev, tb.cgroup, size=size,
                            jobs=jobs)
    return together_report(tb.facts, tb.cap, baseline, together, time.monotonic() - started) | {"jobs": jobs}


def together_report(facts: dict, cap: int, baseline: list[dict], together: dict, took_s: float) -> dict:
    """The JSON report: sums over the baseline's runs against the one duet run, ratios and targets."""
    dataset = facts["dataset_bytes"]
    slowest = max(r["wall_s"] for r in baseline)
    b_dev = sum(r["device_read_bytes"] for r in baseline)
    report = {
        "scenario": "together", "tasks": list(TASKS), **facts, "cache_cap_bytes": cap,
        "baseline_device_read_bytes": b_dev, "duet_device_read_bytes": together["device_read_bytes"],
        "baseline_process_read_bytes": sum(r["process_read_bytes"] for r in baseline),
        "duet_process_read_bytes": together["process_read_bytes"],
        "baseline_wall_s": round(sum(r["wall_s"] for r in baseline), 3), "duet_wall_s": together["wall_s"],
        "baseline_slowest_wall_s": slowest,
        "baseline_cpu_s": round(sum(r["cpu_s"] for r in baseline), 3), "duet_cpu_s": together["cpu_s"],
        "baseline_device_ratio": round(b_dev / dataset, 3),
        "duet_device_ratio": round(together["device_read_bytes"] / dataset, 3),
        "duet_vs_baseline_device": round(together["device_read_bytes"] / max(1, b_dev), 3),
        "duet_wall_vs_slowest": round(together["wall_s"] / slowest, 3),
        "baseline": baseline, "duet": together,
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "took_s": round(took_s, 1),
    }
    report["targets"] = {
        f"device_le_{DEVICE_TARGET}x_dataset": together["device_read_bytes"] <= DEVICE_TARGET * dataset,
        f"wall_le_{WALL_TARGET}x_slowest_alone": together["wall_s"] <= WALL_TARGET * slowest,
    }
    return report


def machine() -> dict:
    import platform

    with open("/proc/meminfo") as fh:
        mem_kib = int(fh.readline().split()[1])
    return {"nproc": os.cpu_count(), "mem_gib": round(mem_kib / (1 << 20), 1), "kernel": platform.release(),
            "python": platform.python_version()}
