"""kill -9 of ``duet run backup scrub defrag gc --path SRC --target T --keep-last 3 --prune`` at many random moments.

The source (btrfs) is not changed during the series, so every snapshot ever published must be exactly the source.
The kills land anywhere: start-up, the scan, planning, copies and their batched commits, scrub's reads, defrag's
rewrites, gc's hashing and dedupe, backup's sync pass, the manifest, the snapshot, gc's retention. The series is
seeded: the seed is printed and named in every failure message; ``DUET_CRASH_SEED=N`` replays one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import backup_helpers as bh
import fsimage
import pytest
from reliability_plugins import exact_snapshots, make_source
from test_backup import Duet, duet, source  # noqa: F401 - duet, source: shared fixtures
from test_reliability_crash import check_state

pytestmark = pytest.mark.bpf

KILLS = 20
FIRST_HORIZON = 4.0  # kills land 0.25..horizon s after exec. Here start-up takes 0.4 s and processing starts about
                     # 1.5 s in; with --rate-limit 1MB/s the first round needs about 6 s of processing, so it is
                     # killed several times before a run finishes it. Once a run finishes, the horizon follows that
                     # run's length (a no-change run: about 0.5-0.8 s): kills in its scan, sync pass, publishing,
                     # retention.
TASKS = ("backup", "scrub", "defrag", "gc")


def journal_relpaths(target: str) -> set[str]:
    try:
        with open(os.path.join(target, ".duet", "journal"), "rb") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return set()
    out = set()
    for line in lines:
        try:
            out.add(json.loads(line)[0])
        except ValueError:
            pass            # a line cut short by a kill
    return out


def progress(target: str, state: str) -> tuple:
    """What a run changes as it works: the state database (and its WAL), the journal of copies, the tree being
    built, the published snapshots."""
    def sig(path):
        try:
            st = os.stat(path)
            return st.st_size, st.st_mtime_ns
        except FileNotFoundError:
            return None
    trees = [os.path.join(target, ".duet", name) for name in ("mirror", "incomplete")]
    return (sig(os.path.join(state, "state.db")), sig(os.path.join(state, "state.db-wal")),
            sig(os.path.join(target, ".duet", "journal")), sum(len(f) for t in trees for _, _, f in os.walk(t)),
            tuple(bh.snapshot_names(target)) if os.path.isdir(os.path.join(target, "snapshots")) else ())


def regular_files(scope: str) -> set[str]:
    out = set()
    for dirpath, _dirs, files in os.walk(scope):
        for n in files:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.add(os.path.relpath(p, scope))
    return out


def test_kill_9_of_all_four_plugins_never_publishes_a_wrong_snapshot_nor_redoes_finished_work(duet, source):
    """The target is btrfs (mirror subvolume, read-only snapshots) for an even seed, ext4 (hard-link trees renamed
    into place) for an odd one — one series per CI run, both kinds over time; DUET_CRASH_TARGET=btrfs|ext4 forces."""
    seed = int(os.environ.get("DUET_CRASH_SEED") or time.time_ns() % 1_000_000)
    fstype = os.environ.get("DUET_CRASH_TARGET") or ("btrfs", "ext4")[seed % 2]
    print(f"plugin kill -9 test: seed {seed}, {fstype} target (replay with DUET_CRASH_SEED={seed})")
    with fsimage.loop_fs(fstype) as target:
        kill_series(duet, source, target, seed)


def kill_series(duet, source, target, seed: int) -> None:
    rng = random.Random(seed)
    scope = make_source(source.mnt, rng)
    argv = ("run", *TASKS, "--path", scope, "--target", target.mnt, "--keep-last", "3", "--prune",
            "--rate-limit", "1MB/s", "--json")
    state = duet.env["DUET_STATE_DIR"]
    seen: set[str] = set()
    kills = finished = mid_work = 0
    delays = []
    horizon = FIRST_HORIZON
    for attempt in range(3 * KILLS):
        if kills >= KILLS:
            break
        delay = rng.uniform(0.25, horizon)
        before = progress(target.mnt, state)
        t0 = time.monotonic()
        proc = duet.start(*argv)
        why = f"seed {seed}, attempt {attempt} (kill at {delay:.3f} s)"
        try:
            out, err = proc.communicate(timeout=delay)
            finished += 1        # it finished before the kill: it must have succeeded
            horizon = max(0.4, 1.1 * (time.monotonic() - t0))
            assert proc.returncode == 0, (why, err)
            assert json.loads(out)["tasks"]["backup"]["snapshot"], why
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            kills += 1
            delays.append(round(delay, 3))
            mid_work += progress(target.mnt, state) != before   # it had done something: not killed in start-up
        if os.path.exists(os.path.join(state, "state.db")):
            check_state(state, why)
        exact_snapshots(scope, target.mnt, why, seen)
    print(f"plugin kill -9 test: {kills} kills ({mid_work} after the run had changed something), {finished} runs "
          f"finished, {len(seen)} snapshots published "
          f"and checked (delays {delays})")
    assert kills >= KILLS, f"seed {seed}: only {kills} kills"
    assert mid_work >= 5, f"seed {seed}: only {mid_work} kills landed after start-up"
    # The next run completes, without copying again what the journal or the last snapshot already hold.
    journal = journal_relpaths(target.mnt)
    latest = bh.snapshot_names(target.mnt)[-1:] if os.path.isdir(os.path.join(target.mnt, "snapshots")) else []
    published = set(bh.manifest(target.mnt, latest[0])["files"]) if latest else set()
    final = duet(*argv)
    assert final.returncode == 0, (seed, final.stderr)
    assert "Traceback" not in final.stderr
    summary = json.loads(final.stdout)
    assert summary["result"] == "complete", seed
    rep = summary["tasks"]["backup"]
    need = regular_files(scope) - journal - published
    copied = rep["counters"].get("copied", 0) + rep["copied_at_finish"]
    assert copied <= len(need), f"seed {seed}: copied {copied} files, only {len(need)} were not copied before"
    assert summary["tasks"]["scrub"].get("corrupt", []) == [], seed
    snaps = exact_snapshots(scope, target.mnt, f"seed {seed}, after the final run", None)
    assert 1 <= len(snaps) <= 3, f"seed {seed}: --keep-last 3 left {len(snaps)} snapshots"
    # One more run: the round is complete, so backup reads nothing, scrub verifies nothing within its period,
    # gc hashes nothing again (the hashes are shared results of these file versions).
    again = json.loads(duet(*argv).stdout)
    assert again["tasks"]["backup"]["counters"].get("copied", 0) == again["tasks"]["backup"]["copied_at_finish"] == 0
    assert again["tasks"]["scrub"]["bytes_processed"] == 0, again["tasks"]["scrub"]
    assert again["tasks"]["gc"]["counters"].get("hashed_files", 0) == 0, again["tasks"]["gc"]
    exact_snapshots(scope, target.mnt, f"seed {seed}, after one more run", None)
