"""Prometheus textfile metrics and log lines of ``duet run`` / ``duet watch``, parsed as a fleet's tools parse them.

Runs are real processes over btrfs on a direct-I/O loop device with test tasks installed as distributions
(:mod:`plugin_dist`); the ``*.prom`` files are read back with prometheus_client's own text parser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import fsimage
import plugin_dist
import pytest
from plugin_dist import duet_argv, make_dataset, read_log
from prometheus_client.parser import text_string_to_metric_families

from duet_core import metrics
from duet_core.config import load_config

TASKS = {"reader": "ReaderTask('reader')", "slow": "ReaderTask('slow', sleep=0.1)"}


class Env:
    def __init__(self, tmp_path):
        self.log = tmp_path / "log"
        self.prom = tmp_path / "prom"
        self.prom.mkdir()
        self.config = tmp_path / "duet.toml"
        self.config.write_text("")
        self.env = plugin_dist.install(tmp_path / "plugins", plugin_dist.tasks_dist(TASKS), log=str(self.log))
        self.env["DUET_STATE_DIR"] = str(tmp_path / "state")
        self.procs: list[subprocess.Popen] = []

    def argv(self, *args: str) -> list[str]:
        return duet_argv(*args, "--config", str(self.config))

    def run(self, *args: str, stderr=subprocess.PIPE, env=None) -> subprocess.CompletedProcess:
        return subprocess.run(duet_argv(*args) if "--config" in args else self.argv(*args), stdout=subprocess.PIPE,
                              stderr=stderr, text=True, timeout=120, env=env or self.env)

    def start(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env)
        self.procs.append(proc)
        return proc

    def prom_files(self) -> list[str]:
        return sorted(os.listdir(self.prom))

    def samples(self, name: str | None = None) -> dict[tuple, float]:
        """{(metric name, sorted labels without scope/mode): value} of the single .prom file."""
        (only,) = [f for f in self.prom_files() if f.endswith(".prom")]
        text = (self.prom / only).read_text()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("scope", "mode")))
                out[(s.name, labels)] = s.value
        return out


@pytest.fixture
def env(tmp_path, bpf_required):
    e = Env(tmp_path)
    try:
        yield e
    finally:
        for proc in e.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


@pytest.fixture
def direct_fs(require_root):
    with fsimage.loop_fs("btrfs", direct_io=True) as fs:
        yield fs


def task_sample(samples, metric, task, **labels):
    return samples[(metric, tuple(sorted({"task": task, **labels}.items())))]


def test_run_metrics_parse_and_match_the_run_summary(env, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=6)
    with open(os.path.join(scope, "a/f00"), "rb") as fh:   # one file cached: some bytes come from the cache
        fh.read()
    proc = env.run("-v", "run", "reader", "--path", scope, "--json", "--metrics-dir", str(env.prom))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    rep = summary["tasks"]["reader"]

    (name,) = env.prom_files()   # no temp file left behind
    assert name == metrics.file_name(os.path.realpath(scope), "run")
    assert os.stat(env.prom / name).st_mode & 0o777 == 0o644
    s = env.samples()
    assert s[("duet_run_info", (("result", "complete"), ("source", "bpf")))] == 1
    assert s[("duet_run_exit_code", ())] == 0
    assert s[("duet_run_dataset_bytes", ())] == sum(files.values())
    assert s[("duet_run_device_read_bytes", ())] == summary["device_read_bytes"]
    for state in ("total", "done", "failed"):
        assert task_sample(s, "duet_task_items", "reader", state=state) == rep[f"items_{state}"]
    assert task_sample(s, "duet_task_items", "reader", state="done") == len(files)
    assert task_sample(s, "duet_task_bytes", "reader", **{"from": "cache"}) == rep["bytes_from_cache"] > 0
    assert task_sample(s, "duet_task_bytes", "reader", **{"from": "device"}) == rep["bytes_from_device"] > 0
    assert abs(task_sample(s, "duet_task_last_success_timestamp_seconds", "reader") - time.time()) < 60
    assert ("duet_engine_events_total", ()) in s   # the run's own reads are not events (skipped in the kernel)
    assert {k for k in s if k[0] == "duet_engine_events_lost_total"} == {
        ("duet_engine_events_lost_total", (("where", w),)) for w in ("folio", "map", "ring")}

    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("duet: run finished: ")]
    assert f"scope={os.path.realpath(scope)} mode=run result=complete exit=0 " in line
    assert f"reader.done={len(files)}/{len(files)} reader.failed=0 " in line


def test_a_failed_run_keeps_the_last_success_time_of_the_one_before(env, direct_fs):
    scope, _files = make_dataset(direct_fs.mnt, n=4)
    assert env.run("run", "reader", "--path", scope, "--metrics-dir", str(env.prom)).returncode == 0
    first = task_sample(env.samples(), "duet_task_last_success_timestamp_seconds", "reader")
    time.sleep(0.05)
    failed = env.run("run", "reader", "--path", scope, "--fail", "f01", "--metrics-dir", str(env.prom))
    assert failed.returncode == 1, failed.stderr
    s = env.samples()
    assert s[("duet_run_exit_code", ())] == 1
    assert task_sample(s, "duet_task_items", "reader", state="failed") == 1
    assert task_sample(s, "duet_task_last_success_timestamp_seconds", "reader") == first


def test_watch_writes_metrics_at_start_and_when_stopped(env, direct_fs):
    scope, files = make_dataset(direct_fs.mnt, n=4, sizes=(64 << 10,))
    name = metrics.file_name(os.path.realpath(scope), "watch")
    proc = env.start("watch", "reader", "--path", scope, "--metrics-dir", str(env.prom), "--json")
    deadline = time.monotonic() + 30
    while not (env.prom / name).exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    s = env.samples()
    assert s[("duet_run_info", (("result", "watching"), ("source", "bpf")))] == 1
    assert ("duet_run_exit_code", ()) not in s          # still running

    with open(os.path.join(scope, "a/f00"), "rb") as fh:   # an application reads one file: the watch takes it
        fh.read()
    deadline = time.monotonic() + 30
    while not read_log(env.log):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 5, err
    s = env.samples()
    assert s[("duet_run_info", (("result", "SIGTERM"), ("source", "bpf")))] == 1
    assert s[("duet_run_exit_code", ())] == 5
    assert task_sample(s, "duet_task_items", "reader", state="done") == json.loads(out)["tasks"]["reader"][
        "items_done"] >= 1
    assert task_sample(s, "duet_task_items", "reader", state="total") == len(files)
    assert s[("duet_engine_events_total", ())] > 0       # the application's read, absorbed by the watch


def test_metrics_dir_from_the_config_and_a_missing_one_is_one_line(env, direct_fs, tmp_path):
    scope, _files = make_dataset(direct_fs.mnt, n=2)
    cfg = tmp_path / "with-metrics.toml"
    cfg.write_text(f'metrics_dir = "{env.prom}"\n')
    assert load_config(str(cfg)).metrics_dir == str(env.prom)
    assert env.run("run", "reader", "--path", scope, "--config", str(cfg)).returncode == 0
    assert env.prom_files() == [metrics.file_name(os.path.realpath(scope), "run")]

    missing = env.run("run", "reader", "--path", scope, "--metrics-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [f"duet: error: metrics directory {tmp_path / 'nope'} does not exist "
                                           "(create it, e.g. /var/lib/prometheus/node-exporter (node_exporter's "
                                           "textfile directory))"]


def test_log_lines_as_json_and_with_journald_priorities(env, direct_fs, tmp_path):
    scope, _files = make_dataset(direct_fs.mnt, n=2)
    proc = env.run("-v", "--log-format", "json", "run", "reader", "--path", scope, "--quiet", "--fail", "f01")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""    # --quiet: no summary table, no progress; the log lines below are all there is
    loud = env.run("run", "reader", "--path", scope, "--fail", "f01")
    assert "reader" in loud.stdout and "duet: 1 task(s) over" in loud.stderr    # what --quiet leaves out
    assert "task(s) over" not in proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]   # every line is a JSON object
    assert [(r["level"], r["msg"].split(":")[0]) for r in records if r["logger"] == "duet.cli"] == [
        ("warning", "reader"), ("info", "run finished")]
    assert "reader refuses b/f01" in records[0]["msg"]

    # Under systemd, stderr is the journal stream named by $JOURNAL_STREAM: lines carry their syslog priority.
    with open(tmp_path / "journal", "w+") as journal:
        st = os.fstat(journal.fileno())
        env_j = dict(env.env, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = env.run("-v", "run", "reader", "--path", scope, "--quiet", stderr=journal, env=env_j)
        journal.seek(0)
        lines = journal.read().splitlines()
    assert proc.returncode == 0
    assert any(line.startswith("<6>duet: run finished: ") for line in lines), lines


@pytest.mark.parametrize("scope", ['/srv/with "quotes"', "/srv/back\\slash", "/srv/new\nline", "/srv/ünïcode"])
def test_labels_survive_any_path(scope):
    summary = {"scope": scope, "result": "complete", "source": "poll", "wall_s": 1.5, "dataset_bytes": 10,
               "tasks": {"t": {"items_total": 2, "items_done": 2, "items_failed": 0, "bytes_from_cache": 3,
                               "bytes_from_device": 4, "complete": True}}}
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(summary, "run", exit_code=0))}
    (sample,) = families["duet_run_info"].samples
    assert sample.labels["scope"] == scope
    assert families["duet_run_duration_seconds"].samples[0].value == 1.5
    assert metrics.file_name(scope, "run").endswith(".prom") and "/" not in metrics.file_name(scope, "run")


def test_a_full_metrics_filesystem_warns_once_and_never_stops_the_run(env, direct_fs, tmp_path):
    scope, files = make_dataset(direct_fs.mnt, n=3)
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k,mode=0755", "tmpfs", str(full)], check=True)
    try:
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)   # fill it: every metrics write now gets ENOSPC
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        proc = env.run("run", "reader", "--path", scope, "--metrics-dir", str(full), "--json")
        leftovers = sorted(os.listdir(full))
    finally:
        fsimage.unmount(str(full))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tasks"]["reader"]["items_done"] == len(files)
    warnings = [line for line in proc.stderr.splitlines() if "cannot write metrics" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], proc.stderr
    assert leftovers == ["filler"]                  # no temp file left behind


def test_updates_while_running_are_throttled_and_the_end_always_written(tmp_path, monkeypatch):
    from duet_core.state import StateStore

    store = StateStore(str(tmp_path / "state"))
    writer = metrics.MetricsWriter(str(tmp_path), "/srv", "watch", store)
    report = {"items_total": 2, "items_done": 0, "items_failed": 0, "bytes_from_cache": 0, "bytes_from_device": 0,
              "complete": False}
    so_far = {"scope": "/srv", "result": "watching", "source": "bpf", "wall_s": 0.1, "dataset_bytes": 5,
              "tasks": {"t": report}}

    def done() -> float:
        with open(writer.path) as fh:
            text = fh.read()
        (value,) = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "duet_task_items" and s.labels["state"] == "done"]
        return value

    writer.update(so_far, {}, force=True)
    assert done() == 0
    writer.update({**so_far, "tasks": {"t": {**report, "items_done": 1}}}, {})   # within WRITE_EVERY_S: skipped
    assert done() == 0
    monkeypatch.setattr(metrics, "WRITE_EVERY_S", 0.0)
    writer.update({**so_far, "tasks": {"t": {**report, "items_done": 1}}}, {})
    assert done() == 1
    monkeypatch.setattr(metrics, "WRITE_EVERY_S", 3600.0)
    writer.finished({**so_far, "result": "SIGTERM", "tasks": {"t": {**report, "items_done": 2}}}, {}, 5)
    assert done() == 2
    assert sorted(os.listdir(tmp_path)) == sorted(["state", metrics.file_name("/srv", "watch")])   # no temp files
