"""Files changing under ``duet run backup scrub defrag gc``: while the run works, a thread keeps modifying,
truncating, deleting, renaming, and replacing by a symlink, a directory or a fifo a set of victim files — fragmented
(defrag rewrites them) and each the twin of a stable file (gc dedupes them against it).

What must hold, on btrfs and ext4: scrub reports no corruption (every change is a legitimate write); no file's bytes
are ever changed by defrag or gc (the stable files are byte for byte what they were, and every victim holds one of
the versions the thread wrote); the snapshot holds each stable file exactly and each victim as one of its versions
(or not at all, or as what replaced it) — a mixed copy only if backup flagged it ``changed_during_backup``; and once
the changes stop, the next run's snapshot is exactly the source. The thread's choices are seeded (the seed is
printed; ``DUET_RACE_SEED=N`` replays the choices, not the timing). A fifo swapped in must never be opened as data:
a blocking open would hang the root run, so the run is given :data:`RUN_TIMEOUT` and a hang fails the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import threading
import time

import backup_helpers as bh
import fsimage
import pytest
from test_backup import Duet

pytestmark = pytest.mark.bpf

VICTIMS = 6
CHUNK = 16 << 10
RUN_TIMEOUT = 120    # s; a run here takes 5-15 s on a busy machine


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


class Mutator(threading.Thread):
    """Changes the victims until stopped; ``versions[rel]`` is every content a victim ever had."""

    def __init__(self, scope: str, victims: dict[str, bytes], rng: random.Random):
        super().__init__(daemon=True)
        self.scope, self.rng = scope, rng
        self.current = dict(victims)                           # rel -> content now, None if not a regular file
        self.versions = {rel: {sha(data)} for rel, data in victims.items()}
        self.stop = threading.Event()
        self.ops: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
                time.sleep(self.rng.uniform(0.03, 0.15))
        except BaseException as exc:   # noqa: BLE001 - reported by the test
            self.error = exc

    def _write(self, rel: str, data: bytes) -> None:
        with open(os.path.join(self.scope, rel), "wb") as fh:
            fh.write(data)
        self._now(rel, data)

    def _now(self, rel: str, data: bytes | None) -> None:
        self.current[rel] = data
        if data is not None:
            self.versions[rel].add(sha(data))

    def _clear(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    def step(self) -> None:
        rel = self.rng.choice(sorted(self.current))
        path = os.path.join(self.scope, rel)
        data = self.current[rel]
        op = self.rng.choice(["modify", "truncate", "delete", "rename", "symlink", "directory", "fifo", "restore"])
        if data is None or op == "restore":          # make it a regular file again
            self._clear(path)
            self._write(rel, self.rng.randbytes(self.rng.choice((64, 256, 512)) << 10))
            op = "restore"
        elif op == "modify":
            off = self.rng.randrange(len(data) + 1)
            patch = self.rng.randbytes(self.rng.randrange(1, 64 << 10))
            with open(path, "r+b") as fh:
                fh.seek(off)
                fh.write(patch)
            self._now(rel, data[:off] + patch + data[off + len(patch):])
        elif op == "truncate":
            n = self.rng.randrange(len(data) + 1)
            os.truncate(path, n)
            self._now(rel, data[:n])
        elif op == "delete":
            os.unlink(path)
            self._now(rel, None)
        elif op == "rename":                          # moved away and another file moved in under its name
            os.rename(path, path + ".old")
            fresh = self.rng.randbytes(128 << 10)
            with open(path + ".new", "wb") as fh:
                fh.write(fresh)
            os.rename(path + ".new", path)
            os.unlink(path + ".old")
            self._now(rel, fresh)
        elif op == "symlink":
            os.unlink(path)
            os.symlink("/etc/passwd", path)
            self._now(rel, None)
        elif op == "directory":
            os.unlink(path)
            os.mkdir(path)
            with open(os.path.join(path, "inside"), "wb") as fh:
                fh.write(b"a directory now\n")
            self._now(rel, None)
        elif op == "fifo":                            # no writer ever comes: an O_RDONLY open of it blocks forever
            os.unlink(path)
            os.mkfifo(path, 0o644)
            self._now(rel, None)
        self.ops.append(op)


def make_scope(root: str, rng: random.Random) -> tuple[str, dict[str, bytes], dict[str, bytes]]:
    """Stable files (some the twins of victims) and fragmented victims; returns (scope, stable, victims)."""
    scope = os.path.join(root, "data")
    stable: dict[str, bytes] = {}
    victims: dict[str, bytes] = {}
    for i in range(8):
        stable[f"s/plain{i}"] = rng.randbytes(48_000 + 20_011 * i)
    for i in range(VICTIMS):
        data = rng.randbytes(24 * CHUNK)
        stable[f"s/twin{i}"] = data
        victims[f"v/victim{i}"] = data
    for i in range(2):                         # stable work for gc and defrag beside the victims
        stable[f"s/pair{i}a"] = stable[f"s/pair{i}b"] = rng.randbytes(80 << 10)
    fragmented = {f"s/frag{i}": rng.randbytes(24 * CHUNK) for i in range(2)}
    stable.update(fragmented)
    for rel, data in stable.items():
        if rel not in fragmented:
            bh.write(os.path.join(scope, rel), data)
    os.makedirs(os.path.join(scope, "v"))
    chunked = {**victims, **fragmented}
    handles = [open(os.path.join(scope, rel), "wb") for rel in chunked]
    try:
        for c in range(24):                    # interleaved, fsynced chunks: fragmented
            for fh, data in zip(handles, chunked.values()):
                fh.write(data[c * CHUNK:(c + 1) * CHUNK])
                fh.flush()
                os.fsync(fh.fileno())
    finally:
        for fh in handles:
            fh.close()
    bh.evict_regular(scope)
    return scope, stable, victims


@pytest.mark.parametrize("fstype", ["btrfs", "ext4"])
def test_files_changing_under_all_four_plugins(fstype, tmp_path, bpf_required, require_root):
    seed = int(os.environ.get("DUET_RACE_SEED") or time.time_ns() % 1_000_000)
    print(f"race test ({fstype}): seed {seed} (replay with DUET_RACE_SEED={seed})")
    rng = random.Random(seed)
    duet = Duet(tmp_path)
    with fsimage.loop_fs(fstype) as src, fsimage.loop_fs("btrfs") as target:
        scope, stable, victims = make_scope(src.mnt, rng)
        mutator = Mutator(scope, victims, random.Random(seed + 1))
        argv = ("run", "backup", "scrub", "defrag", "gc", "--path", scope, "--target", target.mnt,
                "--rate-limit", "2MB/s", "--json")
        mutator.start()
        try:
            proc = duet(*argv, timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"seed {seed}: the run hung for {RUN_TIMEOUT} s (killed) after {len(mutator.ops)} changes "
                        f"({', '.join(mutator.ops[-8:])}...): a blocking open of a name swapped for a fifo?")
        finally:
            mutator.stop.set()
            mutator.join(timeout=30)
        assert mutator.error is None, mutator.error
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode in (0, 1), (seed, proc.returncode, proc.stderr)   # 1: an entry replaced mid-copy
        summary = json.loads(proc.stdout)
        tasks = summary["tasks"]
        print(f"race test ({fstype}): {len(mutator.ops)} changes during the run "
              f"({', '.join(f'{op} {mutator.ops.count(op)}' for op in sorted(set(mutator.ops)))}); defrag "
              f"{tasks['defrag'].get('defragmented', 0)} rewritten, gc {tasks['gc']['counters']}")
        assert len(mutator.ops) >= 10, f"seed {seed}: the thread changed too little while the run worked"
        # defrag and gc did work in this run (ext4 cannot share extents: gc only reports what it could reclaim).
        assert tasks["defrag"]["defragmented"] >= 1, (seed, tasks["defrag"])
        gc_work = tasks["gc"]["counters"].get("deduped_files" if fstype == "btrfs" else "reclaimable_bytes", 0)
        assert gc_work > 0, (seed, tasks["gc"])
        # Scrub: legitimate writes are never corruption.
        assert tasks["scrub"].get("corrupt", []) == [] and tasks["scrub"]["items_damaged"] == 0, (seed, tasks)
        # Defrag and gc never change bytes: stable files as they were, victims one of their versions.
        for rel, data in stable.items():
            assert read_all(os.path.join(scope, rel)) == data, f"seed {seed}: {rel} changed"
        for rel, content in mutator.current.items():
            path = os.path.join(scope, rel)
            if content is not None:
                assert read_all(path) == content, f"seed {seed}: {rel} is not what was last written"
        # The snapshot: stable files exact; victims one of their versions, or flagged as changed while copied.
        # The run finished its round (exit 0 or 1, checked above), and backup publishes a snapshot whenever its round
        # is finished and the target writable: entries changing under the sync pass are left out or reported, they
        # never stop the snapshot.
        rep = tasks["backup"]
        assert rep["snapshot"], (seed, summary["result"], rep)
        snap = os.path.join(target.mnt, "snapshots", rep["snapshot"])
        for rel, data in stable.items():
            assert read_all(os.path.join(snap, rel)) == data, f"seed {seed}: {rel} wrong in the snapshot"
        flagged = set(rep.get("changed_during_backup", []))
        for rel in victims:
            path = os.path.join(snap, rel)
            if os.path.isfile(path) and not os.path.islink(path) and rel not in flagged:
                assert sha(read_all(path)) in mutator.versions[rel], \
                    f"seed {seed}: {rel} in the snapshot is no version the file ever had"
        assert not os.path.exists(os.path.join(snap, "etc")), "a symlink was followed"
        # Quiet again: the next run's snapshot is exactly the source.
        again = duet("run", "backup", "scrub", "--path", scope, "--target", target.mnt, "--json")
        assert again.returncode == 0, (seed, again.stderr)
        name = json.loads(again.stdout)["tasks"]["backup"]["snapshot"]
        assert bh.rsync_diff(scope, os.path.join(target.mnt, "snapshots", name)) == [], seed
