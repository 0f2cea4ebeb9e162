"""``duet bench engine``: the event engine under the highest page-event rate this machine can make.

Workloads (each run once without the engine and once with it, alternating, after :func:`stabilize`):

- ``seq-1``, ``rand-1``, ``seq-2``, ``rand-2``: 4 KiB preads with POSIX_FADV_RANDOM over a sparse file on a loop
  filesystem, in order or shuffled, by one reader or by two in parallel (each over half the file). Every read of
  an evicted hole adds exactly one page (an order-0 folio): one page event per read, no device I/O — CPU-bound,
  the worst case for any hook.
- ``rate-100k``: shuffled 4 KiB preads at a fixed 100,000 reads/s, to read off the engine's CPU at that rate.
- ``dev-seq``, ``dev-rand``: cold reads of a file of real data on a direct-I/O loop device — sequential with
  normal readahead (1 MiB reads), and shuffled 4 KiB reads with POSIX_FADV_RANDOM. Device-bound.

Readers are separate processes (:mod:`duet_core.bench.reader`), so this process's CPU is the engine's: an
``Engine(source="bpf")`` with one ADDED|REMOVED registration on the loop filesystem, drained and fetched every
100 ms. Pages generated are counted independently of the engine, by cachestat of the file before and after (every
read is of a page not cached, each page read once); the engine must account for every one of them as delivered
or lost.
"""

from __future__ import annotations

import json
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
from duet_core.errors import DuetError
from duet_core.events import PAGE_SIZE, Event
from duet_core.loopfs import LoopFs, loop_fs

TICK_S = 0.1                 # the engine drains and fetches this often
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
TARGETS = {"cpu_slowdown_pct": 10.0, "device_slowdown_pct": 2.0, "engine_cpu_pct_at_100k": 10.0,
           "attach_s": 1.0}


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
        step = self.stride or self.block // PAGE_SIZE
        return -(-self.count // step)

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
    def pages_expected(self) -> int:
        return sum(r.pages for r in self.readers)


@dataclass
class Sample:
    """One execution of a workload."""

    workload: str
    mode: str                       # "baseline" or "engine"
    run: int
    elapsed_s: float                # first reader's start to last reader's end
    reads: int
    pages: int                      # generated: cachestat after - before
    reader_user_s: float
    reader_sys_s: float
    proc_cpu_s: float = 0.0         # this process's user+sys over the window (the engine, in engine mode)
    proc_user_s: float = 0.0
    window_s: float = 0.0           # go to last fetch done
    delivered_pages: int = 0
    removed_pages: int = 0
    lost_pages: int = 0
    kernel_events: int = 0
    kernel_pages: int = 0
    drains: int = 0
    records: int = 0
    items: int = 0
    max_fetch_s: float = 0.0
    setup_s: float = 0.0            # Engine() + register, in this (warm) process
    steal_pct: float = 0.0          # CPU time the hypervisor took over the window, % of all CPUs
    other_cpu_pct: float = 0.0      # CPU time of everything but us (other processes, kernel threads), % of all
    attempt: int = 0                # retries before this one (too much steal)


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


def workloads(sparse: LoopFs, sparse_path: str, size: int, dev: LoopFs | None, data_path: str | None,
              data_size: int, dev_random_pages: int, rate: float, rate_s: float) -> list[Workload]:
    pages = size // PAGE_SIZE
    half = pages // 2
    out = [
        Workload("seq-1", "cpu", sparse, sparse_path, [ReaderSpec(0, pages)]),
        Workload("rand-1", "cpu", sparse, sparse_path, [ReaderSpec(0, pages, random=True)]),
        Workload("seq-2", "cpu", sparse, sparse_path, [ReaderSpec(0, half), ReaderSpec(half, pages - half)]),
        Workload("rand-2", "cpu", sparse, sparse_path,
                 [ReaderSpec(0, half, random=True), ReaderSpec(half, pages - half, random=True)]),
    ]
    if rate > 0 and rate_s > 0:
        n = min(pages, int(rate * rate_s))
        out.append(Workload(f"rate-{rate / 1000:g}k", "rate", sparse, sparse_path,
                            [ReaderSpec(0, n, random=True, rate=rate)]))
    if dev is not None and data_path is not None:
        dpages = data_size // PAGE_SIZE
        out.append(Workload("dev-seq", "device", dev, data_path,
                            [ReaderSpec(0, dpages, block=1 << 20, fadvise_random=False)]))
        # A shuffled subset, one page in `stride`: every read is a device round trip, so all would take too long.
        n = max(1, min(dpages, dev_random_pages))
        stride = max(1, dpages // n)
        out.append(Workload("dev-rand", "device", dev, data_path,
                            [ReaderSpec(0, n * stride, random=True, stride=stride)]))
    return out


# -- one execution --------------------------------------------------------------------------------------------------
def _spawn(w: Workload, seed: int) -> list[subprocess.Popen]:
    procs = []
    for i, spec in enumerate(w.readers):
        procs.append(subprocess.Popen(spec.argv(w.path, seed + i), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != "ready":
            for q in procs:
                q.kill()
                q.wait()
            raise DuetError(f"bench reader failed to start (exit {p.wait()})")
    return procs


def _finish(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        line = p.stdout.readline()
        rc = p.wait()
        if rc != 0 or not line:
            raise DuetError(f"bench reader failed (exit {rc})")
        out.append(json.loads(line))
    return out


def _cpu() -> tuple[float, float]:
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


def execute(w: Workload, mode: str, run: int, settle_s: float, touch_bytes: int,
            mask: Event = Event.ADDED | Event.REMOVED) -> Sample:
    """Evict, stabilise, start the readers, (attach the engine,) go, and account for every page."""
    if evict(w.path):
        raise DuetError(f"could not evict {w.path} before a run")
    stabilize(settle_s, touch_bytes)
    procs = _spawn(w, seed=run * 16 + 1)
    engine = reg = None
    try:
        setup_s = 0.0
        if mode == "engine":
            from duet_core.engine import Engine

            t = time.monotonic()
            engine = Engine(source="bpf")
            reg = engine.register("bench", mask, w.fs.mnt)
            engine.pump(force=True)
            engine.fetch(reg)
            setup_s = time.monotonic() - t
        before = _cached(w.path)
        delivered = removed = items = 0
        max_fetch = 0.0
        u0, s0 = _cpu()
        busy0, steal0 = _cpu_ticks()
        go = time.monotonic()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        if engine is None:
            for p in procs:
                p.wait()
        else:
            next_tick = go + TICK_S
            while True:
                running = any(p.poll() is None for p in procs)
                now = time.monotonic()
                if running and now < next_tick:
                    time.sleep(min(0.01, next_tick - now))
                    continue
                t = time.monotonic()
                engine.pump(force=True)
                batch = engine.fetch(reg)
                for it in batch.items:
                    if it.flags & Event.ADDED:
                        delivered += it.count
                    if it.flags & Event.REMOVED:
                        removed += it.count
                items += len(batch.items)
                max_fetch = max(max_fetch, time.monotonic() - t)
                next_tick += TICK_S
                if not running:
                    break
        window = time.monotonic() - go
        u1, s1 = _cpu()
        busy1, steal1 = _cpu_ticks()
        results = _finish(procs)
        procs = []
        after = _cached(w.path)
        sample = Sample(
            workload=w.name, mode=mode, run=run,
            elapsed_s=max(r["end"] for r in results) - min(r["start"] for r in results),
            reads=sum(r["reads"] for r in results), pages=after - before,
            reader_user_s=sum(r["user_s"] for r in results), reader_sys_s=sum(r["sys_s"] for r in results),
            proc_cpu_s=(u1 - u0) + (s1 - s0), proc_user_s=u1 - u0, window_s=window,
            delivered_pages=delivered, removed_pages=removed, items=items, max_fetch_s=max_fetch,
            setup_s=setup_s)
        capacity = window * NCPU
        ours = sample.proc_cpu_s + sample.reader_user_s + sample.reader_sys_s
        sample.steal_pct = 100 * (steal1 - steal0) / CLK_TCK / capacity
        sample.other_cpu_pct = max(0.0, 100 * ((busy1 - busy0) / CLK_TCK - ours) / capacity)
        if engine is not None:
            st = engine.stats()
            sample.lost_pages = sum(v for k, v in st.items() if k.startswith("kernel_lost_"))
            sample.kernel_events = st.get("kernel_events", 0)
            sample.kernel_pages = st.get("kernel_pages", 0)
            sample.drains = st.get("drains", 0)
            sample.records = st.get("records", 0)
        return sample
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if engine is not None:
            engine.close()


def attach_probe(w: Workload) -> dict:
    """Attach to first event in a fresh process, on the evicted file of ``w``."""
    evict(w.path)
    proc = subprocess.run([sys.executable, "-m", "duet_core.bench.attach", w.fs.mnt, w.path],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DuetError(f"attach probe failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


# -- the whole benchmark --------------------------------------------------------------------------------------------
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


def accounted(s: Sample) -> bool:
    """Every page the workload generated was delivered or counted as lost (engine runs only)."""
    return s.mode != "engine" or s.delivered_pages + s.lost_pages == s.pages


def summarize(w: Workload, samples: list[Sample]) -> dict:
    base = {s.run: s for s in samples if s.mode == "baseline"}
    eng = [s for s in samples if s.mode == "engine"]
    pairs = [(base[s.run], s) for s in eng if s.run in base]
    wall = [e.elapsed_s / b.elapsed_s for b, e in pairs]
    cpu = [(e.reader_user_s + e.reader_sys_s) / (b.reader_user_s + b.reader_sys_s) for b, e in pairs
           if b.reader_user_s + b.reader_sys_s > 0]
    bpf_ns = [(e.reader_sys_s - b.reader_sys_s) / e.pages * 1e9 for b, e in pairs if e.pages]
    base_s = [s.elapsed_s for s in base.values()]
    return {
        "name": w.name,
        "kind": w.kind,
        "readers": len(w.readers),
        "pages": int(_median([s.pages for s in samples])),
        "delivered_pages": int(_median([s.delivered_pages for s in eng])),
        "lost_pages": int(sum(s.lost_pages for s in eng)),
        "accounted": all(accounted(s) for s in eng),
        "pages_as_expected": all(s.pages == w.pages_expected for s in samples),
        "kernel_pages": int(_median([s.kernel_pages for s in eng])),
        "kernel_events": int(_median([s.kernel_events for s in eng])),
        "baseline_s": round(_median(base_s), 4),
        "engine_s": round(_median([s.elapsed_s for s in eng]), 4),
        "slowdown_pct": _pct(wall),
        "slowdown_pct_range": [round((min(wall) - 1) * 100, 1), round((max(wall) - 1) * 100, 1)] if wall else None,
        "baseline_noise_pct": round(100 * (max(base_s) - min(base_s)) / _median(base_s), 1) if base_s else None,
        "reader_cpu_slowdown_pct": _pct(cpu),
        "bpf_ns_per_event": round(_median(bpf_ns)) if bpf_ns else None,
        "events_per_s": round(_median([s.pages / s.elapsed_s for s in eng if s.elapsed_s])),
        "engine_cpu_pct": round(_median([100 * s.proc_cpu_s / s.window_s for s in eng if s.window_s]), 2),
        "engine_user_pct": round(_median([100 * s.proc_user_s / s.window_s for s in eng if s.window_s]), 2),
        "engine_max_fetch_ms": round(max((s.max_fetch_s for s in eng), default=0) * 1000, 1),
        "records_per_drain": round(_median([s.records / s.drains for s in eng if s.drains])),
        "items_per_s": round(_median([s.items / s.elapsed_s for s in eng if s.elapsed_s])),
        "steal_pct": round(_median([s.steal_pct for s in samples]), 2),
        "other_cpu_pct": round(_median([s.other_cpu_pct for s in samples]), 2),
        "retries": sum(s.attempt for s in samples),
        "runs": [asdict(s) for s in samples],
    }


def measure(w: Workload, mode: str, run: int, settle_s: float, touch_bytes: int, mask: Event, retries: int,
            steal_max: float, other_max: float) -> Sample:
    """:func:`execute`, again (up to ``retries`` times) while the hypervisor or other processes took too much CPU;
    keeps the quietest attempt. A failed accounting is never retried away."""
    best = None
    for attempt in range(retries + 1):
        s = execute(w, mode, run, settle_s, touch_bytes, mask)
        s.attempt = attempt
        if not accounted(s):
            return s
        noisy = s.steal_pct > steal_max or (w.kind != "device" and s.other_cpu_pct > other_max)
        if best is None or s.steal_pct + s.other_cpu_pct < best.steal_pct + best.other_cpu_pct:
            best = s
        if not noisy:
            break
    return best


def run_bench(size: int = 2 << 30, runs: int = 5, settle_s: float = 2.0, touch_bytes: int = 3 << 30,
              fstype: str = "ext4", device_size: int = 2 << 30, dev_random_pages: int = 32768,
              rate: float = 100_000, rate_s: float = 2.0, device: bool = True,
              only: list[str] | None = None, mask: Event = Event.ADDED | Event.REMOVED,
              retries: int = 2, steal_max: float = 3.0, other_max: float = 10.0, prefix: str = "duet-bench-",
              progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Run every workload ``runs`` times without and with the engine; return the report (see module doc)."""
    if os.geteuid() != 0:
        raise DuetError("the engine benchmark mounts loop images, drops caches and loads BPF: run it as root")
    if size < 2 * PAGE_SIZE or size % PAGE_SIZE:
        raise DuetError("--size must be a positive multiple of 4 KiB")
    from duet_core.bpf.build import build

    build()
    started = datetime.now(timezone.utc)
    t_start = time.monotonic()
    with loop_fs(fstype, size_mb=512, prefix=prefix) as sparse_fs:
        sparse_path = make_sparse(sparse_fs, size)
        dev_ctx = loop_fs(fstype, size_mb=(device_size >> 20) * 5 // 4 + 128, direct_io=True,
                          prefix=prefix) if device else None
        dev_fs = dev_ctx.__enter__() if dev_ctx else None
        try:
            data_path = None
            if dev_fs is not None:
                if not loop_dio(dev_fs.loopdev):
                    raise DuetError(f"{dev_fs.loopdev} did not switch to direct I/O")
                progress(f"writing {device_size >> 20} MiB of data on {dev_fs.loopdev} (direct I/O)")
                data_path = make_data(dev_fs, device_size)
            ws = workloads(sparse_fs, sparse_path, size, dev_fs, data_path, device_size, dev_random_pages,
                           rate, rate_s)
            if only:
                ws = [w for w in ws if w.name in only]
                if not ws:
                    raise DuetError(f"no workload named {', '.join(only)}")
            samples: dict[str, list[Sample]] = {w.name: [] for w in ws}
            attach: list[dict] = []
            for run in range(runs):
                # ABBA: alternate which mode goes first, so a drift over the run does not favour either.
                order = ("baseline", "engine") if run % 2 == 0 else ("engine", "baseline")
                for w in ws:
                    for mode in order:
                        progress(f"run {run + 1}/{runs}: {w.name} {mode}")
                        samples[w.name].append(measure(w, mode, run, settle_s, touch_bytes, mask, retries,
                                                       steal_max, other_max))
                progress(f"run {run + 1}/{runs}: attach probe")
                stabilize(settle_s, touch_bytes)
                attach.append(attach_probe(ws[0]))
        finally:
            if dev_ctx is not None:
                dev_ctx.__exit__(None, None, None)
    report_ws = [summarize(w, samples[w.name]) for w in ws]
    return build_report(report_ws, attach, started, time.monotonic() - t_start, {
        "size": size, "runs": runs, "settle_s": settle_s, "touch_bytes": touch_bytes, "fstype": fstype,
        "device_size": device_size if device else 0, "dev_random_pages": dev_random_pages, "rate": rate,
        "rate_s": rate_s, "mask": str(mask), "tick_s": TICK_S, "retries": retries, "steal_max_pct": steal_max,
        "other_cpu_max_pct": other_max})


def build_report(ws: list[dict], attach: list[dict], started: datetime, took_s: float, config: dict) -> dict:
    firsts = [a["attach_to_first_event_s"] for a in attach if a.get("attach_to_first_event_s") is not None]
    attach_sum = {
        "attach_to_first_event_s": round(_median(firsts), 4) if firsts else None,
        "max_s": round(max(firsts), 4) if firsts else None,
        "load_attach_s": round(_median([a["load_attach_s"] for a in attach]), 4) if attach else None,
        "register_s": round(_median([a["register_s"] for a in attach]), 4) if attach else None,
        "first_event_after_read_s": round(_median([a["first_event_after_read_s"] for a in attach
                                                   if a["first_event_after_read_s"] is not None]), 4)
        if firsts else None,
        "import_s": round(_median([a["import_s"] for a in attach]), 4) if attach else None,
        "probes": attach,
    }
    cpu = [w["slowdown_pct"] for w in ws if w["kind"] == "cpu" and w["slowdown_pct"] is not None]
    dev = [w["slowdown_pct"] for w in ws if w["kind"] == "device" and w["slowdown_pct"] is not None]
    rate = [w["engine_cpu_pct"] for w in ws if w["kind"] == "rate"]
    targets = {
        "all_accounted": all(w["accounted"] for w in ws),
        "none_lost": all(w["lost_pages"] == 0 for w in ws),
        "engine_cpu_at_100k_le_10pct": (max(rate) <= TARGETS["engine_cpu_pct_at_100k"]) if rate else None,
        "cpu_bound_slowdown_le_10pct": (max(cpu) <= TARGETS["cpu_slowdown_pct"]) if cpu else None,
        "device_bound_slowdown_le_2pct": (max(dev) <= TARGETS["device_slowdown_pct"]) if dev else None,
        "attach_under_1s": (max(firsts) < TARGETS["attach_s"]) if firsts else None,
    }
    return {
        "bench": "engine",
        "date": started.isoformat(timespec="seconds"),
        "took_s": round(took_s, 1),
        "machine": machine(),
        "config": config,
        "workloads": ws,
        "attach": attach_sum,
        "targets": targets,
        "ok": targets["all_accounted"],
    }
