"""``duet bench engine``: the event engine under the highest page-event rate this machine can make.

Workloads, each run without the engine and with it (alternating, ABBA), after :func:`~.stabilize.stabilize`:

- ``seq-1``, ``rand-1``, ``seq-2``, ``rand-2``: 4 KiB preads with POSIX_FADV_RANDOM over a sparse file on a loop
  filesystem, in order or shuffled, by one reader or by two in parallel (each over half the file). Each read of an
  evicted hole adds exactly one page (an order-0 folio): one page event per read, no device I/O — CPU-bound, the
  worst case for any hook.
- ``rate-100k``: shuffled 4 KiB preads at a fixed 100,000 reads/s, to read off the engine's CPU at that rate.
- ``dev-seq``, ``dev-rand``: cold reads of a file of real data on a direct-I/O loop device — sequential with normal
  readahead (1 MiB reads), and shuffled 4 KiB reads with POSIX_FADV_RANDOM. Device-bound.

Readers are separate processes (:mod:`duet_core.bench.reader`), so this process's CPU is the engine's: an
``Engine(source="bpf")`` with one ADDED|REMOVED registration on the loop filesystem, drained and fetched every
100 ms. Pages generated are known without the engine (one per read of a page not cached; every page is read once)
and checked with cachestat after each run; the engine must account for each as delivered or lost.

The VM's timing noise is large: besides the stabilisation, a run is repeated (``retries``) when the hypervisor
stole CPU time, other processes were busy, or another process evicted the file's pages meanwhile, and every
figure is a median over ``runs``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

from duet_core import residency
from duet_core.bench.stabilize import evict, stabilize
from duet_core.bpf import MERGE_ENTRIES
from duet_core.errors import DuetError
from duet_core.events import PAGE_SIZE, Event
from duet_core.loopfs import LoopFs, loop_fs

log = logging.getLogger("duet.bench")

TICK_S = 0.1                 # the engine drains and fetches this often
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
TARGETS = {"cpu_slowdown_pct": 10.0, "device_slowdown_pct": 2.0, "engine_cpu_pct_at_100k": 10.0, "attach_s": 1.0}
# ext4: no background inode-table zeroing or block-bitmap prefetch on the fresh filesystems while we measure (the
# prefetch fills ext4's buddy cache, inode 1, which makes page events of its own).
EXT4_OPTS = "noinit_itable,no_prefetch_block_bitmaps"


@dataclass
class Config:
    size: int = 2 << 30                 # the sparse file of the CPU-bound workloads
    runs: int = 5
    device_runs: int = 0                # runs of the device-bound workloads (0: as many as ``runs``; see run_bench)
    settle_s: float = 1.0               # wait after drop_caches
    touch_bytes: int = 3 << 30          # memory touched and freed before each run
    drop_caches: bool = True            # before each run (tests turn it off: it slows everyone on the machine)
    fstype: str = "ext4"
    device_size: int = 2 << 30          # the data file on the direct-I/O loop device (0: no device workloads)
    dev_random_pages: int = 32768       # reads of dev-rand
    rate: float = 100_000               # reads/s of the rate-limited workload (0: none)
    rate_s: float = 2.0
    only: list[str] = field(default_factory=list)
    mask: Event = Event.ADDED | Event.REMOVED
    merge_entries: int = MERGE_ENTRIES          # the engine's merge map (smaller: to see loss being counted)
    retries: int = 1                    # re-runs of a noisy run
    steal_max_pct: float = 3.0          # noisy: the hypervisor stole more than this share of all CPUs
    other_cpu_max_pct: float = 10.0     # noisy: other processes used more than this share (CPU-bound workloads)
    bpf_stats: bool = False             # kernel.bpf_stats_enabled during the runs: measured ns per BPF run
    prefix: str = "duet-bench-"         # loop filesystems' directory prefix under /var/tmp


@dataclass
class ReaderSpec:
    first: int               # first page
    count: int               # pages covered
    block: int = PAGE_SIZE   # bytes per read
    random: bool = False
    fadvise_random: bool = True
    rate: float = 0.0        # reads per second, 0 = flat out
    stride: int = 0          # pages from one read to the next (0: the block's pages)

    @property
    def reads(self) -> int:
        return -(-self.count // (self.stride or self.block // PAGE_SIZE))

    @property
    def pages(self) -> int:
        """Pages the reads add to the cache, starting from none cached."""
        return min(self.count, self.reads * (self.block // PAGE_SIZE))

    def argv(self, path: str, seed: int) -> list[str]:
        argv = [sys.executable, "-m", "duet_core.bench.reader", path, "--first", str(self.first),
                "--count", str(self.count), "--block", str(self.block), "--rate", str(self.rate),
                "--stride", str(self.stride), "--seed", str(seed)]
        if self.random:
            argv.append("--random")
        if self.fadvise_random:
            argv.append("--fadvise-random")
        return argv


@dataclass
class Workload:
    name: str
    kind: str                # "cpu", "rate" or "device"
    fs: LoopFs
    path: str
    readers: list[ReaderSpec]

    @property
    def pages(self) -> int:
        return sum(r.pages for r in self.readers)


@dataclass
class Sample:
    """One execution of a workload."""

    workload: str
    mode: str                       # "baseline" or "engine"
    run: int
    elapsed_s: float                # first reader's start to last reader's end
    reads: int
    pages: int                      # generated: one per 4 KiB read of an evicted page (the whole file for dev-seq)
    cached_pages: int               # cachestat after - before: equals pages unless something else evicted pages
    reader_user_s: float
    reader_sys_s: float             # includes the BPF programs, which run in the readers' context
    proc_cpu_s: float = 0.0         # this process's user+sys over the window (the engine, in engine mode)
    proc_user_s: float = 0.0
    window_s: float = 0.0           # go to last fetch done
    delivered_pages: int = 0        # pages in fetched items flagged ADDED
    removed_pages: int = 0
    lost_pages: int = 0             # the kernel's lost_* counters
    kernel_events: int = 0          # tracepoint hits in scope (kernel stats)
    kernel_pages: int = 0
    drains: int = 0
    records: int = 0
    items: int = 0
    max_fetch_s: float = 0.0
    setup_s: float = 0.0            # Engine() + register in this (warm) process
    steal_pct: float = 0.0          # CPU time the hypervisor took over the window, % of all CPUs
    other_cpu_pct: float = 0.0      # CPU time of everything but us (other processes, kernel threads), % of all
    other_engines: int = 0          # other duet engines attached to the page-cache tracepoints meanwhile
    bpf_ns_measured: float | None = None  # ns per run of our ADDED program (with bpf_stats)
    attempt: int = 0                # noisy runs discarded before this one


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- the data -------------------------------------------------------------------------------------------------------
def make_sparse(fs: LoopFs, size: int) -> str:
    path = os.path.join(fs.mnt, "sparse.dat")
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def make_data(fs: LoopFs, size: int) -> str:
    """A file of real (non-zero, incompressible) data, written and synced."""
    path = os.path.join(fs.mnt, "data.dat")
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for off in range(0, size, len(block)):
            fh.write(block[: size - off])
        fh.flush()
        os.fsync(fh.fileno())
    return path


def loop_dio(loopdev: str) -> bool:
    try:
        with open(f"/sys/block/{os.path.basename(loopdev)}/loop/dio") as fh:
            return fh.read().strip() == "1"
    except OSError:
        return False


def workloads(cfg: Config, sparse: LoopFs, sparse_path: str, dev: LoopFs | None = None,
              data_path: str | None = None) -> list[Workload]:
    pages = cfg.size // PAGE_SIZE
    half = pages // 2
    out = [
        Workload("seq-1", "cpu", sparse, sparse_path, [ReaderSpec(0, pages)]),
        Workload("rand-1", "cpu", sparse, sparse_path, [ReaderSpec(0, pages, random=True)]),
        Workload("seq-2", "cpu", sparse, sparse_path, [ReaderSpec(0, half), ReaderSpec(half, pages - half)]),
        Workload("rand-2", "cpu", sparse, sparse_path,
                 [ReaderSpec(0, half, random=True), ReaderSpec(half, pages - half, random=True)]),
    ]
    if cfg.rate > 0 and cfg.rate_s > 0:
        n = max(1, min(pages, int(cfg.rate * cfg.rate_s)))
        out.append(Workload(f"rate-{cfg.rate / 1000:g}k", "rate", sparse, sparse_path,
                            [ReaderSpec(0, n, random=True, rate=cfg.rate)]))
    if dev is not None and data_path is not None:
        dpages = cfg.device_size // PAGE_SIZE
        out.append(Workload("dev-seq", "device", dev, data_path,
                            [ReaderSpec(0, dpages, block=1 << 20, fadvise_random=False)]))
        # One page in `stride`, shuffled: each read is a device round trip, so all of them would take too long.
        n = max(1, min(dpages, cfg.dev_random_pages))
        stride = max(1, dpages // n)
        out.append(Workload("dev-rand", "device", dev, data_path,
                            [ReaderSpec(0, n * stride, random=True, stride=stride)]))
    if cfg.only:
        unknown = set(cfg.only) - {w.name for w in out}
        if unknown:
            raise DuetError(f"no workload named {', '.join(sorted(unknown))}",
                            hint="choose from " + ", ".join(w.name for w in out))
        out = [w for w in out if w.name in cfg.only]
    return out


# -- measuring ------------------------------------------------------------------------------------------------------
def _spawn(w: Workload, seed: int) -> list[subprocess.Popen]:
    """Start the readers and wait until each is ready (file open, offsets computed)."""
    procs = [subprocess.Popen(spec.argv(w.path, seed + i), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for i, spec in enumerate(w.readers)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            for q in procs:
                q.kill()
                q.wait()
            raise DuetError(f"a bench reader failed to start (exit {p.returncode})")
    return procs


def _finish(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        line = p.stdout.readline()
        rc = p.wait()
        if rc != 0 or not line:
            raise DuetError(f"a bench reader failed (exit {rc})")
        out.append(json.loads(line))
    return out


def _rusage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def _cpu_ticks() -> tuple[int, int]:
    """(busy, stolen) CPU time of all CPUs in USER_HZ ticks, from /proc/stat."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f + [0] * (8 - len(f))
    return user + nice + system + irq + softirq, steal


def _cached(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return residency.resident_count(fd)
    finally:
        os.close(fd)


def bpf_programs() -> dict[int, dict]:
    """duet's page-cache programs loaded now, by any process: id -> bpftool's record (with run_cnt and run_time_ns
    while kernel.bpf_stats_enabled is 1)."""
    from duet_core.bpf.loader import PROGRAMS

    try:
        proc = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, check=False)
        progs = json.loads(proc.stdout or "[]")
    except (OSError, ValueError):
        return {}
    return {p["id"]: p for p in progs if p.get("name") in PROGRAMS}


_OURS: set[int] = set()   # ids of the programs our own engines loaded (they linger a few ms after close)


def _bpf_stats_enabled(on: bool) -> bool:
    """Set kernel.bpf_stats_enabled; return what it was."""
    path = "/proc/sys/kernel/bpf_stats_enabled"
    with open(path) as fh:
        was = fh.read().strip() == "1"
    with open(path, "w") as fh:
        fh.write("1" if on else "0")
    return was


class _Pump:
    """The engine side of a run: drain and fetch every TICK_S, count the pages delivered."""

    def __init__(self, engine, reg):
        self.engine, self.reg = engine, reg
        self.delivered = self.removed = self.items = 0
        self.max_fetch_s = 0.0

    def fetch(self) -> None:
        t = time.monotonic()
        self.engine.pump(force=True)
        batch = self.engine.fetch(self.reg)
        # Count from the batch's arrays, as a consumer that only counts would: no Item objects.
        self.delivered += sum(batch.pages(Event.ADDED).values())
        self.removed += sum(batch.pages(Event.REMOVED).values())
        self.items += len(batch)
        self.max_fetch_s = max(self.max_fetch_s, time.monotonic() - t)

    def until_done(self, procs: list[subprocess.Popen], go: float) -> None:
        next_tick = go + TICK_S
        while True:
            running = any(p.poll() is None for p in procs)
            now = time.monotonic()
            if running and now < next_tick:
                time.sleep(min(0.01, next_tick - now))
                continue
            self.fetch()   # the last one after every reader has exited: all their events are in the map
            next_tick += TICK_S
            if not running:
                return


def execute(w: Workload, mode: str, run: int, cfg: Config) -> Sample:
    """Evict, stabilise, start the readers, (attach the engine,) go, and account for every page."""
    if evict(w.path):
        raise DuetError(f"could not evict {w.path} before a run")
    stabilize(cfg.settle_s, cfg.touch_bytes, cfg.drop_caches)
    procs = _spawn(w, seed=run * 16 + 1)
    engine = pump = None
    ours: dict[int, dict] = {}
    try:
        foreign = {i: p for i, p in bpf_programs().items() if i not in _OURS}
        setup_s = 0.0
        if mode == "engine":
            from duet_core.engine import Engine

            t = time.monotonic()
            engine = Engine(source="bpf", merge_entries=cfg.merge_entries)
            pump = _Pump(engine, engine.register("bench", cfg.mask, w.fs.mnt))
            pump.fetch()
            pump.delivered = pump.removed = pump.items = 0
            pump.max_fetch_s = 0.0
            setup_s = time.monotonic() - t
            loaded = {i: p for i, p in bpf_programs().items() if i not in foreign}
            _OURS.update(loaded)
            if cfg.bpf_stats:
                ours = {i: p for i, p in loaded.items() if p["name"] == "tp_btf_added"}
        before = _cached(w.path)
        if before:
            raise DuetError(f"{before} pages of {w.path} were cached at the start of a run")
        u0, s0 = _rusage()
        busy0, steal0 = _cpu_ticks()
        go = time.monotonic()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        if pump is None:
            for p in procs:
                p.wait()
        else:
            pump.until_done(procs, go)
        window = time.monotonic() - go
        u1, s1 = _rusage()
        busy1, steal1 = _cpu_ticks()
        results = _finish(procs)
        procs = []
        s = Sample(
            workload=w.name, mode=mode, run=run,
            elapsed_s=max(r["end"] for r in results) - min(r["start"] for r in results),
            reads=sum(r["reads"] for r in results), pages=w.pages, cached_pages=_cached(w.path) - before,
            reader_user_s=sum(r["user_s"] for r in results), reader_sys_s=sum(r["sys_s"] for r in results),
            proc_cpu_s=(u1 - u0) + (s1 - s0), proc_user_s=u1 - u0, window_s=window, setup_s=setup_s,
            other_engines=sum(p["name"] == "tp_btf_added" for p in foreign.values()))
        capacity = window * NCPU
        mine = s.proc_cpu_s + s.reader_user_s + s.reader_sys_s
        s.steal_pct = 100 * (steal1 - steal0) / CLK_TCK / capacity
        s.other_cpu_pct = max(0.0, 100 * ((busy1 - busy0) / CLK_TCK - mine) / capacity)
        if pump is not None:
            s.delivered_pages, s.removed_pages, s.items = pump.delivered, pump.removed, pump.items
            s.max_fetch_s = pump.max_fetch_s
            st = engine.stats()
            s.lost_pages = sum(v for k, v in st.items() if k.startswith("kernel_lost_"))
            s.kernel_events, s.kernel_pages = st.get("kernel_events", 0), st.get("kernel_pages", 0)
            s.drains, s.records = st.get("drains", 0), st.get("records", 0)
        if ours:
            now = bpf_programs()
            cnt = sum(now[i].get("run_cnt", 0) - p.get("run_cnt", 0) for i, p in ours.items() if i in now)
            ns = sum(now[i].get("run_time_ns", 0) - p.get("run_time_ns", 0) for i, p in ours.items() if i in now)
            s.bpf_ns_measured = ns / cnt if cnt else None
        return s
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if engine is not None:
            engine.close()


def disturbed(s: Sample) -> bool:
    """Pages of the file left the cache during the run: another process dropped caches, or memory ran short."""
    return s.cached_pages != s.pages


def accounted(s: Sample) -> bool:
    """Every page the workload generated was delivered or counted as lost (engine runs; baselines trivially).

    If another process evicted pages of the file during the run (:func:`disturbed`), some pages may have been
    added twice (readahead, then the read), and the pages added are those still cached plus those removed.
    """
    if s.mode != "engine":
        return True
    generated = s.cached_pages + s.removed_pages if disturbed(s) else s.pages
    return s.delivered_pages + s.lost_pages == generated


def measure(w: Workload, mode: str, run: int, cfg: Config) -> Sample:
    """:func:`execute`, again (up to ``cfg.retries`` times) while the run was noisy; keeps the quietest attempt.
    A failed accounting is returned at once, never retried away."""
    best = None
    for attempt in range(cfg.retries + 1):
        s = execute(w, mode, run, cfg)
        s.attempt = attempt
        if not accounted(s):
            return s
        noisy = (disturbed(s) or s.steal_pct > cfg.steal_max_pct
                 or (w.kind != "device" and s.other_cpu_pct > cfg.other_cpu_max_pct))
        if best is None or (disturbed(s), s.steal_pct + s.other_cpu_pct) < \
                (disturbed(best), best.steal_pct + best.other_cpu_pct):
            best = s
        if not noisy:
            break
    return best


def attach_probe(w: Workload) -> dict:
    """Attach to first event in a fresh process, on the evicted file of ``w`` (see :mod:`.attach`)."""
    evict(w.path)
    proc = subprocess.run([sys.executable, "-m", "duet_core.bench.attach", w.fs.mnt, w.path],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DuetError(f"the attach probe failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


# -- the report -----------------------------------------------------------------------------------------------------
def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as fh:
        mem_kb = int(fh.readline().split()[1])
    return {"nproc": os.cpu_count(), "mem_gib": round(mem_kb / (1 << 20), 1), "kernel": platform.release(),
            "cpu": model, "python": platform.python_version()}


def _pct(ratios: list[float]) -> float | None:
    return round((_median(ratios) - 1) * 100, 2) if ratios else None


def summarize(w: Workload, samples: list[Sample]) -> dict:
    """Medians over the runs of one workload; slowdowns are medians of the per-run engine/baseline ratios."""
    base = {s.run: s for s in samples if s.mode == "baseline"}
    eng = [s for s in samples if s.mode == "engine"]
    pairs = [(base[s.run], s) for s in eng if s.run in base]
    wall = [e.elapsed_s / b.elapsed_s for b, e in pairs]
    cpu = [(e.reader_user_s + e.reader_sys_s) / (b.reader_user_s + b.reader_sys_s) for b, e in pairs
           if b.reader_user_s + b.reader_sys_s > 0]
    # The readers' extra system time per page: what the BPF programs cost them. Only where the readers are
    # CPU-bound; on a device-bound workload the difference is I/O-wait noise.
    sys_ns = [(e.reader_sys_s - b.reader_sys_s) / e.pages * 1e9 for b, e in pairs if e.pages and w.kind != "device"]
    measured = [s.bpf_ns_measured for s in eng if s.bpf_ns_measured]
    base_s = [s.elapsed_s for s in base.values()]
    return {
        "name": w.name,
        "kind": w.kind,
        "readers": len(w.readers),
        "pages": w.pages,
        "delivered_pages": int(_median([s.delivered_pages for s in eng])),
        "lost_pages": int(sum(s.lost_pages for s in eng)),
        "accounted": all(accounted(s) for s in eng),
        "cachestat_agrees": all(not disturbed(s) for s in samples),
        "disturbed_runs": sum(disturbed(s) for s in samples),
        "kernel_events": int(_median([s.kernel_events for s in eng])),
        "kernel_pages": int(_median([s.kernel_pages for s in eng])),
        "baseline_s": round(_median(base_s), 4),
        "engine_s": round(_median([s.elapsed_s for s in eng]), 4),
        "slowdown_pct": _pct(wall),
        "slowdown_pct_range": [round((min(wall) - 1) * 100, 1), round((max(wall) - 1) * 100, 1)] if wall else None,
        "baseline_noise_pct": round(100 * (max(base_s) - min(base_s)) / _median(base_s), 1) if base_s else None,
        "reader_cpu_slowdown_pct": _pct(cpu),
        "bpf_ns_per_event": round(_median(sys_ns)) if sys_ns else None,
        "bpf_ns_measured": round(_median(measured)) if measured else None,
        "events_per_s": round(_median([s.pages / s.elapsed_s for s in eng if s.elapsed_s])),
        "engine_cpu_pct": round(_median([100 * s.proc_cpu_s / s.window_s for s in eng if s.window_s]), 2),
        "engine_user_pct": round(_median([100 * s.proc_user_s / s.window_s for s in eng if s.window_s]), 2),
        "engine_max_fetch_ms": round(max((s.max_fetch_s for s in eng), default=0) * 1000, 1),
        "records_per_drain": round(_median([s.records / s.drains for s in eng if s.drains])),
        "items_per_s": round(_median([s.items / s.elapsed_s for s in eng if s.elapsed_s])),
        "setup_s": round(_median([s.setup_s for s in eng]), 4),
        "steal_pct": round(_median([s.steal_pct for s in samples]), 2),
        "other_cpu_pct": round(_median([s.other_cpu_pct for s in samples]), 2),
        "other_engines_runs": sum(s.other_engines > 0 for s in samples),
        "retries": sum(s.attempt for s in samples),
        "runs": [asdict(s) for s in samples],
    }


def report(cfg: Config, ws: list[dict], attach: list[dict], started: datetime, took_s: float) -> dict:
    firsts = [a["attach_to_first_event_s"] for a in attach if a.get("attach_to_first_event_s") is not None]

    def med(key: str) -> float | None:
        vals = [a[key] for a in attach if a.get(key) is not None]
        return round(_median(vals), 4) if vals else None

    cpu = [w["slowdown_pct"] for w in ws if w["kind"] == "cpu" and w["slowdown_pct"] is not None]
    dev = [w["slowdown_pct"] for w in ws if w["kind"] == "device" and w["slowdown_pct"] is not None]
    rate = [w["engine_cpu_pct"] for w in ws if w["kind"] == "rate"]
    targets = {
        "all_accounted": all(w["accounted"] for w in ws),
        "none_lost": all(w["lost_pages"] == 0 for w in ws),
        "engine_cpu_at_100k_le_10pct": max(rate) <= TARGETS["engine_cpu_pct_at_100k"] if rate else None,
        "cpu_bound_slowdown_le_10pct": max(cpu) <= TARGETS["cpu_slowdown_pct"] if cpu else None,
        "device_bound_slowdown_le_2pct": max(dev) <= TARGETS["device_slowdown_pct"] if dev else None,
        "attach_under_1s": max(firsts) < TARGETS["attach_s"] if firsts else None,
    }
    # A slowdown target is inconclusive when the runs disagree: not every run of some workload missed it, and not
    # every run of every workload met it.
    inconclusive = []
    for key, kind, margin in (("cpu_bound_slowdown_le_10pct", "cpu", TARGETS["cpu_slowdown_pct"]),
                              ("device_bound_slowdown_le_2pct", "device", TARGETS["device_slowdown_pct"])):
        ranges = [w["slowdown_pct_range"] for w in ws if w["kind"] == kind and w["slowdown_pct_range"]]
        if ranges and not any(lo > margin for lo, _ in ranges) and not all(hi <= margin for _, hi in ranges):
            inconclusive.append(key)
    config = asdict(cfg)
    config["mask"] = ",".join(e.name.lower() for e in Event if e & cfg.mask)
    config["tick_s"] = TICK_S
    return {
        "bench": "engine",
        "date": started.isoformat(timespec="seconds"),
        "took_s": round(took_s, 1),
        "machine": machine(),
        "config": config,
        "workloads": ws,
        "attach": {
            "attach_to_first_event_s": med("attach_to_first_event_s"),
            "max_s": round(max(firsts), 4) if firsts else None,
            "load_attach_s": med("load_attach_s"),
            "register_s": med("register_s"),
            "first_event_after_read_s": med("first_event_after_read_s"),
            "import_s": med("import_s"),
            "probes": attach,
        },
        "targets": targets,
        "inconclusive": inconclusive,
        "other_engines_seen": any(w["other_engines_runs"] for w in ws),
        "ok": targets["all_accounted"],
    }


# -- the whole benchmark --------------------------------------------------------------------------------------------
def run_bench(progress: Callable[[str], None] | None = None, **options) -> dict:
    """Run every workload ``runs`` times without and with the engine; return the report. Options: :class:`Config`."""
    cfg = Config(**options)
    say = progress or (lambda msg: None)

    def progress(msg: str) -> None:
        log.info("%s", msg)
        say(msg)

    if os.geteuid() != 0:
        raise DuetError("the engine benchmark mounts loop images, drops caches and loads BPF: run it as root")
    if cfg.size < 2 * PAGE_SIZE or cfg.size % PAGE_SIZE:
        raise DuetError("--size must be a multiple of 4 KiB, at least 8 KiB")
    if cfg.fstype not in ("ext4", "btrfs"):
        raise DuetError(f"unsupported filesystem {cfg.fstype!r}", hint="use ext4 or btrfs")
    from duet_core.bpf.build import build

    build()
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    opts = EXT4_OPTS if cfg.fstype == "ext4" else None
    with contextlib.ExitStack() as stack:
        if cfg.bpf_stats:
            was = _bpf_stats_enabled(True)
            stack.callback(_bpf_stats_enabled, was)
        sparse_fs = stack.enter_context(loop_fs(cfg.fstype, size_mb=512, mount_opts=opts, prefix=cfg.prefix))
        sparse_path = make_sparse(sparse_fs, cfg.size)
        dev_fs = data_path = None
        if cfg.device_size >= PAGE_SIZE:
            dev_fs = stack.enter_context(loop_fs(cfg.fstype, size_mb=(cfg.device_size >> 20) * 5 // 4 + 128,
                                                 direct_io=True, mount_opts=opts, prefix=cfg.prefix))
            if not loop_dio(dev_fs.loopdev):
                raise DuetError(f"{dev_fs.loopdev} did not switch to direct I/O")
            progress(f"writing {cfg.device_size >> 20} MiB of data on {dev_fs.loopdev} (direct I/O)")
            data_path = make_data(dev_fs, cfg.device_size)
        ws = workloads(cfg, sparse_fs, sparse_path, dev_fs, data_path)
        samples: dict[str, list[Sample]] = {w.name: [] for w in ws}
        attach: list[dict] = []
        # The device-bound workloads may run more often: identical runs of them differ by 10–40 % here (the host's
        # storage), so a median of five cannot tell a 2 % difference.
        device_runs = max(cfg.runs, cfg.device_runs)
        total = device_runs if any(w.kind == "device" for w in ws) else cfg.runs
        for run in range(total):
            # ABBA: alternate which mode goes first, so that a drift over the bench favours neither.
            order = ("baseline", "engine") if run % 2 == 0 else ("engine", "baseline")
            for w in ws:
                if run >= (device_runs if w.kind == "device" else cfg.runs):
                    continue
                for mode in order:
                    progress(f"run {run + 1}/{total}: {w.name}, {mode}")
                    samples[w.name].append(measure(w, mode, run, cfg))
            if run < cfg.runs:
                progress(f"run {run + 1}/{total}: attach probe")
                stabilize(cfg.settle_s, cfg.touch_bytes, cfg.drop_caches)
                attach.append(attach_probe(ws[0]))
        summaries = [summarize(w, samples[w.name]) for w in ws]
    return report(cfg, summaries, attach, started, time.monotonic() - t0)
