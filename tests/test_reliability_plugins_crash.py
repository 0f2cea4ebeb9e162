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

from duet_core.state import StateStore

pytestmark = pytest.mark.bpf

KILLS = 20
FIRST_HORIZON = 4.0  # kills land 0.25..horizon s after exec. Here start-up takes 0.4 s and processing starts about
                     # 1.5 s in; with --rate-limit 1MB/s the first round needs about 6 s of processing, so it is
                     # killed several times before a run finishes it. Once a run finishes, the horizon follows that
                     # run's length (a no-change run: about 0.3 s now, 0.5-0.8 s when this was written): kills in its
                     # scan, sync pass, publishing, retention — and about half of those runs now end before their
                     # kill, hence up to ATTEMPTS runs for KILLS kills (a series made 14-17 of 20 in 60 runs).
ATTEMPTS = 5 * KILLS
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


def unfinished(state_dir: str, scope: str, target: str) -> dict[str, dict[str, int]]:
    """Per task, the files (relpath -> size) whose work is not recorded as done, taken between two runs.

    Backup: the files neither the journal of copies nor the last snapshot holds. The others, from the state store:
    all files before the task's first round was planned (or before the scan recorded them), those not planned yet
    or pending in an open round, none after a finished round (the source does not change in this test, so a new
    round finds nothing to do again)."""
    on_disk = {}
    for rel in regular_files(scope):
        st = os.lstat(os.path.join(scope, rel))
        on_disk[rel] = (st.st_ino, st.st_size)
    latest = bh.snapshot_names(target)[-1:] if os.path.isdir(os.path.join(target, "snapshots")) else []
    published = set(bh.manifest(target, latest[0])["files"]) if latest else set()
    copied = journal_relpaths(target) | published
    out = {"backup": {rel: size for rel, (_, size) in on_disk.items() if rel not in copied}}
    if not os.path.exists(os.path.join(state_dir, "state.db")):    # no run got as far as the store
        return {**out, **{task: {rel: size for rel, (_, size) in on_disk.items()} for task in TASKS[1:]}}
    store = StateStore(state_dir)
    try:
        sid = {root: i for i, root in store.scopes()}.get(scope)
        files = {f.id: f for f in store.files(sid)} if sid is not None else {}
        known = {f.fid.ino for f in files.values()}
        unknown = {rel: size for rel, (ino, size) in on_disk.items() if ino not in known}
        for task in TASKS[1:]:
            p = store.progress(sid, task) if sid is not None else None
            if p is None or p.round == 0:
                left = set(files)
            elif p.complete:
                left = set()
            else:
                left = (set(files) - set(p.planned)) | set(p.pending)
            out[task] = {**unknown, **{files[i].relpath: files[i].size for i in left if i in files}}
        return out
    finally:
        store.close()


def redid_only_unfinished(summary: dict, left: dict[str, dict[str, int]], why: str) -> None:
    """A run after kills redoes at most what :func:`unfinished` found not done before it: backup copies no file
    already copied, scrub verifies no byte of a file already verified, gc hashes no file already hashed, defrag
    rewrites no file already defragmented."""
    tasks = summary["tasks"]
    copied = tasks["backup"]["counters"].get("copied", 0) + tasks["backup"]["copied_at_finish"]
    assert copied <= len(left["backup"]), f"{why}: copied {copied} files, only {len(left['backup'])} were not " \
                                          "copied before"
    assert tasks["scrub"]["bytes_processed"] <= sum(left["scrub"].values()), (why, tasks["scrub"], left["scrub"])
    assert tasks["gc"]["counters"].get("hashed_files", 0) <= len(left["gc"]), (why, tasks["gc"], left["gc"])
    rewritten = {f["path"] for f in tasks["defrag"]["files"] if f["outcome"] == "defragmented"}
    assert len(rewritten) == tasks["defrag"]["defragmented"], (why, tasks["defrag"])
    assert rewritten <= left["defrag"].keys(), (why, tasks["defrag"], left["defrag"])


def work_done(summary: dict, left: dict[str, dict[str, int]]) -> str:
    """What a run did against what was left for it, for the test's report."""
    tasks = summary["tasks"]
    copied = tasks["backup"]["counters"].get("copied", 0) + tasks["backup"]["copied_at_finish"]
    return (f"copied {copied}/{len(left['backup'])}, scrubbed {tasks['scrub']['bytes_processed']}/"
            f"{sum(left['scrub'].values())} B, hashed {tasks['gc']['counters'].get('hashed_files', 0)}/"
            f"{len(left['gc'])}, defragmented {tasks['defrag']['defragmented']}/{len(left['defrag'])}")


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
    redone = []   # what each run that was not killed did
    horizon = FIRST_HORIZON
    for attempt in range(ATTEMPTS):
        if kills >= KILLS:
            break
        delay = rng.uniform(0.25, horizon)
        left = unfinished(state, scope, target.mnt)   # first: opening the store may touch its files
        before = progress(target.mnt, state)
        t0 = time.monotonic()
        proc = duet.start(*argv)
        why = f"seed {seed}, attempt {attempt} (kill at {delay:.3f} s)"
        try:
            out, err = proc.communicate(timeout=delay)
            finished += 1        # it finished before the kill: it must have succeeded
            horizon = max(0.4, 1.1 * (time.monotonic() - t0))
            assert proc.returncode == 0, (why, err)
            summary = json.loads(out)
            assert summary["tasks"]["backup"]["snapshot"], why
            redid_only_unfinished(summary, left, why)
            redone.append(work_done(summary, left))
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
    # The next run completes, without redoing what the killed runs finished.
    left = unfinished(state, scope, target.mnt)
    final = duet(*argv)
    assert final.returncode == 0, (seed, final.stderr)
    assert "Traceback" not in final.stderr
    summary = json.loads(final.stdout)
    assert summary["result"] == "complete", seed
    redid_only_unfinished(summary, left, f"seed {seed}, the final run")
    redone.append(work_done(summary, left))
    print("plugin kill -9 test: what the finished runs and the final one did / what was left before each: "
          + "; ".join(redone))
    assert summary["tasks"]["scrub"].get("corrupt", []) == [], seed
    snaps = exact_snapshots(scope, target.mnt, f"seed {seed}, after the final run", None)
    assert 1 <= len(snaps) <= 3, f"seed {seed}: --keep-last 3 left {len(snaps)} snapshots"
    # One more run: the round is complete, so backup reads nothing, scrub verifies nothing within its period,
    # gc hashes nothing again (the hashes are shared results of these file versions).
    again = json.loads(duet(*argv).stdout)
    assert again["tasks"]["backup"]["counters"].get("copied", 0) == again["tasks"]["backup"]["copied_at_finish"] == 0
    assert again["tasks"]["scrub"]["bytes_processed"] == 0, again["tasks"]["scrub"]
    assert again["tasks"]["gc"]["counters"].get("hashed_files", 0) == 0, again["tasks"]["gc"]
    assert again["tasks"]["defrag"]["defragmented"] == 0, again["tasks"]["defrag"]
    exact_snapshots(scope, target.mnt, f"seed {seed}, after one more run", None)
