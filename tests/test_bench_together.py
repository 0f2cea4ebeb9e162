"""``duet bench together / piggyback / peers`` and ``duet demo`` run end to end on a tiny data set.

Speed is not checked here (benchmarks are not part of the suite): each test checks that the report has its keys,
that its numbers agree with each other and with what was run (every task read the data set it had to, the sums are
sums), that the exit code follows the targets, and that ``--plot`` wrote a PNG.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from plugin_dist import duet_argv, excused_by_cache_drops

pytestmark = pytest.mark.bpf

SIZE = "16M"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMON_KEYS = ("dataset_bytes", "baseline_device_read_bytes", "duet_device_read_bytes", "baseline_wall_s",
               "duet_wall_s")


def bench(name: str, tmp_path, *extra: str) -> dict:
    png = tmp_path / f"{name}.png"
    proc = subprocess.run(duet_argv("bench", name, "--size", SIZE, "--json", "--plot", str(png), *extra),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr      # 1: a missed target, not a crash
    report = json.loads(proc.stdout)
    assert proc.returncode == (0 if all(report["targets"].values()) else 1)
    assert png.read_bytes()[:8] == PNG_MAGIC
    for key in COMMON_KEYS:
        assert report[key] > 0, key
    assert report["dataset_bytes"] >= 16 << 20
    return report


@excused_by_cache_drops
def test_bench_together(bpf_required, tmp_path):
    r = bench("together", tmp_path)
    ds = r["dataset_bytes"]
    alone = {run["tasks"][0]: run for run in r["baseline"]}
    assert set(alone) == {"backup", "scrub", "defrag", "gc"}
    # backup and scrub each read the whole evicted data set; defrag and gc only part of it.
    for task in ("backup", "scrub"):
        assert alone[task]["device_read_bytes"] >= ds, task
    for task in ("defrag", "gc"):
        assert 0 < alone[task]["device_read_bytes"] < ds, task
    assert r["baseline_device_read_bytes"] == sum(run["device_read_bytes"] for run in r["baseline"])
    assert r["baseline_device_read_bytes"] >= 2 * ds
    # duet's one run reads the data set at least once (its backup is complete) and far less than the four alone.
    assert ds <= r["duet_device_read_bytes"] < r["baseline_device_read_bytes"]
    assert r["duet"]["counters"]["backup"]["copied_bytes"] == ds
    assert r["duet"]["counters"]["gc"]["deduped_bytes"] == r["duplicate_bytes"]
    assert r["duet_process_read_bytes"] > 0 and r["baseline_cpu_s"] > 0
    assert r["baseline_slowest_wall_s"] == max(run["wall_s"] for run in r["baseline"])


@excused_by_cache_drops
def test_bench_piggyback(bpf_required, tmp_path):
    r = bench("piggyback", tmp_path, "--fraction", "1", "--runs", "2")
    ds = r["dataset_bytes"]
    # Two repetitions, each fio alone and fio with duet on a fresh copy; the report is the one with the higher
    # slowdown of the two (the upper middle: the target is judged on the worse), and the maintenance's target
    # holds in both.
    assert r["runs"] == len(r["samples"]) == 2
    assert r["foreground_slowdown"] == max(r["foreground_slowdowns"])
    assert r["foreground_slowdowns"] == [s["foreground_slowdown"] for s in r["samples"]]
    for s in r["samples"]:
        assert s["fio_alone"]["io_bytes"] == s["fio_with_duet"]["io_bytes"] > 0
        assert s["duet_with_fio"]["result"] == "complete"
    assert 0 < r["foreground_read_bytes"] <= min(ds, r["fio_alone"]["device_read_bytes"])   # what fio left cached
    assert r["foreground_fraction"] == round(r["foreground_read_bytes"] / ds, 3)
    assert r["fio_alone"]["io_bytes"] == r["fio_with_duet"]["io_bytes"] > 0
    assert r["maintenance_alone_read_bytes"] >= ds      # alone, it reads everything itself
    assert 0 < r["maintenance_read_bytes"] <= r["duet_device_read_bytes"]
    assert r["baseline_device_read_bytes"] >= ds + r["foreground_read_bytes"]
    assert r["foreground_alone_bytes_per_s"] > 0 and r["foreground_with_duet_bytes_per_s"] > 0


@excused_by_cache_drops
def test_bench_peers(bpf_required, tmp_path):
    r = bench("peers", tmp_path)
    ds = r["dataset_bytes"]
    jobs = r["jobs"]
    assert [j["peer"]["argv"][0] for j in jobs.values() if j["peer"]][:3] == ["rsync", "btrfs", "btrfs"]
    for job in ("backup", "scrub"):   # both tools of these read everything
        assert jobs[job]["peer"]["device_read_bytes"] >= ds and jobs[job]["duet"]["device_read_bytes"] >= ds, job
        assert jobs[job]["wall_ratio"] == round(jobs[job]["duet"]["wall_s"] / jobs[job]["peer"]["wall_s"], 3)
    assert r["baseline_device_read_bytes"] == sum(j["peer"]["device_read_bytes"] for j in jobs.values() if j["peer"])
    assert ds <= r["duet_device_read_bytes"] < r["duet_alone_device_read_bytes"]


def test_demo_shows_together(bpf_required):
    proc = subprocess.run(duet_argv("demo", "--seconds", "3", "--together-size", SIZE), capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, COLUMNS="200"))   # rows not wrapped
    assert proc.returncode == 0, proc.stderr
    assert "duet bench together" in proc.stdout and "each alone, in turn" in proc.stdout
    assert proc.stdout.rstrip().endswith("demo ok")


@pytest.mark.parametrize("argv, says", [
    (("bench", "together", "--size", "1M"), "--size must be at least 8MiB"),
    (("bench", "peers", "--size", "lots"), "bad size"),
    (("bench", "piggyback", "--fraction", "0"), "--fraction must be above 0"),
    (("bench", "together", "--plot", "/nonexistent-dir/x.png"), "cannot write the plot"),
    (("demo", "--together-size", "1M"), "--together-size must be 0"),
])
def test_bad_input_is_one_line_before_any_work(require_root, argv, says):
    proc = subprocess.run(duet_argv(*argv), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and says in proc.stderr and proc.stdout == ""
