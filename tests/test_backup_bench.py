"""``duet bench backup`` runs end to end on a small data set and reports both tools (speed is not checked here)."""

from __future__ import annotations

import json
import subprocess

import pytest
from plugin_dist import duet_argv

pytestmark = pytest.mark.bpf


def test_bench_backup_reports_duet_and_rsync(bpf_required):
    proc = subprocess.run(duet_argv("bench", "backup", "--size", "8M", "--json"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode in (0, 1), proc.stderr       # 1: duet slower than rsync (a missed target, not a crash)
    report = json.loads(proc.stdout)
    assert report["dataset_bytes"] >= 8 << 20 and report["files"] > 10
    for key in ("rsync_initial_s", "duet_initial_s", "rsync_rerun_s", "duet_rerun_s", "duet_unthrottled_initial_s"):
        assert report[key] > 0, key
    sample = report["samples"][0]
    assert sample["duet_initial"]["copied"] == report["files"] == sample["duet_initial"]["files"]
    assert sample["duet_rerun"]["copied"] == 0 and report["duet_rerun_device_read_bytes"] < 1 << 20
    assert sample["verify"]["files"] == report["files"] and sample["verify"]["bytes"] == report["dataset_bytes"]
    assert report["verify_s"] > 0 and report["read_all_s"] > 0
    assert proc.returncode == (0 if all(report["targets"].values()) else 1)
