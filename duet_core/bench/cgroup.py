"""A memory cgroup around a benchmark child, so its page cache is capped (DESIGN.md: "larger than the cache").

cgroup v1's memory controller (/sys/fs/cgroup/memory) is used where mounted, else cgroup v2 (memory.max). Page cache
is charged to the cgroup of the process that brought it in, so a child placed in the group cannot cache more than
the limit.
"""

from __future__ import annotations

import contextlib
import os
import time

from duet_core.errors import DuetError

V1 = "/sys/fs/cgroup/memory"
V2_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


class MemoryCgroup:
    def __init__(self, limit_bytes: int, name: str | None = None):
        self.name = name or f"duet-bench-{os.getpid()}"
        self.limit = limit_bytes
        if os.path.isdir(V1) and os.path.exists(os.path.join(V1, "memory.limit_in_bytes")):
            self.path, self.v2 = os.path.join(V1, self.name), False
        else:
            root = next((r for r in V2_ROOTS if os.path.exists(os.path.join(r, "cgroup.controllers"))), None)
            if root is None:
                raise DuetError("no memory cgroup controller mounted (v1 or v2)")
            self.path, self.v2 = os.path.join(root, self.name), True

    def __enter__(self) -> "MemoryCgroup":
        os.makedirs(self.path, exist_ok=True)
        self._write("memory.max" if self.v2 else "memory.limit_in_bytes", str(self.limit))
        return self

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as fh:
            fh.write(value)

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def join(self) -> None:
        """Move the calling process into the group (use as a child's preexec_fn)."""
        with open(self.procs_file, "w") as fh:
            fh.write(str(os.getpid()))

    def __exit__(self, *exc) -> None:
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                # Emptied by the children exiting; cached pages charged to it may keep it busy for a moment.
                with contextlib.suppress(OSError):
                    self._write("memory.force_empty" if not self.v2 else "memory.reclaim", "0")
                time.sleep(0.1)
