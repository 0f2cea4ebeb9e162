"""``duet bench engine`` on a tiny workload: the report's shape, and every page generated accounted for.

No timing is asserted: on a tiny file and one run, timings are noise. What must hold at any size is that each page
the readers added to the cache (one per read, checked with cachestat, never taken from the engine) was delivered or
counted as lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fsimage
import pytest

pytestmark = [pytest.mark.bpf]

WORKLOAD_KEYS = {"name", "pages", "delivered_pages", "lost_pages", "baseline_s", "engine_s", "accounted",
                 "slowdown_pct", "engine_cpu_pct", "events_per_s"}
TINY = dict(size=64 << 20, runs=1, settle_s=0, touch_bytes=0, drop_caches=False, device_size=16 << 20,
            dev_random_pages=256, rate=20_000, rate_s=0.2, retries=0)


def test_tiny_bench_accounts_for_every_page(bpf_required):
    from duet_core.bench.engine import run_bench

    report = json.loads(json.dumps(run_bench(prefix="duet-test-", **TINY)))
    assert not fsimage.leaked_mounts() and not fsimage.leaked_loops()
    names = [w["name"] for w in report["workloads"]]
    assert names == ["seq-1", "rand-1", "seq-2", "rand-2", "rate-20k", "dev-seq", "dev-rand"]
    for w in report["workloads"]:
        assert WORKLOAD_KEYS <= set(w), w["name"]
        assert w["pages"] > 0, w["name"]
        assert w["accounted"], w["name"]
        for run in w["runs"]:
            if run["mode"] == "engine" and run["cached_pages"] == run["pages"]:   # no one else evicted pages
                assert run["delivered_pages"] + run["lost_pages"] == run["pages"] <= run["kernel_pages"]
    # 4 KiB preads of holes with POSIX_FADV_RANDOM: one page per read.
    seq = report["workloads"][0]
    assert seq["pages"] == (64 << 20) // 4096
    assert report["targets"]["all_accounted"] is True and report["ok"] is True
    assert report["attach"]["attach_to_first_event_s"] is not None
    assert set(report["targets"]) == {"all_accounted", "none_lost", "engine_cpu_at_100k_le_10pct",
                                      "cpu_bound_slowdown_le_10pct", "device_bound_slowdown_le_2pct",
                                      "attach_under_1s"}


def test_cli_json_is_one_object(bpf_required):
    proc = subprocess.run([sys.executable, "-m", "duet_core.cli.main", "bench", "engine", "--json", "--size", "16M",
                           "--runs", "1", "--settle", "0", "--touch", "0", "--no-drop-caches", "--device-size", "0",
                           "--rate", "0", "--only", "rand-1", "--retries", "0"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    (w,) = report["workloads"]
    assert w["name"] == "rand-1" and w["pages"] == 4096 and w["delivered_pages"] + w["lost_pages"] == 4096
