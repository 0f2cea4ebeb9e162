"""The kernel's own record of page-cache events (tracefs), to check the engine against.

Uses a private tracefs instance so it neither disturbs nor is disturbed by other tracing on the machine, and
removes it on exit.
"""

from __future__ import annotations

import contextlib
import os
import re

from duet_core.events import FileId

TRACEFS = "/sys/kernel/tracing"
LINE = re.compile(r"dev (\d+):(\d+) ino ([0-9a-f]+) pfn=0x[0-9a-f]+ ofs=(\d+) order=(\d+)")


def _overrun(stats_path: str) -> int:
    with open(stats_path) as fh:
        for line in fh:
            if line.startswith("overrun:"):
                return int(line.split()[1])
    return 0


class Trace:
    overrun = 0

    def __init__(self, text: str):
        self.records = [(int(m[1]) << 20 | int(m[2]), int(m[3], 16), int(m[4]) >> 12, int(m[5]))
                        for m in LINE.finditer(text)]

    @property
    def events(self) -> int:
        return len(self.records)

    def pages(self, fid: FileId) -> set[int]:
        """Pages of ``fid`` (matched on dev and inode: the trace has no subvolume), each folio 2^order pages."""
        out: set[int] = set()
        for dev, ino, index, order in self.records:
            if dev == fid.dev and ino == fid.ino:
                out.update(range(index, index + (1 << order)))
        return out


class TraceFs:
    def __init__(self, root: str = TRACEFS):
        self.root = root

    @contextlib.contextmanager
    def event(self, name: str, filter_expr: str | None = None):
        """Record tracepoint ``name`` (e.g. ``filemap/mm_filemap_add_to_page_cache``) while the block runs."""
        inst = os.path.join(self.root, "instances", f"duet-test-{os.getpid()}")
        os.makedirs(inst, exist_ok=True)
        result = Trace("")
        try:
            with open(os.path.join(inst, "buffer_size_kb"), "w") as fh:
                fh.write("65536")
            ev = os.path.join(inst, "events", name)
            if filter_expr:
                with open(os.path.join(ev, "filter"), "w") as fh:
                    fh.write(filter_expr)
            with open(os.path.join(ev, "enable"), "w") as fh:
                fh.write("1")
            yield result
            with open(os.path.join(ev, "enable"), "w") as fh:
                fh.write("0")
            with open(os.path.join(inst, "trace")) as fh:
                result.__init__(fh.read())
            result.overrun = sum(_overrun(os.path.join(inst, "per_cpu", cpu, "stats"))
                                 for cpu in os.listdir(os.path.join(inst, "per_cpu")))
        finally:
            os.rmdir(inst)
