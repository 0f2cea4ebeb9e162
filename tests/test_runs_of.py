"""``scheduler.runs_of``: page sets to (first, count) runs, checked against the plain definition."""

from __future__ import annotations

import random

from pyroaring import BitMap

from duet_core.scheduler import pages_of, runs_of


def plain_runs(pages: BitMap) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def test_runs_of_matches_the_definition():
    rnd = random.Random(7)
    cases = [BitMap(), BitMap([0]), BitMap([2**32 - 1]), BitMap(range(262144)), BitMap([0, 2, 4]),
             BitMap([0, 1, 2**32 - 2, 2**32 - 1])]
    for _ in range(50):
        bm = BitMap()
        for _ in range(rnd.randint(1, 20)):
            first = rnd.randrange(0, 1 << 20)
            bm.add_range(first, first + rnd.randint(1, 5000))
        cases.append(bm)
    for bm in cases:
        runs = runs_of(bm)
        assert runs == plain_runs(bm)
        assert pages_of(runs) == bm
        assert all(isinstance(x, int) for run in runs for x in run)
