"""Stops and crashes of ``duet run`` as a real process on a real loop filesystem: kill -9 at many random moments,
SIGINT, and two runs on one scope at once.

The kill test is seeded: the seed is printed and named in every failure message, and ``DUET_CRASH_SEED=N`` replays
one. Each task logs one line per file it finishes (the hexer tasks of tests/reliability.py), so hook calls can be
counted: after any number of kills the state database checks clean, and the runs together process each file at
least once and redo at most one finished file per task per kill (progress is committed after every slow item).
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import sqlite3
import subprocess
import time

import pytest
from reliability import RDuet, duet, fs, sha256  # noqa: F401 - duet, fs: shared fixtures
from test_run_cli import one_error, summary_of, wait_for

from duet_core.state import StateStore

pytestmark = pytest.mark.bpf

KILLS = 24


def small_files(root: str, n: int) -> dict[bytes, bytes]:
    os.makedirs(root)
    files = {}
    for i in range(n):
        name = f"d{i % 3}/f{i:03d}"
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        data = os.urandom(4096 + i)
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(data)
        files[name.encode()] = data
    return files


def check_state(state_dir, why: str) -> None:
    db = sqlite3.connect(os.path.join(state_dir, "state.db"))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",), why
    finally:
        db.close()
    StateStore(str(state_dir)).close()


def test_kill_9_at_random_moments_never_damages_state_nor_loses_finished_work(duet, fs):
    seed = int(os.environ.get("DUET_CRASH_SEED") or time.time_ns() % 1_000_000)
    print(f"kill -9 test: seed {seed} (replay with DUET_CRASH_SEED={seed})")
    rng = random.Random(seed)
    scope = os.path.join(fs.mnt, "scope")
    files = small_files(scope, 150)
    tasks = ("hexer", "slowhex")
    kills, finished_alone, delays = 0, 0, []
    mid_work = logged_before = 0
    while kills < KILLS:
        delay = rng.uniform(0.0, 1.5)    # from exec: start-up, scan, planning, processing, commits
        proc = duet.start("run", *tasks, "--path", scope, "--sleep", "0.075", "--quiet")
        try:
            proc.wait(timeout=delay)
            finished_alone += 1          # it finished before the kill: the round is complete, stop here
            assert proc.returncode == 0, (seed, proc.stderr.read())
            break
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        kills += 1
        delays.append(round(delay, 3))
        logged = len(duet.hex_log())
        mid_work += logged > logged_before   # killed while processing, not during start-up
        logged_before = logged
        if os.path.exists(duet.state / "state.db"):
            check_state(duet.state, f"seed {seed}, kill {kills} at {delay:.3f} s")
    print(f"kill -9 test: {kills} kills, {mid_work} of them while files were being processed, "
          f"{len(duet.hex_log())} files processed before the final run")
    assert kills >= 20, f"seed {seed}: a run finished after only {kills} kills"
    assert mid_work >= 5, f"seed {seed}: only {mid_work} kills landed while files were processed (slow start-up?)"
    final = duet("run", *tasks, "--path", scope, "--sleep", "0", "--json", timeout=120)
    assert final.returncode == 0, (seed, final.stderr)
    summary = summary_of(final)
    assert summary["result"] == "complete"
    log = duet.hex_log()
    for task in tasks:
        counts = collections.Counter(p for t, p, _ in log if t == task)
        assert set(counts) == set(files), f"seed {seed}: {task} missed files"
        redone = sum(counts.values()) - len(files)
        assert redone <= kills, f"seed {seed}: {task} redid {redone} files over {kills} kills (delays {delays})"
        assert summary["tasks"][task]["items_done"] == summary["tasks"][task]["items_total"] == len(files)
    assert {(p, d) for _, p, d in log} == {(p, sha256(data)) for p, data in files.items()}
    status = json.loads(duet("status", "--path", scope, "--json").stdout)
    assert all(t["complete"] for t in status["scopes"][0]["tasks"].values())


def test_sigint_stops_within_a_second_saves_progress_and_the_next_run_resumes(duet, fs):
    scope = os.path.join(fs.mnt, "scope")
    files = small_files(scope, 30)
    proc = duet.start("run", "slowhex", "--path", scope, "--sleep", "0.15", "--json")
    wait_for(lambda: len(duet.hex_log()) >= 3, what="three files done", proc=proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    stopped_in = time.monotonic() - t0
    assert proc.returncode == 5, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert stopped_in < 1.0, f"took {stopped_in:.2f} s to stop"
    summary = json.loads(out)
    assert summary["result"] == "SIGINT" and summary["tasks"]["slowhex"]["complete"] is False
    done = {p for _, p, _ in duet.hex_log()}
    assert summary["tasks"]["slowhex"]["items_done"] == len(done) < len(files)
    again = duet("run", "slowhex", "--path", scope, "--sleep", "0", "--json")
    assert again.returncode == 0, again.stderr
    rest = sum(len(data) for p, data in files.items() if p not in done)
    assert summary_of(again)["tasks"]["slowhex"]["bytes_processed"] == rest
    assert duet.hex_counts("slowhex") == dict.fromkeys(files, 1)


def test_overlapping_runs_from_cron_the_second_exits_4_and_state_stays_intact(duet, fs, tmp_path):
    scope = os.path.join(fs.mnt, "scope")
    files = small_files(scope, 16)
    config = tmp_path / "cron.toml"
    config.write_text(f'[[scope]]\npath = "{scope}"\ntasks = ["slowhex"]\n[task.slowhex]\nsleep = "0.3s"\n')
    first = duet.start("run", "--config", str(config), "--json")
    wait_for(lambda: len(duet.hex_log()) >= 1, what="the first run working", proc=first)
    for args in (("run", "--config", str(config), "--json"), ("run", "hexer", "--path", scope),
                 ("watch", "hexer", "--path", scope)):
        t0 = time.monotonic()
        proc = duet(*args)
        assert time.monotonic() - t0 < 5
        one_error(proc, 4, f"(pid {first.pid}) is working on {scope}")
        assert proc.stdout == ""
    assert first.poll() is None, "the first run was disturbed"
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert duet.hex_counts("slowhex") == dict.fromkeys(files, 1) and duet.hex_counts("hexer") == {}
    db = sqlite3.connect(duet.state / "state.db")
    try:
        assert db.execute("SELECT COUNT(*), MIN(result) FROM runs").fetchone() == (1, "complete")
    finally:
        db.close()
