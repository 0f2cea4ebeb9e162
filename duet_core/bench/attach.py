"""Attach to first event, in a fresh process: ``python -m duet_core.bench.attach MNT FILE``.

Times ``Engine(source="bpf")`` (load and attach the BPF programs), ``register`` (scan the scope, snapshot its
residency) and the wait for the first delivered page of a 4 KiB read of the (evicted) FILE issued right after
``register`` returns. Prints one JSON line; the imports are timed apart, since a long-running duet pays them once.
"""

from __future__ import annotations

import json
import os
import sys
import time


def probe(mnt: str, path: str, timeout_s: float = 5.0) -> dict[str, float]:
    t_import = time.monotonic()
    from duet_core.engine import Engine
    from duet_core.events import Event

    t0 = time.monotonic()
    engine = Engine(source="bpf")
    try:
        t1 = time.monotonic()
        reg = engine.register("bench-attach", Event.ADDED | Event.REMOVED, mnt)
        t2 = time.monotonic()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        t3 = time.monotonic()
        first = None
        while time.monotonic() - t3 < timeout_s:
            engine.pump(force=True)
            if any(it.flags & Event.ADDED for it in engine.fetch(reg).items):
                first = time.monotonic()
                break
            time.sleep(0.001)
    finally:
        engine.close()
    return {"import_s": t0 - t_import, "load_attach_s": t1 - t0, "register_s": t2 - t1,
            "first_event_after_read_s": (first - t3) if first else None,
            "attach_to_first_event_s": (first - t0) if first else None}


def main() -> int:
    print(json.dumps(probe(sys.argv[1], sys.argv[2])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
