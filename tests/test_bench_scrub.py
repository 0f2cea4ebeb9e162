"""``duet bench scrub`` end to end on a small data set: the report's numbers agree with what was run.

Speed is not checked (benchmarks are not part of the suite): every cold reader — btrfs scrub, duet's scrub and the
``cat`` reference — read the whole evicted data set from the device, and the exit code follows the targets.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from plugin_dist import duet_argv, excused_by_cache_drops

pytestmark = pytest.mark.bpf


@excused_by_cache_drops
def test_bench_scrub_reads_everything_cold_with_every_reader(bpf_required):
    proc = subprocess.run(duet_argv("bench", "scrub", "--size", "32M", "--runs", "1", "--json"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    r = json.loads(proc.stdout)
    assert proc.returncode == (0 if all(r["targets"].values()) else 1)
    ds = r["dataset_bytes"]
    assert ds >= 32 << 20 and r["files"] > 100
    (sample,) = r["samples"]
    for reader in ("btrfs", "duet", "cat"):
        assert sample[reader]["device_read_bytes"] >= 0.99 * ds, reader
        assert sample[reader]["wall_s"] > 0, reader
    assert r["plain_read_wall_s"] == sample["cat"]["wall_s"]
    assert r["plain_read_ratio"] == round(sample["cat"]["wall_s"] / r["btrfs_scrub_wall_s"], 3)
    # Cold, the scope the whole filesystem: the kernel's scrub verified every byte, metadata too, as btrfs scrub.
    assert sample["duet"]["kernel_scrub"] == 1
    assert {"engine_load_s", "scan_s", "plan_s", "startup_s"} <= set(sample["duet"]["phases"])
    assert ds <= sample["duet"]["scrub_from_device_bytes"] <= 1.01 * sample["btrfs"]["device_read_bytes"]
    # At this size the kernel's scrub may be done before the foreground reader starts: at most everything, once.
    assert 0 < r["foreground_scrub_device_share"] <= 1.1
