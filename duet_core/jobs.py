"""The tasks of one run in two processes (``duet run --jobs 2``): one device read, two CPUs.

A run's tasks take turns on one thread: each file is read once and handed to every task that needs it, so the
device reads the data set once — but the tasks' own work (hashing, copying, checking extents) adds up on one CPU,
and a run of four tasks takes 1.3–1.5 × as long as its slowest task alone (docs/benchmarks.md). With ``--jobs 2``
the first task named runs in the run's own process, the **leader**, and the others in a second process, the
**follower** — a run of its own over the same scope and state store, started by the leader:

- The leader reads and processes its files as any run does, then **offers** each one to the follower while it is
  still cached, and evicts what it read only once the follower has **acknowledged** it (cache hygiene holds for
  both: the follower's tasks find the file cached and read nothing). At most HOLD_BYTES (and HOLD_FILES files)
  wait for the follower; beyond that the leader waits for it.
- The follower does nothing uncached while the leader reads: it processes what it is offered (whole cached files
  for whole-file tasks, the cached pages for range tasks) and acknowledges every offer in order. When the leader
  is done it says so (END), and the follower goes on as a plain run: files only its tasks need, and whatever was
  not wholly cached, it reads itself.
- The leader holds the scope's lock for both, starts the follower before its scan (the follower's imports and BPF
  programs load meanwhile) and lets it scan only once its own scan is in the store (GO). It forwards SIGTERM and
  SIGINT; the follower dies with it (``PR_SET_PDEATHSIG``) and stops when its pipe closes. Progress lines, messages
  and at the end the follower's summary travel back to the leader, which shows and reports all tasks as one run.

Messages are JSON lines on two pipes of their own (the follower's stdout and stderr are the leader's stderr).
Leader to follower: ``{"go": 1}``, ``{"o": file_id, "b": runs}`` (the runs of pages it read from the device),
``{"end": 1}``. Follower to leader: ``{"a": file_id}`` (``"k": 1``: a task keeps the file cached, and the follower
evicts it when the task is done with it), ``{"r": {task: report}}``, ``{"m": line}``, ``{"s": summary}``, or
``{"error": line}`` when it could not run.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from duet_core import child
from duet_core.errors import DuetError
from duet_core.tasks import TaskReport

HOLD_BYTES = 64 << 20    # pages the leader read that may wait in the cache for the follower ...
HOLD_FILES = 1024        # ... in at most this many files (each an open descriptor; see hold_files)
REPORT_EVERY_S = 0.25    # the follower sends its tasks' reports this often
REGISTRY = "duet_core.plugins:load_plugins"   # how the follower finds the tasks: the installed plugins


class _Lines:
    """Newline-delimited JSON over a pair of pipe descriptors, read without blocking from this thread only."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self._buf = b""
        self.eof = False

    def send(self, msg: dict, droppable: bool = False) -> bool:
        """Write one message, waiting while the pipe is full — or, if ``droppable`` (progress: the next one says
        more), not writing it at all then. False if the other side is gone."""
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        try:
            while data:
                try:
                    n = os.write(self.wfd, data)
                except BlockingIOError:
                    if droppable:               # nothing of it written yet: left out whole
                        return True
                    select.select([], [self.wfd], [], None)
                    continue
                data, droppable = data[n:], False    # part of it written: the rest must follow
        except OSError:   # EPIPE: the other side is gone
            return False
        return True

    def receive(self, timeout: float | None = 0.0) -> list[dict]:
        """The messages that have arrived, waiting up to ``timeout`` seconds (None: forever) for the first. With no
        wait (after every file of a run), one non-blocking read and no select."""
        if timeout != 0 and not self.eof and b"\n" not in self._buf:
            ready, _, _ = select.select([self.rfd], [], [], timeout)
            if not ready:
                return []
        while not self.eof:
            try:
                chunk = os.read(self.rfd, 1 << 16)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not chunk:
                self.eof = True
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [json.loads(line) for line in lines if line]

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


def hold_files(room: int) -> int:
    """How many files the leader may hold open for the follower, with ``room`` descriptors still free."""
    return max(1, min(HOLD_FILES, room // 4))


def split(task_names: list[str]) -> tuple[list[str], list[str]]:
    """The leader's tasks and the follower's: the first named reads, the others follow."""
    return task_names[:1], task_names[1:]


class Follower:
    """The leader's handle on its follower process (started at once; :meth:`go` lets it scan)."""

    def __init__(self, root: str, state_dir: str, tasks: list[str], opts: dict[str, Any], registry: str):
        to_child_r, to_child_w = os.pipe2(os.O_CLOEXEC)
        from_child_r, from_child_w = os.pipe2(os.O_CLOEXEC)
        args = {"leader": os.getpid(), "tasks": tasks, "opts": opts, "registry": registry, "rfd": to_child_r,
                "wfd": from_child_w, "log_level": logging.getLogger().getEffectiveLevel()}
        # Its log lines go where ours do, formatted alike ($DUET_LOG_FORMAT, which duet_core.cli.logs sets).
        argv, env = child.module_command("duet_core.jobs", json.dumps(args), os.fsencode(root), os.fsencode(state_dir))
        try:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                argv, pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=2,
                env=env)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.tasks = tasks
        self.chan = _Lines(from_child_r, to_child_w)
        self.reports: dict[str, TaskReport] = {t: TaskReport(t) for t in tasks}
        self.summary: dict | None = None
        self.error: str | None = None
        self.ended = False          # END sent: no more offers
        self.messages: list[str] = []

    @property
    def alive(self) -> bool:
        return not self.chan.eof and self.summary is None and self.error is None

    def go(self) -> None:
        self.chan.send({"go": 1})

    def offer(self, file_id: int, read: list[tuple[int, int]]) -> bool:
        """Offer a file, with the runs of pages this process read of it from the device (the follower counts them
        as read by its own run: a scrub, as verified); False if the follower is gone (no acknowledgement comes)."""
        return self.alive and self.chan.send({"o": file_id, "b": read})

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.chan.send({"end": 1})

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def poll(self, timeout: float | None = 0.0) -> list[tuple[int, bool]]:
        """Take what the follower sent (waiting up to ``timeout`` for something); returns the files acknowledged,
        each with whether the follower keeps its pages cached for a task (and evicts them itself, later)."""
        acked = []
        for msg in self.chan.receive(timeout):
            if "a" in msg:
                acked.append((msg["a"], bool(msg.get("k"))))
            elif "r" in msg:
                for name, rep in msg["r"].items():
                    self.reports[name] = report_from_dict(name, rep)
            elif "m" in msg:
                self.messages.append(msg["m"])
            elif "s" in msg:
                self.summary = msg["s"]
                for name, rep in self.summary.get("tasks", {}).items():
                    self.reports[name] = report_from_dict(name, rep)
            elif "error" in msg:
                self.error = msg["error"]
        return acked

    def wait(self, timeout: float | None = None) -> int | None:
        """Reap the process (after its summary); its exit status, or None if it did not end within ``timeout``."""
        if self.proc is None:
            return 0
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Kill the follower if it still runs, reap it, close the pipes (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            child.kill_and_reap(proc)
        self.chan.close()


def report_from_dict(name: str, d: dict) -> TaskReport:
    known = {f for f in TaskReport.__dataclass_fields__ if f not in ("task", "extra")}
    rep = TaskReport(name, **{k: v for k, v in d.items() if k in known})
    rep.extra = {k: v for k, v in d.items() if k not in known}
    return rep


class Leader:
    """The follower's side of the pipes: offers to take, acknowledgements and reports to send."""

    def __init__(self, rfd: int, wfd: int, pid: int):
        self.chan = _Lines(rfd, wfd)
        self.pid = pid
        self.started = False        # GO received
        self.ended = False          # END received, or the leader is gone
        self.offers: deque[tuple[int, list]] = deque()   # (file id, runs of pages the leader read from the device)
        self._reported = 0.0

    def take(self, timeout: float) -> None:
        """Wait up to ``timeout`` for messages; offers queue up in ``offers``."""
        for msg in self.chan.receive(timeout):
            if "o" in msg:
                self.offers.append((msg["o"], msg["b"]))
            elif "go" in msg:
                self.started = True
            elif "end" in msg:
                self.ended = True
        if self.chan.eof:
            self.started = self.ended = True

    def wait_go(self, stopping: Callable[[], bool]) -> None:
        while not self.started and not stopping():
            self.take(0.1)

    def ack(self, file_id: int, kept: bool = False) -> None:
        self.chan.send({"a": file_id, "k": 1} if kept else {"a": file_id})

    def report(self, reports: dict[str, TaskReport], force: bool = False) -> None:
        if force or time.monotonic() - self._reported >= REPORT_EVERY_S:
            self._reported = time.monotonic()
            self.chan.send({"r": {name: rep.as_dict() for name, rep in reports.items()}}, droppable=not force)


class RelayUI:
    """The follower's UI: its tasks' progress and messages go to the leader, which shows them with its own."""

    def __init__(self, leader: Leader):
        self.leader = leader

    def started(self, reports, dataset_bytes, source):
        self.leader.report(reports, force=True)

    def advanced(self, reports):
        self.leader.report(reports)

    def message(self, line):
        self.leader.chan.send({"m": line})

    def finished(self, summary):
        pass


def options_record(opts) -> dict[str, Any]:
    """RunOptions as the follower gets them (JSON)."""
    d = asdict(opts)
    d["exclude"] = list(d["exclude"])
    return d


def _load_registry(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)()


def _main(argv: list[str]) -> int:
    """``python -m duet_core.jobs ARGS_JSON ROOT STATE_DIR`` (started by :class:`Follower`)."""
    args = json.loads(argv[0])
    root, state_dir = argv[1], argv[2]
    if not child.die_with_parent(args["leader"], signal.SIGTERM):
        return 1
    from duet_core.cli import logs

    logs.setup(0, os.environ.get("DUET_LOG_FORMAT", "text"))
    logging.getLogger().setLevel(args["log_level"])
    leader = Leader(args["rfd"], args["wfd"], args["leader"])
    try:
        from duet_core.scheduler import Runner, RunOptions
        from duet_core.state import StateStore

        opts = args["opts"]
        opts["exclude"] = tuple(opts["exclude"])
        opts["jobs"] = 1
        runner = Runner(StateStore(state_dir), _load_registry(args["registry"]), args["tasks"], root,
                        RunOptions(**opts), RelayUI(leader), leader=leader)
        summary = runner.run()
    except DuetError as exc:
        leader.chan.send({"error": str(exc)})
        return 2
    leader.chan.send({"s": summary})
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
