"""Running tasks over a scope: cache first, one device read shared by every task, gently, resumably.

The loop: pick the pending file with the most pages in the page cache (the engine's EXISTS state, kept current by
page-cache events — pages foreground programs read during the run count as they arrive); when nothing pending is
cached, take the next uncached file in scan order. Either way the file is opened once and handed to every task that
still needs it, one after the other, so the first task's device read serves the rest from the cache. Then the pages
the run itself brought in are evicted (cache hygiene), progress is recorded, and the rate limit is honoured.

Progress is a Roaring bitmap of file ids per task (and done pages per file for range tasks), committed to the state
store at least once a second: a run killed at any point resumes from the last commit. ``--for`` stops after the
current file and commits. SIGTERM and SIGINT stop within a second in every phase: the scan, its reconciliation in
SQL, the planning and the start-up snapshot look for the stop every few files and end with :class:`Stopped`; a
task in the middle of a long item sees it at its next ``ctx.checkpoint()`` and gives the item up (not done, not
failed: the next run does it again); every wait wakes for it. Then progress is committed and ``duet_finish`` is
called as after any early stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import heapq
import logging
import math
import os
import queue
import re
import resource
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyroaring import BitMap

from duet_core import jobs, residency
from duet_core.engine import Engine
from duet_core.errors import DuetError, Stopped, printable, require_directory
from duet_core.events import PAGE_SIZE, Event, FileId
from duet_core.exclude import Exclusions
from duet_core.identity import inode_generation
from duet_core.jobs import REGISTRY
from duet_core.lock import ScopeLock
from duet_core.plugins import LoadedTask, TaskRegistry
from duet_core.residency import pages_of, runs_of  # noqa: F401 - runs_of: also imported from here by plugins
from duet_core.scope import Scope, open_regular
from duet_core.snapshotter import SnapshotChild
from duet_core.state import StateStore, TaskProgress
from duet_core.tasks import FileInfo, ItemContext, ItemResult, PassResult, RunInfo, SharedResults, TaskReport, TaskState

log = logging.getLogger("duet.run")

PLAN_BATCH = 4096
COMMIT_EVERY_S = 1.0   # commit progress at least this often ...
SLOW_ITEM_S = 0.1      # ... and after every item that took this long: a crash then redoes at most one of them
PREFETCH_MAX = 64 << 20       # no file larger than this is read ahead
PREFETCH_BYTES = 32 << 20     # read ahead at most this much ...
PREFETCH_FILES = 256          # ... in at most this many files (small files need many in flight: 64 was slower
                              # here, docs/benchmarks.md; each is one open descriptor, see fd_room)
KEEP_BYTES = 32 << 20         # pages kept cached for tasks that will read a file again (keep_cached), in all
HINT_BATCH = 32               # evictions handed to the hints thread at once (_Hints) ...
HINT_BATCH_BYTES = 4 << 20    # ... or fewer, once they evict this much
ID_CACHE = 1 << 16     # FileId <-> file id pairs kept in memory (the store has them all)
INFO_BATCH = 256       # the run looks its next files up in the store this many at a time
BULK_LOOKUP = 2000     # more touched files than this at once: map them to file ids in one pass over the store
FOREGROUND_QUIET_S = 0.5   # idle I/O: the foreground counts as reading until it has added no page for this long
YIELD_POLL_S = 0.05        # ... while it reads, the run looks for newly cached work this often
YIELD_MAX_S = 600.0        # ... and holds its own device reads back for at most this long in all
NAP_S = 0.05               # every wait (the rate limit, watch's idle wait) looks for a stop this often
BUDGET = "budget"          # stop_reason when the --for budget ran out (the others are signal names)

# Exit codes of `duet run` / `duet watch` (docs/cli.md).
EXIT_OK = 0            # every task finished its round
EXIT_ITEM_ERRORS = 1   # the run finished, but some items failed or parts of the scope could not be read
EXIT_STOPPED = 5       # stopped early (--for budget, SIGTERM/SIGINT); progress saved, the next run resumes
EXIT_DAMAGE = 6        # a task found damage in the data (e.g. scrub: corruption); wins over the codes above


@dataclass
class RunOptions:
    budget_s: float | None = None          # stop cleanly after this many seconds
    rate_limit: float | None = None        # device bytes per second, for the whole run
    idle_io: bool = True                   # ioprio idle class, and uncached files wait while others read the scope
    cache_hygiene: bool = True             # evict what the run itself brought into the cache
    one_file_system: bool = False
    exclude: tuple[str, ...] = ()          # exclude patterns (duet_core.exclude); duet's state is always left out
    source: str = "auto"
    mode: str = "run"                      # "run", or "watch": only what is already cached, until stopped
    watch_interval: float = 0.5
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: int = 1                          # processes for the tasks: 2 = the first task here, the others beside it
    registry: str = REGISTRY               # module:function giving the tasks, in a second process (duet_core.jobs)


class RunUI(Protocol):
    def started(self, reports: dict[str, TaskReport], dataset_bytes: int, source: str) -> None: ...
    def advanced(self, reports: dict[str, TaskReport]) -> None: ...
    def message(self, line: str) -> None: ...
    def finished(self, summary: dict) -> None: ...


class QuietUI:
    def started(self, reports, dataset_bytes, source):
        pass

    def advanced(self, reports):
        pass

    def message(self, line):
        log.info("%s", line)

    def finished(self, summary):
        pass


IOPRIO_WHO_PROCESS, IOPRIO_CLASS_IDLE, SYS_IOPRIO_SET = 1, 3, 251


def set_idle_io() -> bool:
    """Put this process in the idle I/O class: its reads wait while anyone else wants the disk."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_IOPRIO_SET, IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << 13) == 0


# What opening a file the scan saw can fail with when it is no longer there as it was: deleted, replaced (by another
# inode: ESTALE, or by something not a regular file: EINVAL), or a component of its path no longer a directory
# (ENOTDIR) or now a symlink (ELOOP), or leading out of the scope (EXDEV). Any other error is the item's failure.
GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESTALE, errno.EINVAL, errno.ENOTDIR, errno.ELOOP, errno.EXDEV})


def fd_room() -> int:
    """How many more descriptors this process may open: RLIMIT_NOFILE's soft limit less those open now."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return soft - len(os.listdir("/proc/self/fd"))


def read_bytes_io(pid: int | str = "self") -> int:
    """Bytes a process (this one by default) caused to be read from storage (/proc/PID/io read_bytes)."""
    with open(f"/proc/{pid}/io") as fh:
        for line in fh:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


@dataclass
class _Ahead:
    """A file whose device read was started ahead of its turn: its info, an open descriptor, and the pages that
    were resident before (the rest the run brought in). ``started`` is set once its read-ahead has been asked
    for (by :class:`_Hints`): only then may the descriptor be used or closed."""

    file: FileInfo
    fd: int
    pre: BitMap
    started: threading.Event | None = None

    def wait(self) -> None:
        if self.started is not None:
            self.started.wait()


class _Hints:
    """The run's page-cache hints — read-ahead (``POSIX_FADV_WILLNEED``) and eviction (``DONTNEED``) — given in
    a thread of their own, in order. Both return only once the kernel has queued the reads or dropped the pages
    (about 30–60 µs a file here, more while the device's queue is full), time the loop's thread spends on the
    tasks' work instead; the system calls release the GIL. A descriptor handed over is closed here.

    Hints are handed to the thread in batches (:meth:`flush`): waking it costs the loop's thread a futex call and,
    once it runs, turns for the GIL — per file, some 15 % of a run over small files (``perf``, docs/benchmarks.md).
    Read-ahead is flushed by the caller once it has asked for a window of files; evictions when HINT_BATCH files or
    HINT_BATCH_BYTES have gathered, and whenever the loop waits, commits or ends."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._batch: list[tuple] = []
        self._batch_bytes = 0
        self._thread = threading.Thread(target=self._serve, name="duet-hints", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (batch := self._q.get()) is not None:
            for fn, args, done in batch:
                try:
                    fn(*args)
                except OSError:
                    pass        # a hint: the file may have gone meanwhile
                except Exception:   # noqa: BLE001 - a bug here must not stop the hints after it (their waiters hang)
                    log.exception("page-cache hint %s failed", getattr(fn, "__name__", fn))
                finally:
                    if done is not None:
                        done.set()

    def willneed(self, ahead: _Ahead) -> None:
        """Read ``ahead``'s file ahead, once :meth:`flush` hands it over (``ahead.wait()`` waits for that)."""
        ahead.started = threading.Event()
        self._batch.append((os.posix_fadvise, (ahead.fd, 0, ahead.file.size, os.POSIX_FADV_WILLNEED), ahead.started))

    def evict_and_close(self, fd: int, runs: list[tuple[int, int]]) -> None:
        """Evict ``runs`` (first page, count) of ``fd``, then close it."""
        self._batch.append((_evict_and_close, (fd, runs), None))
        self._batch_bytes += sum(c for _, c in runs) * PAGE_SIZE
        if len(self._batch) >= HINT_BATCH or self._batch_bytes >= HINT_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Hand the hints given so far to the thread."""
        if self._batch:
            self._q.put(self._batch)
            self._batch, self._batch_bytes = [], 0

    def close(self) -> None:
        """Wait for every hint given so far, then end the thread."""
        self.flush()
        self._q.put(None)
        self._thread.join()


def _evict_and_close(fd: int, runs: list[tuple[int, int]]) -> None:
    try:
        residency.evict_runs(fd, runs)
    finally:
        os.close(fd)


class _TaskRun:
    """One task's side of a run: its plugin, progress, report and option values."""

    def __init__(self, task: LoadedTask, progress: TaskProgress, run: RunInfo):
        self.task = task
        self.spec = task.spec
        self.progress = progress
        self.run = run
        self.report = TaskReport(task.name)
        self.range_done: dict[int, BitMap] = {}       # file id -> done pages (range tasks), loaded lazily
        self.stored_ranges = BitMap()                 # files with done pages in the store (others need no lookup)
        self.dirty_ranges: set[int] = set()
        self.failed: set[int] = set()                 # failed in this run: retried by the next run, not this one
        self.done_ns: dict[int, int] = {}             # file id -> when this run started processing it (MODIFIED)
        self.planned = False                          # duet_plan was called: duet_finish will be

    @property
    def name(self) -> str:
        return self.spec.name


class Runner:
    """One ``duet run`` (or ``duet watch``) of some tasks over one scope."""

    def __init__(self, store: StateStore, registry: TaskRegistry, task_names: list[str], root: str,
                 opts: RunOptions | None = None, ui: RunUI | None = None, leader: jobs.Leader | None = None):
        if not task_names:
            raise DuetError("no task given", hint="name one or more tasks, e.g. duet run backup scrub --path /home")
        if len(set(task_names)) != len(task_names):
            raise DuetError("a task is named twice")
        self.opts = opts or RunOptions()
        every = [registry.get(n) for n in task_names]
        # --jobs 2: this process leads with the first task; the others run in a follower (duet_core.jobs).
        self._leader = leader                       # this run is a follower: the leader's pipes
        self._follower: jobs.Follower | None = None
        self.follower_tasks: list[str] = []
        if self.opts.jobs > 1 and len(task_names) > 1 and self.opts.mode == "run" and leader is None:
            task_names, self.follower_tasks = jobs.split(task_names)
        self.tasks = [t for t in every if t.name in task_names]
        require_directory(root)
        self.root = os.path.realpath(root)
        self.store = store
        self.ui = ui or QuietUI()
        self.stop_reason: str | None = None
        self._item_started_ns = 0       # when the current item started; also read by the first _absorb
        self.options = {t.name: resolve_options(t, self.opts.task_options.get(t.name, {})) for t in every}
        self.exclude = Exclusions(self.opts.exclude, own=_inside(self.root, store.dir))
        self._early: tuple[Engine, SnapshotChild | None] | None = None   # see _start_early_engine

    # -- the run ---------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        # A follower runs under its leader's lock.
        with contextlib.nullcontext() if self._leader else ScopeLock(self.store.dir, self.root):
            old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                return self._run()
            finally:
                self._close_early_engine()
                if self._follower is not None:
                    self._follower.close()
                for s, h in old.items():
                    signal.signal(s, h)

    def _on_signal(self, signum, _frame) -> None:
        self.stop_reason = signal.Signals(signum).name
        if self._follower is not None:
            self._follower.signal(signum)

    def stopping(self) -> bool:
        """Asked to stop: SIGTERM, SIGINT (or SIGHUP from ``duet watch``'s reload). The ``--for`` budget is not a
        stop of this kind: it ends the run between items, never abandoning one."""
        return self.stop_reason is not None and self.stop_reason != BUDGET

    def _checkpoint(self) -> None:
        """Raise :class:`Stopped` if the run is stopping: called every few files by the scan, the planning and the
        start-up snapshot, so a stop is honoured within a second in every phase of a run."""
        if self.stopping():
            raise Stopped(self.stop_reason)

    def _nap(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early on a stop (a signal does not end a ``time.sleep``: PEP 475)."""
        end = time.monotonic() + seconds
        while not self.stopping():
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, NAP_S))

    def _run(self) -> dict:
        started = time.monotonic()
        io_start = read_bytes_io()
        if self.opts.idle_io:
            set_idle_io()
        store = self.store
        self.scope_id = store.scope_id(self.root)
        self.run_id = store.start_run(self.scope_id, [t.name for t in self.tasks])
        self.scope = scope = Scope(self.root, one_file_system=self.opts.one_file_system, exclude=self.exclude)
        self.runs: list[_TaskRun] = []
        self._todo = BitMap()     # files some task still needs: the union of pending, kept up to date
        self._ahead: dict[int, _Ahead] = {}   # files read ahead, open, not processed yet: all of them in _todo
        self._ahead_bytes = 0                 # ... and their sizes, summed
        source, engine_stats = "none", {}
        phases: dict[str, float] = {}
        dataset_bytes: int | None = None
        try:
            if self.follower_tasks:
                self._start_follower()
            self._start_early_engine()
            phases["engine_load_s"] = time.monotonic() - started
            if self._leader is not None:
                self._leader.wait_go(self.stopping)    # the leader's scan is in the store: ours changes nothing
            with store.interruptible(self.stopping):
                store.sync_files(self.scope_id, self._until_stopped(scope.scan()))
            phases["scan_s"] = time.monotonic() - started
            if self._follower is not None:
                self._follower.go()
            if scope.skipped:   # unreadable, too deep for PATH_MAX, or gone while the walk ran: said, not hidden
                self.ui.message(f"{scope.skipped} director(ies) or entries of the scope could not be read and were "
                                "skipped (run with -v for each)")
            self._ids: dict[FileId, int] = {}   # file id <-> FileId, for files the engine reports: filled on demand
            self._fids: dict[int, FileId] = {}
            self._infos: dict[int, FileInfo | None] = {}   # file id -> its row in the store (see _info)
            dataset_bytes = store.dataset_bytes(self.scope_id)

            self._kept: dict[int, list[tuple[int, int]]] = {}   # files kept cached for a task (keep_cached): runs
            self._kept_bytes = 0                                # ... of at most KEEP_BYTES in all
            t0 = time.monotonic()
            try:
                self._start_tasks()
            except DuetError as exc:   # a task refused the run (its options, its target): nothing is done
                store.end_run(self.run_id, "refused", {"error": str(exc)})
                raise
            phases["plan_s"] = time.monotonic() - t0
            for r in self.runs:
                self._todo |= r.progress.pending
            if self._todo or self.opts.mode == "watch":
                source, engine_stats = self._run_engine(started, phases, dataset_bytes)
            else:   # nothing to do: no snapshot to wait for, no engine to keep
                self._close_early_engine()
                self.ui.started(self._reports(), dataset_bytes, source)
                phases["startup_s"] = time.monotonic() - started
        except Stopped:
            # Stopped before the tasks' work began (the scan, the planning, the start-up snapshot): the scan's
            # transaction rolled back (the last complete scan stands), and the tasks that planned are finished below.
            self._close_early_engine()
        self._finish_follower()

        for r in self.runs:
            if not r.planned:   # stopped before its duet_plan: it never began this run
                continue
            r.report.complete = r.progress.complete
            try:
                extra = r.task.hook.duet_finish(run=r.run, report=r.report)
            except Stopped:   # its own long pass gave way to the stop; the next run does it again
                log.info("%s: duet_finish stopped early (%s)", r.name, self.stop_reason)
                continue
            except Exception as exc:  # noqa: BLE001 - one task's failure to finish is that task's
                self._task_failed(r, "finish", exc)
                continue
            if isinstance(extra, dict):
                r.report.extra.update(extra)
        self._commit(again=False)
        # "complete": nothing left this run could do (failed items wait for the next run); otherwise why it stopped
        # (a stop during duet_finish counts too: a task may have left its publishing to the next run).
        result = "complete"
        if self.stop_reason or (self._todo and self.opts.mode == "run"):
            result = self.stop_reason or "incomplete"
        elif self.opts.mode == "watch" and any(not r.progress.complete for r in self.runs):
            result = "watching"
        reports = {t.name: TaskReport(t.name) for t in self.tasks} | {r.name: r.report for r in self.runs}
        result, follower = self._merge_follower(reports, result)
        summary = {
            "scope": self.root, "result": result, "source": source,
            "exclude": list(self.exclude.patterns), "one_file_system": self.opts.one_file_system,
            "tasks": {name: rep.as_dict() for name, rep in reports.items()},
            "dataset_bytes": store.dataset_bytes(self.scope_id) if dataset_bytes is None else dataset_bytes,
            "scan_skipped": self.scope.skipped,
            "device_read_bytes": read_bytes_io() - io_start + follower.get("device_read_bytes", 0),
            "wall_s": round(time.monotonic() - started, 3),
            "phases": {k: round(v, 3) for k, v in phases.items()},   # scan+sync, planning, engine snapshot
            "engine": engine_stats,
        }
        if self._follower is not None:
            summary["jobs"] = {"follower": follower}
            summary["phases"]["follower_wait_s"] = round(getattr(self, "_follower_wait_s", 0.0), 3)
        store.end_run(self.run_id, result, summary)
        self.ui.finished(summary)
        return summary

    def _until_stopped(self, items: Iterator) -> Iterator:
        """``items`` (the scan's files), raising :class:`Stopped` between two of them once the run is stopping."""
        for item in items:
            if self.stop_reason is not None:
                self._checkpoint()
            yield item

    def _start_early_engine(self) -> None:
        """Load the BPF programs before the scan and start the start-up snapshot in a child process, which reads
        residency while this process scans, syncs and plans (:meth:`Engine.start_snapshot`). Without BPF (polling,
        or BPF failing to load) the engine is made only once some task has work, as before."""
        if self.opts.source == "poll":
            return
        try:
            engine = Engine(source="bpf", skip_own_reads=True, skip_reads_of=self._other_pid())
        except DuetError:   # BPF unavailable, or its object cannot be built: said later, if some task has work
            return
        # A follower (--jobs 2) takes no start-up snapshot: its files come from the leader, cached, and what it
        # reads once the leader is done it reads in scan order (the snapshot's child would take CPU from both).
        self._early = engine, (None if self._leader is not None else engine.start_snapshot(
            self.root, Event.EXISTS | Event.MODIFIED, self.opts.one_file_system, self.exclude))

    def _close_early_engine(self) -> None:
        """Stop the start-up snapshot's child (if still running) and unload the early engine, if not used."""
        early, self._early = self._early, None
        if early:
            engine, child = early
            if child is not None:
                child.close()
            engine.close()

    # -- a second process (--jobs 2, duet_core.jobs) ---------------------------------------------------------------
    def _start_follower(self) -> None:
        self._follower = jobs.Follower(self.root, self.store.dir, self.follower_tasks, jobs.options_record(self.opts),
                                       self.opts.registry)
        self._held: OrderedDict[int, tuple[int, list[tuple[int, int]], int]] = OrderedDict()
        self._held_bytes = 0
        self._hold_files = jobs.hold_files(fd_room())

    def _other_pid(self) -> int:
        """The run's other process (--jobs 2), whose reads this one's engine does not report: the leader's reach
        the follower with each offer, the follower's are no foreground the leader should give way to."""
        if self._leader is not None:
            return self._leader.pid
        if self._follower is not None and self._follower.proc is not None:
            return self._follower.proc.pid
        return 0

    def _reports(self) -> dict[str, TaskReport]:
        """Every task's report so far: this process's, and its follower's as last sent."""
        mine = {r.name: r.report for r in getattr(self, "runs", [])}
        return mine | self._follower.reports if self._follower is not None else mine

    def _hold(self, file_id: int, fd: int, runs: list[tuple[int, int]], nbytes: int) -> None:
        """Keep what this run read of a file cached (``fd`` open) until the follower has acknowledged it."""
        if file_id in self._held:      # offered again (written meanwhile): the earlier offer's pages go now
            self._evict_held(file_id)
        self._held[file_id] = (fd, runs, nbytes)
        self._held_bytes += nbytes

    def _evict_held(self, file_id: int, evict: bool = True) -> None:
        """Evict what was held of the file for the follower — unless the follower keeps it cached for a task of
        its own (``ItemResult.keep_cached``: the follower counts those pages as its own reads, and evicts them)."""
        held = self._held.pop(file_id, None)
        if held is not None:
            fd, runs, nbytes = held
            self._held_bytes -= nbytes
            self._hints.evict_and_close(fd, runs if evict else [])

    def _release_held(self) -> None:
        """The follower is gone: evict everything held for it."""
        for file_id in list(self._held):
            self._evict_held(file_id)

    def _reap(self, wait: bool = False) -> None:
        """Take the follower's acknowledgements (evicting what it is done with), progress and messages. Waits while
        more than HOLD_BYTES (or HOLD_FILES files) are held for it — or, with ``wait``, until it is gone."""
        fw = self._follower
        if fw is None:
            return
        while True:
            full = self._held_bytes > jobs.HOLD_BYTES or len(self._held) > self._hold_files
            for file_id, kept in fw.poll(0.05 if (full or wait) and fw.alive else 0.0):
                self._evict_held(file_id, evict=not kept)
            for line in fw.messages:
                self.ui.message(line)
            fw.messages.clear()
            if not fw.alive:
                self._release_held()
                return
            if wait:
                self.ui.advanced(self._reports())
            elif not full:
                return

    def _finish_follower(self) -> None:
        """Tell the follower this process is done, then wait until it is (its own reads, its tasks' finish)."""
        fw = self._follower
        if fw is None or fw.proc is None or (fw.ended and not fw.alive):
            return
        fw.end()
        t0 = time.monotonic()
        self._reap(wait=True)
        self.ui.advanced(self._reports())     # the follower's last word
        if fw.wait(timeout=30) is None:
            fw.close()
        self._follower_wait_s = time.monotonic() - t0

    def _merge_follower(self, reports: dict[str, TaskReport], result: str) -> tuple[str, dict]:
        """Fold the follower's tasks into this run's reports and result; returns (result, what the follower said)."""
        fw = self._follower
        if fw is None:
            return result, {}
        out = fw.summary or {}
        for name in fw.tasks:
            rep = reports[name] = fw.reports.get(name) or TaskReport(name)
            if not out:
                why = fw.error or "it ended without a summary"
                rep.items_failed += 1
                rep.errors.append(f"the second process (--jobs) failed: {why}")
                self.ui.message(f"{name}: the second process (--jobs) failed: {why}")
        theirs = out.get("result", "incomplete")
        if result == "complete" and theirs != "complete":
            result = theirs
        return result, {"tasks": fw.tasks, "result": theirs, "wall_s": out.get("wall_s"),
                        "device_read_bytes": out.get("device_read_bytes", 0), "phases": out.get("phases", {})}

    def _run_engine(self, started: float, phases: dict, dataset_bytes: int) -> tuple[str, dict]:
        """The processing loop, with the page-cache engine watching the scope; returns its source and counters."""
        engine, child = self._early or (Engine(source=self.opts.source, skip_own_reads=True,
                                               skip_reads_of=self._other_pid()), None)
        with engine:
            self.engine = engine
            if engine.source_warning:
                self.ui.message(engine.source_warning)
            engine.on_rescan = self._on_rescan
            engine.checkpoint = self._checkpoint   # the start-up snapshot of a large scope gives way to a stop
            t0 = time.monotonic()
            # State (what is cached, what is dirty) is read from the engine's shared file states; only range tasks
            # that count foreground reads need page events, through a second registration.
            # The start-up snapshot is what the child started before the scan read (_start_early_engine), or else
            # read now: only the files some task still needs (a resumed round: a few).
            self.reg = engine.register("duet-run", Event.EXISTS | Event.MODIFIED, self.root,
                                       self.opts.one_file_system, scope=self.scope,
                                       snapshot=child or (() if self._leader is not None else self._pending_files()),
                                       exclude=self.exclude)
            self.reg_added = None
            if any(r.spec.granularity == "range" and r.spec.events & Event.ADDED for r in self.runs):
                self.reg_added = engine.register("duet-run-reads", Event.ADDED | Event.DIRTIED, self.root,
                                                 self.opts.one_file_system, scope=self.scope, snapshot=(),
                                                 exclude=self.exclude)
            # Files every task is done with have their events dropped in the kernel — unless a task wants to hear
            # of writes to them (MODIFIED puts them back in the round).
            self._wants_modified = any(r.spec.events & Event.MODIFIED for r in self.runs)
            self.ui.started(self._reports(), dataset_bytes, engine.source_name)
            phases["snapshot_s"] = time.monotonic() - t0
            self._heap: list[tuple[int, int]] = []
            self._absorb()
            phases["startup_s"] = time.monotonic() - started
            self._loop(started)
            if self._yielded_s:
                phases["foreground_wait_s"] = self._yielded_s   # files not cached waited for other programs
            stats = {k: v for k, v in engine.stats().items()
                     if k.startswith(("kernel_lost", "resyncs", "kernel_ignored", "kernel_pages"))}
            for reg in (self.reg, self.reg_added):
                if reg:
                    engine.unregister(reg)
            return engine.source_name, stats

    def _pending_files(self):
        """``(fid, relpath)`` of the files some task still needs (``_todo``), streamed from the state store; None
        when that is every file of the scope (a new round), which the engine reads faster from the scope itself."""
        todo = self._todo
        if len(todo) >= len(self.scope.files):
            return None
        return ((f.fid, f.relpath) for f in self.store.files_in(self.scope_id, todo))

    def _file_id(self, fid: FileId) -> int | None:
        """The scope's compact id of ``fid``, or None if it is not a file of the scope (yet)."""
        file_id = self._ids.get(fid)
        if file_id is None:
            file_id = self.store.file_id(self.scope_id, fid)
            if file_id is not None:
                if len(self._ids) >= ID_CACHE:   # a cache, not a copy of the scope: start over when full
                    self._ids.clear()
                    self._fids.clear()
                self._ids[fid], self._fids[file_id] = file_id, fid
        return file_id

    def _learn_ids(self, fids) -> None:
        """Look up many FileIds at once (a start-up snapshot of a cached tree): one pass over the scope's files."""
        want = set(fids) - self._ids.keys()
        for fid, file_id in self.store.file_ids(self.scope_id):
            if fid in want:
                self._ids[fid], self._fids[file_id] = file_id, fid

    def _fid(self, file_id: int) -> FileId | None:
        fid = self._fids.get(file_id)
        if fid is None:
            f = self._info(file_id)
            if f is not None:
                if len(self._fids) >= ID_CACHE:
                    self._ids.clear()
                    self._fids.clear()
                fid = self._fids[file_id] = f.fid
        return fid

    def _info(self, file_id: int) -> FileInfo | None:
        """The file's row in the store, as scanned. The run goes through the files in id order, so a miss loads
        the next INFO_BATCH rows at once (one query instead of one per file); the cache is dropped when it fills
        and whenever a rescan changes the store."""
        f = self._infos.get(file_id)
        if f is None and file_id not in self._infos:
            if len(self._infos) >= ID_CACHE:
                self._infos.clear()
            for g in self.store.files_from(self.scope_id, file_id, INFO_BATCH):
                self._infos[g.id] = g
            f = self._infos.setdefault(file_id, None)    # None: not in the store (gone); remembered as such
        return f

    def exit_code(self, summary: dict) -> int:
        if any(t.get("items_damaged") for t in summary["tasks"].values()):
            return EXIT_DAMAGE
        if summary["result"] not in ("complete",):
            return EXIT_STOPPED
        if any(t["items_failed"] for t in summary["tasks"].values()) or summary.get("scan_skipped"):
            return EXIT_ITEM_ERRORS     # a part of the scope left out (unreadable, too deep) is a failure too
        return EXIT_OK

    # -- rounds ----------------------------------------------------------------------------------------------------
    def _start_tasks(self) -> None:
        """Open each task's round (a new one after a complete round), and plan the files new to it: ``self.runs``.

        Planning reads the scope's files from the state store once, in batches, and hands each batch to every
        task that has files in it to plan. A stop between batches raises :class:`Stopped`: what was planned is not
        kept (the next run plans those files again), and the tasks whose ``duet_plan`` was called are finished.
        """
        store, sid = self.store, self.scope_id
        all_ids = store.all_ids(sid)
        runs: list[_TaskRun] = []
        news: list[BitMap] = []
        for task in self.tasks:
            name = task.name
            run = RunInfo(self.run_id, self.root, name, self.options[name], self.opts.mode,
                          state=TaskState(lambda k, d=None, name=name: store.kv_get(name, k, d),
                                          lambda k, v, name=name: store.kv_put(name, k, v),
                                          lambda k, name=name: store.kv_delete(name, k),
                                          lambda keys, name=name: store.kv_get_many(name, list(keys))),
                          shared=SharedResults(lambda f, n: store.shared_get(f, n),
                                               lambda f, n, v, name=name: store.shared_put(f, n, v, name)),
                          files=lambda: store.files(sid), release_cached=self._release_kept,
                          stopping=self.stopping, one_file_system=self.opts.one_file_system,
                          exclude=self.exclude)
            prog = store.progress(sid, name)
            if prog.complete:
                prog = TaskProgress(round=prog.round + 1, complete=False)
                store.clear_range_done(sid, name)
                new = BitMap(all_ids)
            else:
                new = all_ids - prog.planned
                prog.relevant &= all_ids
                prog.done &= all_ids
            run.round = prog.round
            tr = _TaskRun(task, prog, run)
            if task.spec.granularity == "range":
                tr.stored_ranges = store.range_done_ids(sid, name)
            runs.append(tr)
            news.append(new)
        self.runs = runs
        chosen = self._plan(runs, news)
        for tr, new in zip(runs, news):
            prog = tr.progress
            if tr.name in chosen:
                prog.relevant |= chosen[tr.name]
                prog.planned |= new
            tr.report.items_total = len(prog.relevant)
            tr.report.items_done = len(prog.done & prog.relevant)
            if not prog.pending and tr.name in chosen:
                prog.complete = True
        with store.tx():
            for tr in runs:
                store.save_progress(sid, tr.name, tr.progress)

    def _task_failed(self, r: _TaskRun, hook: str, exc: Exception) -> None:
        r.report.items_failed += 1
        r.report.errors.append(f"duet_{hook} failed: {type(exc).__name__}: {exc}")
        self.ui.message(f"{r.name}: duet_{hook} failed: {type(exc).__name__}: {exc}")

    def _plan(self, runs: list[_TaskRun], news: list[BitMap]) -> dict[str, BitMap]:
        """``duet_plan`` of every task over the files new to it — at least once per run, with an empty batch if none
        is new, so a task can check its options. A task whose plan raises sits this run out (its round stays open,
        so the next run plans again) and is missing from the result; a DuetError refuses the whole run."""
        chosen = {tr.name: BitMap() for tr in runs}
        union = BitMap.union(*news) if news else BitMap()
        batch: list[FileInfo] = []
        calls = []

        def flush():
            self._checkpoint()
            for tr, new in zip(runs, news):
                if tr.name not in chosen:
                    continue
                mine = batch if len(new) == len(union) else [f for f in batch if f.id in new]
                if not mine and calls:
                    continue
                tr.planned = True
                try:
                    picked = tr.task.hook.duet_plan(run=tr.run, files=mine)
                except DuetError:
                    raise   # the task refuses the run (a bad option, a target it cannot use)
                except Exception as exc:  # noqa: BLE001 - one task's failure to plan is that task's
                    self._task_failed(tr, "plan", exc)
                    del chosen[tr.name]
                    continue
                if picked is None:
                    chosen[tr.name].update(f.id for f in mine)
                else:
                    chosen[tr.name].update(BitMap(picked) & new)
            calls.append(len(batch))
            batch.clear()

        for f in self.store.files_in(self.scope_id, union):
            batch.append(f)
            if len(batch) >= PLAN_BATCH:
                flush()
        if batch or not calls:
            flush()   # every run calls duet_plan at least once (an empty batch): a task checks its options there
        return chosen

    # -- the loop --------------------------------------------------------------------------------------------------
    def _loop(self, started: float) -> None:
        self.store.begin_batch()
        # The scope's root stays open for the loop: every file is opened beneath it (never through a symlink).
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._hints = _Hints()
        try:
            self._loop_inner(started)
            self._finish_follower()
        finally:
            self._drop_prefetched()
            if self._follower is not None:
                self._follower.close()   # after an error: killed (it was reaped above otherwise)
                self._release_held()
            self._hints.close()     # every eviction asked for is done before the run reports
            for file_id in list(self._kept):
                self._release_kept(file_id)
            os.close(self._root_fd)
            self._commit(again=False)

    def _drop_prefetched(self) -> None:
        """A run that stops early leaves nothing it read ahead in the cache (cache hygiene)."""
        for file_id in list(self._ahead):
            self._release_ahead(file_id)

    def _release_kept(self, file_id: int) -> None:
        """Evict what the run read of a file a task kept cached (``ItemResult.keep_cached``), now."""
        runs = self._kept.pop(file_id, None)
        f = self._info(file_id) if runs else None
        if f is None:
            return
        self._kept_bytes -= sum(c for _, c in runs) * PAGE_SIZE
        try:
            fd = open_regular(self._root_fd, f.relpath, f.fid.ino)
        except OSError:
            return      # gone or replaced: its pages went with it
        try:
            for first, count in runs:
                residency.evict(fd, first * PAGE_SIZE, count * PAGE_SIZE)
        finally:
            os.close(fd)

    def _take_ahead(self, file_id: int) -> _Ahead | None:
        """The file's read-ahead, if it was read ahead, no longer counted as in flight."""
        ahead = self._ahead.pop(file_id, None)
        if ahead is not None:
            self._ahead_bytes -= ahead.file.size
        return ahead

    def _leave(self, file_id: int) -> None:
        """No task needs the file any more in this run: out of the schedule, and out of the read-ahead."""
        self._todo.discard(file_id)
        if file_id in self._ahead:
            self._release_ahead(file_id)

    def _release_ahead(self, file_id: int) -> None:
        """Forget a file read ahead and not processed: evict what the read-ahead brought in, close it."""
        self._release(self._take_ahead(file_id))

    def _release(self, ahead: _Ahead) -> None:
        ahead.wait()
        runs = []
        if self.opts.cache_hygiene:
            try:
                runs = runs_of(residency.resident_pages(ahead.fd, ahead.file.size) - ahead.pre)
            except OSError:
                pass
        self._hints.evict_and_close(ahead.fd, runs)

    def _loop_inner(self, started: float) -> None:
        self._last_commit = time.monotonic()
        self._device_bytes = 0
        self._started = started
        self._item_io = 0                          # /proc/self/io read_bytes when the current task got its item
        self._prefetch_cursor = -1                 # the last file id prefetched
        self._prefetch_window = min(PREFETCH_BYTES, self.store.dataset_bytes(self.scope_id) // 16)
        self._prefetch_files = max(1, min(PREFETCH_FILES, fd_room() // 2))   # each is an open descriptor
        self._last_read_device = False             # prefetch only once tasks are seen reading what is not cached
        self._all_read_data = all(r.spec.reads_data for r in self.runs)
        self._item_started_ns = 0
        self._foreground_added = 0          # pages others brought in since the engine attached (_foreground_reading)
        self._foreground_at = -FOREGROUND_QUIET_S
        self._yielded_s = 0.0
        self._cached_only = self.opts.mode == "watch"   # process only what needs no device read (watch, yielding)
        self._yielding = False
        self._offered: dict[int, BitMap] = {}   # file id -> its cached pages when last offered while yielding
        self._passed: set[str] = set()          # tasks offered duet_device_pass in this run (once each)
        self._shared_first: BitMap | None = None  # files other tasks need, read before a lone task's (see above)
        self._pass_recheck = 0                  # ... the size of _todo below which to look again for a lone task
        if self._leader is not None:
            self._follow(started)
        while self.stop_reason is None:
            if self.opts.budget_s is not None and time.monotonic() - started >= self.opts.budget_s:
                self.stop_reason = BUDGET
                break
            yielding = self._yielding = self.opts.mode == "run" and self._foreground_reading()
            self._cached_only = yielding or self.opts.mode == "watch"
            pick = self._pick_cached()
            cached_pass = pick is not None
            if pick is None and yielding:
                self._yield_wait()
                continue
            if pick is None and self.opts.mode == "run":
                if self._device_pass():
                    continue
                pick = self._pick_uncached()
            if pick is None:
                if self.opts.mode == "run" and not self._todo:
                    break
                self._idle_wait()
                continue
            if not cached_pass and self._last_read_device:
                self._prefetch_ahead(pick)
            t0 = time.monotonic()
            self._process_file(pick, cached_pass)
            slow = time.monotonic() - t0 >= SLOW_ITEM_S
            self._reap()
            self._absorb()
            self._throttle()
            self._commit_due(now=slow)
        self.ui.advanced(self._reports())

    def _commit_due(self, now: bool = False) -> None:
        """Commit progress and show it, if ``now`` (after an item that took a while) or COMMIT_EVERY_S after the
        last commit. The hints given so far go first: a crash after the commit leaves none of their pages."""
        if now or time.monotonic() - self._last_commit >= COMMIT_EVERY_S:
            self._hints.flush()
            self._commit()
            self.ui.advanced(self._reports())

    def _follow(self, started: float) -> None:
        """A follower's first phase (duet_core.jobs): the files its leader offers, while the leader keeps them cached,
        each acknowledged in order once this run's tasks are done with it; nothing uncached is read. Ends when the
        leader is done (or gone), then the run goes on as any run: what is left, it reads itself."""
        leader = self._leader
        offers = leader.offers
        self._cached_only = True
        while self.stop_reason is None and not (leader.ended and not offers):
            if self.opts.budget_s is not None and time.monotonic() - started >= self.opts.budget_s:
                self.stop_reason = BUDGET
                break
            slow = False
            if not offers:
                leader.take(NAP_S)
            if offers:
                file_id, read = offers.popleft()
                t0 = time.monotonic()
                if self._needs(file_id):
                    self._process_file(file_id, cached_pass=True, lead_read=pages_of(read))
                leader.ack(file_id, kept=file_id in self._kept)
                slow = time.monotonic() - t0 >= SLOW_ITEM_S
            self._absorb()
            self._commit_due(now=slow)
        leader.take(0.0)
        for file_id, _ in offers:     # stopping: what the leader still holds for us may go
            leader.ack(file_id)
        offers.clear()
        self._cached_only = False
        # The leader's reads were "someone else's" to this run: they are over, so it need not wait for them.
        self._foreground_added, self._foreground_at = self.engine.counters["pages_added"], -FOREGROUND_QUIET_S

    def _needs(self, file_id: int) -> list[_TaskRun]:
        return [r for r in self.runs if file_id in r.progress.relevant and file_id not in r.progress.done
                and file_id not in r.failed]

    def _file_state(self, file_id: int):
        """The engine's state of a file (what is cached, what is dirty), or None: nothing of it cached."""
        fid = self._fid(file_id)
        return self.engine.files.get(fid) if fid else None

    def _resident(self, file_id: int) -> int:
        st = self._file_state(file_id)
        return len(st.exists) if st else 0

    def _requeue(self, r: _TaskRun, file_id: int) -> None:
        self._offered.pop(file_id, None)   # written since: new content to offer
        if file_id in r.progress.done:
            r.report.items_done -= 1
        r.progress.done.discard(file_id)
        r.progress.relevant.add(file_id)
        r.progress.complete = False
        r.range_done.pop(file_id, None)
        self._todo.add(file_id)

    def _ready(self, file_id: int, resident: int) -> bool:
        """Watch mode, and a run while others read the scope, process only what needs no device read: whole
        cached files, or cached pages."""
        if not self._cached_only:
            return True
        f = self._info(file_id)
        if f is None:
            return False
        needs = self._needs(file_id)
        if any(r.spec.granularity == "range" for r in needs):
            return True
        # Whole-file tasks: compare with the file's size now, not at the scan (it may have been rewritten shorter).
        try:
            fd = open_regular(self._root_fd, f.relpath)
        except OSError:
            return False
        try:
            pages = (os.fstat(fd).st_size + PAGE_SIZE - 1) // PAGE_SIZE
        finally:
            os.close(fd)
        return bool(needs) and resident >= pages

    def _absorb(self) -> None:
        """Fold page-cache changes into the schedule: cached files onto the heap, files written during the run back
        to pending (tasks that asked for MODIFIED), foreground reads to range tasks (``duet_observe``).

        A stopping run schedules nothing more: the first call after the start-up snapshot of a large cached tree
        takes a while, so it gives way to a stop (what it would have scheduled is the next run's to find)."""
        if self.stopping() or self.engine.quiet(self.reg, self.reg_added):
            return
        fids, resync = self.engine.fetch_touched(self.reg)
        if resync:
            fids = set(fids) | set(self.engine.files)
        if len(fids) > BULK_LOOKUP:
            self._learn_ids(fids)
        touched = {i for i in map(self._file_id, fids) if i is not None}
        for file_id in touched:
            if self.stopping():
                return
            st = self.engine.files.get(self._fid(file_id))
            if st is None:
                continue
            # Written after a task processed it: dirtied since (still dirty, or already written back).
            for r in self.runs:
                if (r.spec.events & Event.MODIFIED and file_id in r.progress.done
                        and st.last_dirty_ns > r.done_ns.get(file_id, 1 << 63)):
                    self._requeue(r, file_id)
        if self.reg_added is not None:
            added: dict[int, BitMap] = {}
            for item in self.engine.fetch(self.reg_added).items:
                file_id = self._file_id(item.fid)
                if file_id is not None and item.flags & Event.ADDED and not item.flags & Event.DIRTIED:
                    added.setdefault(file_id, BitMap()).add_range(item.index, item.index + item.count)
            for file_id, pages in added.items():
                self._observe(file_id, pages)
        for file_id in touched:
            if self.stopping():
                return
            if self._needs(file_id):
                n = self._resident(file_id)
                if n:
                    heapq.heappush(self._heap, (-n, file_id))

    def _observe(self, file_id: int, pages: BitMap) -> None:
        for r in self._needs(file_id):
            if r.spec.granularity != "range" or not r.spec.events & Event.ADDED:
                continue
            f = self._info(file_id)
            done = r.task.hook.duet_observe(run=r.run, file=f, added=runs_of(pages))
            if done:
                self._mark_ranges(r, f, pages_of(list(done)), counted=True)

    def _pick_cached(self) -> int | None:
        while self._heap:
            neg, file_id = heapq.heappop(self._heap)
            if not self._needs(file_id):
                continue
            n = self._resident(file_id)
            if n and n != -neg:
                heapq.heappush(self._heap, (-n, file_id))   # stale count: requeue with the current one
                continue
            if n and self._ready(file_id, n):
                if self._yielding:
                    # Offered while waiting for others, with these pages cached, and still pending: again only once
                    # more is cached (each of their reads would otherwise hand it over again).
                    st = self._file_state(file_id)
                    cached = BitMap(st.exists) if st else BitMap()
                    if file_id in self._offered and cached <= self._offered[file_id]:
                        continue
                    self._offered[file_id] = cached
                return file_id
        return None

    def _pick_uncached(self) -> int | None:
        order = self._uncached_order()
        return order.min() if order else None

    def _uncached_order(self) -> BitMap:
        """The uncached files left, walked in id (scan) order: all of them — or, while one task could take the rest
        in a pass of its own (``duet_device_pass``), first the files the other tasks need, read once for all (a
        nightly ``backup scrub``: the backup's changed files), so that what is left is the lone task's."""
        if self._shared_first is None:
            self._shared_first = BitMap()
            passers = [r for r in self.runs if r.task.hook.duet_device_pass.get_hookimpls()]
            if len(passers) == 1 and len(self.runs) > 1 and not self.opts.rate_limit:
                self._shared_first = BitMap.union(*(r.progress.pending for r in self.runs
                                                    if r is not passers[0])) & self._todo
        while self._shared_first:
            first = self._shared_first.min()
            if first in self._todo:
                return self._shared_first
            self._shared_first.discard(first)
            if not self._shared_first:
                self._prefetch_cursor = -1    # from here in plain scan order: read ahead from the lowest id again
        return self._todo

    def _prefetch_ahead(self, file_id: int) -> None:
        """Keep the device busy with the next uncached files while the tasks work on this one (I/O overlaps CPU).

        Up to PREFETCH_FILES files (and half the descriptors the process may still open: ``ulimit -n``) and
        PREFETCH_BYTES ahead in the run's order, and never more than a sixteenth of the data set (one file is always
        allowed; none above PREFETCH_MAX), so the page cache the run uses stays small
        and most files are still open to foreground reads, while many reads are queued at once — what small files
        need to come near the device's speed. Their pages count as brought in by the run: evicted after use, and
        read from the device in the report.

        The window is topped up once half of it is used (files or bytes), and the read-ahead of all the files added
        then is handed to the hints thread at once (:class:`_Hints`), not a file at a time.
        """
        window = self._prefetch_window
        if len(self._ahead) > self._prefetch_files // 2 or self._ahead_bytes > window // 2:
            return
        try:
            self._fill_ahead(file_id, window)
        finally:
            self._hints.flush()     # before anyone waits for one of them (_Ahead.wait)

    def _fill_ahead(self, file_id: int, window: int) -> None:
        nxt = max(file_id, self._prefetch_cursor)
        order = self._uncached_order()
        while len(self._ahead) < self._prefetch_files and self._ahead_bytes < window:
            if not order or order.max() <= nxt:
                return
            nxt = order.next_set_bit(nxt + 1)
            if nxt in self._ahead or nxt not in self._todo:
                continue
            if not self._all_read_data and not any(r.spec.reads_data for r in self._needs(nxt)):
                continue          # only tasks that read little data need it (defrag): nothing to read ahead
            f = self._info(nxt)
            if f is None or not f.size:
                continue
            if f.size > PREFETCH_MAX or (self._ahead_bytes and self._ahead_bytes + f.size > window):
                return
            self._prefetch_cursor = nxt
            try:
                fd = open_regular(self._root_fd, f.relpath)
            except OSError:
                continue
            try:
                pre = residency.resident_pages(fd, f.size)
            except OSError:
                os.close(fd)
                continue
            if pre:   # partly cached: someone may be reading it right now; let them bring the rest
                os.close(fd)
                continue
            ahead = self._ahead[nxt] = _Ahead(f, fd, pre)   # kept open: processing it needs no second open
            self._ahead_bytes += f.size
            self._hints.willneed(ahead)

    def _idle_wait(self, seconds: float | None = None) -> None:
        """Watch mode (or nothing cached), or waiting for other programs: wait for the page cache to bring work."""
        self._hints.flush()
        self._nap(self.opts.watch_interval if seconds is None else seconds)
        self._absorb()
        self._commit_due()

    def _foreground_reading(self) -> bool:
        """Idle I/O, done where the kernel cannot: while other processes bring pages of the scope into the cache,
        the run reads nothing uncached itself. It works on what they cache (whole cached files for whole-file
        tasks, cached pages for range tasks: data it would otherwise read itself later) and leaves them the device.
        The ioprio idle class alone does not do this on most set-ups (no I/O scheduler, a loop or network device, a
        RAID or dm layer in between). The engine does not report the run's own reads (``skip_own_reads``), so every
        ADDED page it counts is someone else's. At most YIELD_MAX_S in all: a foreground that never pauses delays
        the run, but does not stall it."""
        if not self.opts.idle_io or not self.engine.own_reads_skipped or self._yielded_s >= YIELD_MAX_S:
            return False
        added = self.engine.counters["pages_added"]
        if added != self._foreground_added:
            self._foreground_added, self._foreground_at = added, time.monotonic()
        return self._foreground_recent()

    def _foreground_recent(self) -> bool:
        """Other programs added pages of the scope within the last FOREGROUND_QUIET_S (as last looked at)."""
        return time.monotonic() - self._foreground_at < FOREGROUND_QUIET_S

    def _yield_wait(self) -> None:
        if not self._yielded_s:
            log.info("other processes are reading the scope: files not cached wait while they do (idle I/O)")
        t0 = time.monotonic()
        self._idle_wait(YIELD_POLL_S)
        self._yielded_s += time.monotonic() - t0

    def _throttle(self, in_item: int = 0) -> None:
        """--rate-limit: wait while the run's device reads — the items' before, plus ``in_item`` bytes of the one
        in progress — are ahead of the rate since the run started (a stop wakes the wait)."""
        rate = self.opts.rate_limit
        if rate:
            ahead = (self._device_bytes + in_item) / rate - (time.monotonic() - self._started)
            if ahead > 0:
                self._hints.flush()
                self._nap(min(ahead, 5.0))

    def _pace(self) -> None:
        """--rate-limit within an item (``ItemContext.checkpoint``): with what this process read since the current
        task was handed the item (/proc/self/io), so one large file is read at the rate, not at full speed followed
        by a long pause."""
        if self.opts.rate_limit:
            self._throttle(max(0, read_bytes_io() - self._item_io))

    # -- a task's own pass ------------------------------------------------------------------------------------------
    def _device_pass(self) -> bool:
        """Before the run reads an uncached file: if only one task still needs any — from the start, or once the
        others are done (a nightly backup with a few changed files, and a scrub whose period came round) — offer it
        ``duet_device_pass``, once (not with --rate-limit). Returns True if the task's hook ran."""
        if self.opts.rate_limit or self.stopping() or len(self._todo) > self._pass_recheck > 0:
            return False
        # Cheap first (bitmap sizes): the tasks with work left that has not failed in this run.
        active = [r for r in self.runs if len(r.progress.relevant) - len(r.progress.done) > len(r.failed)]
        if len(active) != 1 or active[0].name in self._passed:
            return False
        wanting = [(r, p) for r in self.runs if (p := (r.progress.pending - BitMap(r.failed)) & self._todo)]
        if len(wanting) != 1 or wanting[0][0] is not active[0]:
            self._pass_recheck = max(1, len(self._todo) - max(1024, len(self._todo) // 8))   # not every file
            return False
        r, pending = wanting[0]
        self._passed.add(r.name)
        if not r.task.hook.duet_device_pass.get_hookimpls():
            return False
        report = r.report
        base = (report.bytes_processed, report.bytes_from_device)
        shown = time.monotonic()

        def progress(nbytes: int) -> None:
            nonlocal shown
            report.bytes_processed, report.bytes_from_device = base[0] + nbytes, base[1] + nbytes
            if time.monotonic() - shown >= 0.25:
                shown = time.monotonic()
                self.ui.advanced(self._reports())

        def give_way() -> bool:
            if self.opts.budget_s is not None and time.monotonic() - self._started >= self.opts.budget_s:
                return True
            self.engine.pump(force=True)   # a reader that starts now is seen within a poll
            return self._foreground_reading()

        started_ns = time.monotonic_ns()
        self._hints.flush()
        try:
            result = r.task.hook.duet_device_pass(
                run=r.run, pending=lambda: self.store.files_in(self.scope_id, pending),
                give_way=give_way, progress=progress)
        except Stopped:
            result = None
            if not self.stopping():
                self.ui.message(f"{r.name}: duet_device_pass raised Stopped while the run was not stopping")
        except Exception as exc:  # noqa: BLE001 - the files go through duet_process instead
            result = None
            self.ui.message(f"{r.name}: duet_device_pass failed, each file is read instead: "
                            f"{type(exc).__name__}: {exc}")
        finally:
            report.bytes_processed, report.bytes_from_device = base
        if not isinstance(result, PassResult):
            return True
        done = BitMap(result.done) & pending
        nbytes = sum(f.size for f in self.store.files_in(self.scope_id, done))
        report.bytes_processed += nbytes
        report.bytes_from_device += result.from_device
        report.bytes_from_cache += max(0, nbytes - result.from_device)
        self._device_bytes += result.from_device
        for k, v in result.counters.items():
            report.counters[k] = report.counters.get(k, 0) + v
        if result.message:
            self.ui.message(f"{r.name}: {result.message}")
        self._item_started_ns = started_ns      # MODIFIED: written after the pass began counts as written since
        for file_id in done:
            r.range_done.pop(file_id, None)
            if file_id in r.stored_ranges:
                r.dirty_ranges.add(file_id)     # its done pages are deleted from the store at the commit
            self._mark_done(r, file_id)
        self._commit()
        self.ui.advanced(self._reports())
        return True

    # -- one file --------------------------------------------------------------------------------------------------
    def _process_file(self, file_id: int, cached_pass: bool, lead_read: BitMap | None = None) -> None:
        """Hand one file to every task that needs it, one after the other, then clean up. ``lead_read``: pages the
        leader of this run (--jobs 2) read from the device just now, counted as this run's own reads."""
        ahead = self._take_ahead(file_id)
        if ahead is not None:
            ahead.wait()
        if ahead is not None and not self._still_at(ahead):
            self._release(ahead)
            ahead = None
        f = ahead.file if ahead else self._info(file_id)
        needs = sorted(self._needs(file_id), key=lambda r: r.spec.granularity != "file")
        if f is None or not needs:
            if ahead:
                os.close(ahead.fd)
            return
        try:
            fd = ahead.fd if ahead else open_regular(self._root_fd, f.relpath)
        except OSError as exc:
            if exc.errno in GONE_ERRNOS:
                self._vanished(f, needs, f"cannot open: {exc.strerror}")
            else:   # there but unreadable (permissions, out of descriptors): a failure the user must hear of
                for r in needs:
                    self._item_failed(r, f, f"cannot open: {exc.strerror}")
            return
        handed = False      # fd passed on to _hints, which closes it
        try:
            st = os.fstat(fd)
            if st.st_ino != f.fid.ino:
                self._vanished(f, needs, "replaced since the scan")
                return
            if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (f.size, f.mtime_ns, f.ctime_ns):
                f = FileInfo(f.id, f.fid, f.relpath, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            pre = ahead.pre if ahead else residency.resident_pages(fd, f.size)
            resident_now = pre
            if lead_read:
                pre = pre - lead_read
            # Resident pages this process's tasks did not read: the leader's reads were charged to its own task.
            self._attributed = len(pre) + len(lead_read or ())
            self._item_started_ns = time.monotonic_ns()
            # One task after the other on the same open file: the first reads from the device, the rest find the
            # pages cached. (Running them in threads at once was measured slower here: see docs/benchmarks.md.)
            # The resident pages the next task's item can use without counting again: those just counted for a
            # file not read ahead (the first task), or every page once a count after a task found them all.
            known = None if ahead else resident_now
            keep = False    # a task will read the file again later in the run
            for i, r in enumerate(needs):
                whole = known is not None and len(known) >= f.pages    # nothing left for this task to bring in
                ctx = self._item(r, f, fd, cached_pass, pre, resident=known)
                known = None
                if ctx is None:
                    continue
                if self.opts.rate_limit:
                    self._item_io = read_bytes_io()
                try:
                    result, failed = self._call(r, ctx)
                except Stopped:
                    # Given up for a stop: neither done nor failed, so the next run hands it over again; no task
                    # after this one starts on it. The pages read for it are evicted below, as always.
                    break
                if failed:
                    continue
                keep = keep or (isinstance(result, ItemResult) and result.keep_cached)
                share = 0
                # What this task brought into the cache is its device share — unless it said itself, and no task
                # after it needs the count.
                if whole:
                    known = BitMap(range(f.pages))
                elif f.size and (ctx.progress.from_device is None or i < len(needs) - 1):
                    after = residency.resident_count(fd)
                    share = max(0, after - self._attributed) * PAGE_SIZE
                    self._attributed = max(self._attributed, after)
                    if after >= f.pages:   # whole file cached: the next task's item needs no second look
                        known = BitMap(range(f.pages))
                self._account(r, ctx, result, device_share=share)
            if not self._needs(f.id) and not self._wants_modified:
                gen = inode_generation(fd)
                if gen is not None:
                    self.engine.drop(f.fid, gen)
            brought = residency.resident_pages(fd, f.size) - pre - self._foreign(f.fid)
            if not cached_pass:
                self._last_read_device = bool(brought) or not f.size
            # The follower (--jobs 2) takes the file next, while it is cached: what this run read of it stays until
            # the follower says it is done (_reap).
            offered = self._follower is not None and self._follower.offer(f.id, runs_of(brought))
            if self.opts.cache_hygiene and brought:
                nbytes = len(brought) * PAGE_SIZE
                if keep and self._kept_bytes + nbytes <= KEEP_BYTES and f.id not in self._kept:
                    self._kept[f.id] = runs_of(brought)     # evicted on release_cached or at the end of the run
                    self._kept_bytes += nbytes
                elif offered:
                    self._hold(f.id, fd, runs_of(brought), nbytes)
                    handed = True
                else:
                    self._hints.evict_and_close(fd, runs_of(brought))
                    handed = True
        finally:
            if not handed:
                os.close(fd)

    def _foreign(self, fid: FileId) -> BitMap:
        """Pages of ``fid`` other processes brought into the cache (the engine does not report the run's own), as
        far as the engine has seen: not the run's to evict. Only looked at while someone reads the scope, when a
        reader may be reading this very file alongside the tasks."""
        if not self._foreground_recent():
            return BitMap()
        self.engine.pump()   # as of the last drain, at most the engine interval old: a forced drain costs ~1 ms
        st = self.engine.files.get(fid)
        return st.exists if st else BitMap()

    def _still_at(self, ahead: "_Ahead") -> bool:
        """The file read ahead is still the one at its path (not renamed over since): one fstatat, no open."""
        try:
            st = os.stat(ahead.file.relpath, dir_fd=self._root_fd, follow_symlinks=False)
        except OSError:
            return False
        held = os.fstat(ahead.fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

    def _vanished(self, f: FileInfo, needs: list[_TaskRun], why: str) -> None:
        """A file deleted or replaced since the scan is not an error: it leaves this round."""
        for r in needs:
            r.progress.relevant.discard(f.id)
            r.report.items_total = len(r.progress.relevant)
            r.progress.complete = not r.progress.pending
            r.report.counters["vanished"] = r.report.counters.get("vanished", 0) + 1
        self._leave(f.id)
        log.info("%s: %s, skipped", printable(f.relpath), why)

    def _item(self, r: _TaskRun, f: FileInfo, fd: int, cached_pass: bool, pre: BitMap,
              resident: BitMap | None = None) -> ItemContext | None:
        """The item a task gets for this file now, or None (nothing to do now; a range task may be done).

        ``pre``: the file's resident pages before the run touched it (before its prefetch, or before the first task
        of this item); what is resident now beyond them the run itself read from the device moments ago.
        ``resident``: the file's resident pages now, if the caller knows them already."""
        if resident is None:
            resident = residency.resident_pages(fd, f.size)
        if r.spec.granularity == "file":
            if self._cached_only and len(resident) < f.pages:
                return None
            ranges = [(0, f.pages)] if f.pages else []
        else:
            todo = BitMap(range(f.pages)) - self._range_done(r, f.id)
            if not todo:
                self._mark_done(r, f.id)
                return None
            if cached_pass and self._cached_only:
                todo &= resident     # none cached: nothing to do now, the rest waits
            ranges = runs_of(todo)
            if not ranges:
                return None
        return ItemContext(r.run, f, os.path.join(self.root, f.relpath), fd, ranges, runs_of(resident),
                           r.run.state, r.run.shared, fresh=runs_of(resident - pre), cached_only=self._cached_only,
                           pace=self._pace)

    def _call(self, r: _TaskRun, ctx: ItemContext) -> tuple[object, bool]:
        """Run ``duet_process``; returns (result, failed). :class:`Stopped` passes through while the run is stopping
        (the item is abandoned); raised at any other time it is the item's failure (else the item would come back
        again and again)."""
        try:
            return r.task.hook.duet_process(ctx=ctx), False
        except Stopped:
            if self.stopping():
                raise
            self._item_failed(r, ctx.file, "raised Stopped while the run was not stopping")
            return None, True
        except Exception as exc:  # noqa: BLE001 - a task's failure on one item is that item's
            self._item_failed(r, ctx.file, f"{type(exc).__name__}: {exc}")
            return None, True

    def _item_failed(self, r: _TaskRun, f: FileInfo, why: str) -> None:
        """Count a failed item in the task's report and leave it for the next run."""
        r.report.items_failed += 1
        r.report.errors.append(f"{f.relpath}: {why}")
        self.ui.message(f"{r.name}: {f.relpath}: {why}")
        r.failed.add(f.id)
        if not self._needs(f.id):
            self._leave(f.id)

    def _account(self, r: _TaskRun, ctx: ItemContext, result: object, device_share: int) -> int:
        """Count one processed item in the task's report and progress; returns the device bytes charged to it."""
        f, ranges = ctx.file, ctx.ranges
        if isinstance(result, ItemResult) and not result.done and ctx.cached_only:
            return 0    # "not with only what is cached": still pending in this run, as if not handed over
        nbytes = ctx.progress.processed or min(f.size, sum(c for _, c in ranges) * PAGE_SIZE)
        device = ctx.progress.from_device
        if device is None:
            device = min(nbytes, device_share)
        r.report.bytes_processed += nbytes
        r.report.bytes_from_device += device
        r.report.bytes_from_cache += max(0, nbytes - device)
        self._device_bytes += device
        if isinstance(result, ItemResult):
            for k, v in result.counters.items():
                r.report.counters[k] = r.report.counters.get(k, 0) + v
            if result.damaged:
                r.report.items_damaged += 1
            if result.message:
                self.ui.message(f"{r.name}: {f.relpath}: {result.message}")
            if not result.done:   # "try again in a later round": out of this run, not failed, round left open
                r.failed.add(f.id)
                r.report.counters["deferred"] = r.report.counters.get("deferred", 0) + 1
                if not self._needs(f.id):
                    self._leave(f.id)
                return device
        if r.spec.granularity == "file":
            self._mark_done(r, f.id)
        else:
            self._mark_ranges(r, f, pages_of(ranges), counted=False)
        return device

    def _range_done(self, r: _TaskRun, file_id: int) -> BitMap:
        if file_id not in r.range_done:
            r.range_done[file_id] = (self.store.range_done(self.scope_id, r.name, file_id)
                                     if file_id in r.stored_ranges else BitMap())
        return r.range_done[file_id]

    def _mark_ranges(self, r: _TaskRun, f: FileInfo, pages: BitMap, counted: bool) -> None:
        done = self._range_done(r, f.id)
        new = pages - done
        done |= pages
        r.dirty_ranges.add(f.id)
        if counted and new:   # done by someone else's read: served from the cache at no cost to the task
            r.report.bytes_processed += len(new) * PAGE_SIZE
            r.report.bytes_from_cache += len(new) * PAGE_SIZE
            r.report.counters["pages_observed"] = r.report.counters.get("pages_observed", 0) + len(new)
        if len(done) >= f.pages:
            self._mark_done(r, f.id)

    def _mark_done(self, r: _TaskRun, file_id: int) -> None:
        if file_id in r.progress.done:
            return
        if r.spec.events & Event.MODIFIED:
            r.done_ns[file_id] = self._item_started_ns
        r.progress.done.add(file_id)
        r.report.items_done += 1
        # Nothing pending? The subset test walks both bitmaps (~1 ms at a million ids filled in order), so it waits
        # until there are as many done as relevant — once or twice a round, not once per file.
        p = r.progress
        if len(p.done) >= len(p.relevant) and p.relevant <= p.done:
            p.complete = True
        if not self._needs(file_id):
            self._leave(file_id)

    def _on_rescan(self, scope: Scope, diff) -> None:
        """Files that appeared during the run join the current round (those planned in)."""
        if scope is not self.scope:
            return
        if diff.added:
            self._infos.clear()
        for found in diff.added:
            f = self.store.add_file(self.scope_id, found)
            self._ids[f.fid], self._fids[f.id] = f.id, f.fid
            for r in self.runs:
                if f.id not in r.progress.planned:
                    r.progress.planned.add(f.id)
                    r.progress.relevant |= self._plan_one(r, f)
                    r.progress.complete = not r.progress.pending
                    r.report.items_total = len(r.progress.relevant)
            if self._needs(f.id):
                self._todo.add(f.id)

    def _plan_one(self, r: _TaskRun, f: FileInfo) -> BitMap:
        chosen = r.task.hook.duet_plan(run=r.run, files=[f])
        return BitMap([f.id]) if chosen is None else BitMap(chosen) & BitMap([f.id])

    def _commit(self, again: bool = True) -> None:
        """Make progress durable: the tasks' own writes since the last commit, and the done bitmaps, atomically."""
        def progress():
            for r in self.runs:
                self.store.save_progress(self.scope_id, r.name, r.progress)
                for file_id in r.dirty_ranges:
                    pages = None if file_id in r.progress.done else r.range_done.get(file_id)
                    if pages is None and file_id not in r.stored_ranges:
                        continue        # done, and nothing was stored for it: nothing to delete
                    self.store.save_range_done(self.scope_id, r.name, file_id, pages)
                    if pages is None:
                        r.stored_ranges.discard(file_id)
                    else:
                        r.stored_ranges.add(file_id)
                r.dirty_ranges.clear()

        self.store.commit_batch(again=again, extra=progress)
        self._last_commit = time.monotonic()


def _inside(root: str, path: str) -> list[str]:
    """``[path relative to root]`` when ``path`` lies below ``root`` (both real paths), else ``[]``: duet's own
    state (its database, changing all through the run, and its locks) is never part of a scope."""
    path = os.path.realpath(path)
    if path != root and os.path.commonpath([root, path]) == root:
        return [os.path.relpath(path, root)]
    return []


def resolve_options(task: LoadedTask, given: dict[str, Any]) -> dict[str, Any]:
    """The task's option values: given ones parsed by type, defaults for the rest; errors name the task."""
    from duet_core import units

    out: dict[str, Any] = {}
    known = {o.name: o for o in task.spec.options}
    for key in given:
        if key not in known:
            names = ", ".join(known) or "none"
            raise DuetError(f"task {task.name!r} has no option {key!r}", hint=f"its options: {names}")
    for name, opt in known.items():
        if name not in given:
            if opt.required:
                raise DuetError(f"task {task.name!r} needs option {name!r}",
                                hint=f"--{name.replace('_', '-')} VALUE, or [task.{task.name}] in the config")
            out[name] = opt.default
            continue
        raw = given[name]
        try:
            out[name] = _convert(opt.type, raw, units)
        except ValueError as exc:
            raise DuetError(f"task {task.name!r}, option {name!r}: {exc}") from None
    return out


def _convert(kind: str, raw: Any, units) -> Any:
    if isinstance(raw, (list, dict)):   # from the config's [task.NAME] table: every option type is a scalar
        raise ValueError(f"expected a single value, got {type(raw).__name__} {raw!r}")
    if kind == "str":
        return str(raw)
    if kind == "int":   # not bool, not 1.5 (int() would drop the fraction), not a list from the config
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"\s*[-+]?\d+\s*", raw):
            return int(raw)
        raise ValueError(f"{raw!r} is not a whole number")
    if kind == "float":
        try:
            value = float(raw) if isinstance(raw, (int, float, str)) and not isinstance(raw, bool) else None
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            raise ValueError(f"{raw!r} is not a finite number")
        return value
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{raw!r} is not a boolean (true/false)")
    if kind == "size":   # the parsers check numbers from the config too (not negative, not bool, in range)
        return units.parse_size(raw if isinstance(raw, (int, float)) else str(raw))
    if kind == "duration":
        return units.parse_duration(raw if isinstance(raw, (int, float)) else str(raw))
    if kind == "path":
        if not os.path.isabs(str(raw)):
            raise ValueError(f"{raw!r} is not an absolute path")
        return os.path.normpath(str(raw))
    raise ValueError(f"unknown option type {kind!r}")
