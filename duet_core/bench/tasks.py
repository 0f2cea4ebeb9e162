"""Read-everything tasks for the sharing benchmarks: what backup, scrub and a content indexer cost in I/O.

They are real task plugins (``duet_task`` + ``duet_process``), registered at run time by the bench rather than
installed, so the bench measures the framework, not the built-in plugins.
"""

from __future__ import annotations

import os
import zlib

from duet_core.hookspecs import hookimpl
from duet_core.tasks import TaskSpec

CHUNK = 1 << 20


class ReadAll:
    """Reads every byte of every file and folds it into a checksum (the checksum kind names the task)."""

    def __init__(self, name: str, kind: str):
        self.name, self.kind = name, kind
        self._buf = memoryview(bytearray(CHUNK))   # one buffer for every file, as a real task keeps one

    @hookimpl
    def duet_task(self) -> TaskSpec:
        return TaskSpec(self.name, f"reads every byte and computes {self.kind} (bench)")

    @hookimpl
    def duet_process(self, ctx) -> None:
        view = self._buf
        acc, off = 0, 0
        while True:
            n = os.preadv(ctx.fd, [view], off)
            if n <= 0:
                break
            if self.kind == "crc32":
                acc = zlib.crc32(view[:n], acc)
            elif self.kind == "adler32":
                acc = zlib.adler32(view[:n], acc)
            off += n
        ctx.shared.put(ctx.file, f"bench.{self.kind}", acc)


TASKS = {"backup-like": "crc32", "scrub-like": "adler32", "index-like": "read"}


def registry():
    from duet_core.plugins import TaskRegistry

    reg = TaskRegistry()
    for name, kind in TASKS.items():
        reg.add(ReadAll(name, kind), package="duet-bench")
    return reg
