"""A reader process for the benchmarks: preads over a range of one file, as fast as it can or at a fixed rate.

Run as ``python -m duet_core.bench.reader PATH --first N --count N [...]``. It prepares everything (open, fadvise,
the offsets), prints ``ready``, waits for a line on stdin, runs, and prints one JSON line: its start and end on
CLOCK_MONOTONIC (comparable across processes), the reads done and its own CPU time. Being a separate process keeps
the readers' CPU (including the BPF programs, which run in their context) apart from the engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PAGE = 4096


def offsets(first: int, count: int, stride: int, random: bool, seed: int) -> list[int]:
    """Byte offsets to read: one every ``stride`` pages of ``count`` pages from page ``first``, maybe shuffled."""
    import numpy as np

    blocks = np.arange(first, first + count, stride, dtype=np.int64)
    if random:
        blocks = np.random.default_rng(seed).permutation(blocks)
    return (blocks * PAGE).tolist()


def run(fd: int, offs: list[int], size: int, rate: float) -> int:
    """Read every offset; at ``rate`` blocks/s if ``rate`` > 0. Returns the blocks read."""
    buf = bytearray(size)
    preadv = os.preadv
    bufs = [buf]
    if rate <= 0:
        for off in offs:
            preadv(fd, bufs, off)
        return len(offs)
    start = time.monotonic()
    done = 0
    n = len(offs)
    while done < n:
        due = min(n, int((time.monotonic() - start) * rate) + 1)
        while done < due:
            preadv(fd, bufs, offs[done])
            done += 1
        if done < n:
            time.sleep(0.0005)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="duet-bench-reader")
    ap.add_argument("path")
    ap.add_argument("--first", type=int, default=0, help="first page")
    ap.add_argument("--count", type=int, required=True, help="pages to cover")
    ap.add_argument("--block", type=int, default=PAGE, help="bytes per read (a multiple of 4096)")
    ap.add_argument("--random", action="store_true", help="shuffle the blocks")
    ap.add_argument("--fadvise-random", action="store_true", help="POSIX_FADV_RANDOM: no readahead")
    ap.add_argument("--rate", type=float, default=0.0, help="reads per second (0: as fast as possible)")
    ap.add_argument("--stride", type=int, default=0, help="pages from one read to the next (0: the block's)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    fd = os.open(args.path, os.O_RDONLY)
    if args.fadvise_random:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    offs = offsets(args.first, args.count, args.stride or args.block // PAGE, args.random, args.seed)
    print("ready", flush=True)
    if not sys.stdin.readline():
        return 1
    t0 = os.times()
    start = time.monotonic()
    reads = run(fd, offs, args.block, args.rate)
    end = time.monotonic()
    t1 = os.times()
    os.close(fd)
    print(json.dumps({"start": start, "end": end, "reads": reads,
                      "user_s": t1.user - t0.user, "sys_s": t1.system - t0.system}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
