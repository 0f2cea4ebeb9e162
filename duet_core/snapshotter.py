"""The start-up snapshot of a whole scope, read in a child process while the parent scans, syncs and plans.

Why a process: start-up is one Python thread, and the snapshot (per file an ``O_PATH`` open, ``fstat``, a reopen,
``cachestat``, two closes) costs about half of it. Two threads lost to the GIL; a second process runs on the other
core, so start-up becomes the longer of the two instead of their sum (docs/benchmarks.md, ``duet bench scale``).

Why it is still exact:

- The engine starts the child only once the BPF programs are attached and the kernel filter holds the scope
  root's (superblock, subvolume) pair (:meth:`~duet_core.engine.Engine.start_snapshot`), and the child reads only
  files on the pairs it was given: a page cached or evicted after the child looked at a file is an event the engine
  drains after it has recorded the snapshot, as with the in-process snapshot. Files on other pairs (nested btrfs
  subvolumes, other mounts) are left to the parent, which reads them once its scan knows them and the filter holds
  them.
- The child opens nothing but regular files and never leaves the tree: directories are opened beneath the scope's
  root with ``openat2`` (no symlink in any component), files by their one-component name with
  :func:`~duet_core.scope.open_regular` — the same rules as :meth:`~duet_core.scope.Scope.open_all`.
- It reports only files with cached pages: (dev, subvol, inode) as the kernel and the state store key them, and
  the cached pages as a serialized Roaring bitmap, into an anonymous file (``memfd``) the parent passed — nothing
  blocks on a full pipe while the parent is busy. An END record closes a complete result; after a child that
  failed, was killed or left no END record, the parent reads residency itself.
- The child dies with the parent (``PR_SET_PDEATHSIG``), and :meth:`SnapshotChild.close` kills and reaps it in
  every path.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator

from pyroaring import BitMap

from duet_core import child
from duet_core.events import FileId
from duet_core.exclude import NOTHING, Exclusions

RECORD = struct.Struct("<QQQI")    # dev, subvol, ino, length of the serialized page bitmap that follows
END = (1 << 64) - 1                # dev = subvol = ino = END: the last record; its length field is unused
COUNT = struct.Struct("<QQ")       # after END: files read, files cached
WAIT_S = 600.0                     # a child still reading after this long is killed; the parent reads instead
CHECK_S = 0.05                     # ... and while it waits, the parent looks for a stop this often


class SnapshotChild:
    """A running child that reads the residency of every regular file under ``root`` on ``pairs``.

    ``pairs``: the (superblock dev, subvol) pairs the kernel filter already holds. :meth:`results` waits for the
    child and returns what it found; :meth:`close` (idempotent) kills it if it still runs and reaps it.
    """

    def __init__(self, root: str, pairs: set[tuple[int, int]], one_file_system: bool = False,
                 exclude: Exclusions = NOTHING):
        self.pairs = frozenset(pairs)
        self.error: str | None = None
        self.complete = False
        self.files_read = self.files_cached = 0
        self._out = os.memfd_create("duet-snapshot", os.MFD_CLOEXEC)
        argv, env = child.module_command(
            "duet_core.snapshotter", str(self._out), str(os.getpid()), "1" if one_file_system else "0",
            json.dumps(exclude.record()), os.fsencode(root), *(f"{dev}:{subvol}" for dev, subvol in sorted(self.pairs)))
        try:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                argv, pass_fds=(self._out,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=env)
        except OSError:
            os.close(self._out)
            raise

    def results(self, timeout: float = WAIT_S,
                checkpoint: Callable[[], None] | None = None) -> Iterator[tuple[FileId, BitMap]]:
        """Wait for the child, then yield the cached files it found, streamed from its output.

        Once the iteration ends, ``complete`` says whether that was everything (the child exited 0 and wrote its
        END record); if not, ``error`` says why, and what was yielded is true but partial. ``checkpoint`` is called
        every CHECK_S while waiting; whatever it raises (a stop) ends the wait.
        """
        proc = self.proc
        if proc is None:
            self.error = self.error or "already closed"
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                _, err = proc.communicate(timeout=max(0.0, min(CHECK_S, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if checkpoint is not None:
                    checkpoint()
                if time.monotonic() >= deadline:
                    self.error = f"still reading after {timeout:.0f} s"
                    self.close()
                    return
        if proc.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
            why = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                   else f"exit {proc.returncode}")
            self.error = why + (f": {last[0]}" if last else "")
            return
        counts = yield from _read_records(self._out)
        if counts is None:
            self.error = "its output is incomplete"
            return
        self.files_read, self.files_cached = counts
        self.complete = True

    def close(self) -> None:
        """Kill the child if it still runs, reap it, and free its result."""
        proc, self.proc = self.proc, None
        if proc is not None:
            child.kill_and_reap(proc)
        if self._out >= 0:
            os.close(self._out)
            self._out = -1


def _read_records(fd: int) -> Generator[tuple[FileId, BitMap], None, tuple[int, int] | None]:
    """Yield the records the child wrote to ``fd``; return (files read, files cached), or None without an END
    record (a child killed while writing)."""
    os.lseek(fd, 0, os.SEEK_SET)
    with open(fd, "rb", closefd=False) as f:
        while True:
            head = f.read(RECORD.size)
            if len(head) < RECORD.size:
                return None
            dev, subvol, ino, length = RECORD.unpack(head)
            if dev == subvol == ino == END:
                tail = f.read(COUNT.size)
                return COUNT.unpack(tail) if len(tail) == COUNT.size else None
            blob = f.read(length)
            if len(blob) < length:
                return None
            yield FileId(dev, subvol, ino), BitMap.deserialize(blob)


# ------------------------------------------------------------------------------------------------------ the child


def snapshot_tree(root: str | bytes, pairs: set[tuple[int, int]], one_file_system: bool, out,
                  exclude: Exclusions = NOTHING) -> tuple[int, int]:
    """Walk ``root`` as :class:`~duet_core.scope.Scope` does (``exclude`` left out) and write a record to ``out``
    for every regular file on ``pairs`` with pages in the cache; return (files read, files cached).

    Every directory is listed (one on another pair may hold more of a covered one below it), and unreadable or
    vanished entries are skipped, as the scan skips them.
    """
    from duet_core.identity import DevMap, open_beneath
    from duet_core.residency import cached_pages
    from duet_core.scope import open_regular

    devmap = DevMap()
    read = cached = 0
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        root_dev = devmap.info(os.fstat(root_fd).st_dev, root_fd).dev
        seen: set[tuple[int, int]] = set()
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                dir_fd = open_beneath(root_fd, rel or ".", os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                st = os.fstat(dir_fd)
                info = devmap.info(st.st_dev, rel or ".", root_fd)
                if (st.st_dev, st.st_ino) in seen or (one_file_system and info.dev != root_dev):
                    continue
                seen.add((st.st_dev, st.st_ino))
                covered = (info.dev, info.subvol) in pairs
                subdirs = []
                with os.scandir(dir_fd) as entries:
                    for entry in entries:
                        try:
                            path = f"{rel}/{entry.name}" if rel else entry.name
                            if entry.is_dir(follow_symlinks=False):
                                if not (exclude and exclude.excluded(path, entry.name, True)):
                                    subdirs.append(path)
                                continue
                            if not covered or not entry.is_file(follow_symlinks=False) or (
                                    exclude and exclude.excluded(path, entry.name, False)):
                                continue
                            fd = open_regular(dir_fd, entry.name, entry.inode())
                        except OSError:
                            continue   # gone, or replaced since it was listed (by a symlink, a device, ...)
                        try:
                            read += 1
                            pages = cached_pages(fd)
                        except OSError:
                            continue
                        finally:
                            os.close(fd)
                        if pages:
                            cached += 1
                            blob = pages.serialize()
                            out.write(RECORD.pack(info.dev, info.subvol, entry.inode(), len(blob)))
                            out.write(blob)
                # The scan visits the last subdirectory listed first; this walk the first: the two processes start
                # at opposite ends of the tree, each reading cold inodes the other will then find cached, instead
                # of both waiting on the same ones.
                stack.extend(reversed(subdirs))
            except OSError:
                continue
            finally:
                os.close(dir_fd)
    finally:
        os.close(root_fd)
    out.write(RECORD.pack(END, END, END, 0))
    out.write(COUNT.pack(read, cached))
    return read, cached


def _main(argv: list[str]) -> int:
    """``python -m duet_core.snapshotter OUT_FD PARENT_PID ONE_FS EXCLUDE_JSON ROOT DEV:SUBVOL...`` (started by
    SnapshotChild)."""
    out_fd, parent, one_fs, root = int(argv[0]), int(argv[1]), argv[2] == "1", os.fsencode(argv[4])
    exclude = Exclusions.from_record(json.loads(argv[3]))
    if not child.die_with_parent(parent, signal.SIGKILL):
        return 1
    pairs = {(int(d), int(s)) for d, s in (p.split(":") for p in argv[5:])}
    with open(out_fd, "wb", buffering=1 << 20) as out:
        snapshot_tree(root, pairs, one_fs, out, exclude)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
