"""gc's snapshot retention: restic ``forget`` semantics, checked against an independent formulation, and real
pruning of backup targets on ext4 (plain trees) and btrfs (read-only snapshot subvolumes) through ``duet run``.

The targets are made here in the layout backup writes (``TARGET/snapshots/<UTC time>/``,
``TARGET/.duet/manifests/<time>.json``); nothing of the backup plugin is used.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import textwrap
from datetime import datetime, timedelta, timezone

import fsimage
import plugin_dist
import pytest
from duet_gc.retention import NAME_FORMAT, Policy, Snapshot, apply_policy, parse_name

from duet_core.errors import DuetError

UTC = timezone.utc


def name(t: datetime) -> str:
    return t.strftime(NAME_FORMAT)


def snaps(times) -> list[Snapshot]:
    return [Snapshot(name(t), t) for t in times]


def kept(times, **policy) -> set[str]:
    return set(apply_policy(snaps(times), Policy(**policy)).keep)


def every(start: datetime, step: timedelta, n: int) -> list[datetime]:
    return [start + i * step for i in range(n)]


# -- the policy, by hand ---------------------------------------------------------------------------------------------
T0 = datetime(2026, 11, 1, 0, 0, 0, tzinfo=UTC)
SIX_HOURLY = every(T0, timedelta(hours=6), 40)        # 2026-11-01T00 .. 2026-11-10T18, four a day


def test_keep_daily_keeps_the_newest_of_each_of_the_last_n_days():
    assert kept(SIX_HOURLY, daily=3) == {"2026-11-10T180000Z", "2026-11-09T180000Z", "2026-11-08T180000Z"}


def test_rules_are_a_union_and_keep_last_counts_snapshots():
    assert kept(SIX_HOURLY, last=2, daily=3) == {"2026-11-10T180000Z", "2026-11-10T120000Z",
                                                 "2026-11-09T180000Z", "2026-11-08T180000Z"}


def test_keep_hourly_keeps_one_per_hour_that_has_a_snapshot():
    times = [T0 + timedelta(minutes=m) for m in (0, 10, 50, 61, 130, 170)]   # hours 0, 0, 0, 1, 2, 2
    assert kept(times, hourly=2) == {"2026-11-01T025000Z", "2026-11-01T010100Z"}


def test_keep_weekly_uses_iso_weeks_and_monthly_crosses_the_year():
    # 2026-12-27 is a Sunday (ISO week 52), 2026-12-28 a Monday (week 53), 2027-01-04 a Monday (2027 week 1).
    times = [datetime(2026, 12, d, 12, tzinfo=UTC) for d in (21, 26, 27, 28, 31)] + \
            [datetime(2027, 1, d, 12, tzinfo=UTC) for d in (3, 4, 5)]
    assert kept(times, weekly=2) == {"2027-01-05T120000Z", "2027-01-03T120000Z"}
    assert kept(times, weekly=3) == {"2027-01-05T120000Z", "2027-01-03T120000Z", "2026-12-27T120000Z"}
    assert kept(times, monthly=2) == {"2027-01-05T120000Z", "2026-12-31T120000Z"}
    assert kept(times, yearly=5) == {"2027-01-05T120000Z", "2026-12-31T120000Z",
                                     "2026-12-21T120000Z"}   # + the oldest: yearly still had buckets to fill


def test_a_rule_with_buckets_left_also_keeps_the_oldest_snapshot_as_restic_does():
    times = every(T0, timedelta(hours=6), 8)   # two days
    assert kept(times, daily=5) == {"2026-11-02T180000Z", "2026-11-01T180000Z", "2026-11-01T000000Z"}


def test_minus_one_keeps_every_bucket_and_an_empty_policy_keeps_everything():
    assert kept(SIX_HOURLY, daily=-1) == {f"2026-11-{d:02d}T180000Z" for d in range(1, 11)} | {"2026-11-01T000000Z"}
    assert kept(SIX_HOURLY) == {name(t) for t in SIX_HOURLY}
    with pytest.raises(DuetError, match="keep-daily -2"):
        Policy(daily=-2)


def test_keep_within_keeps_every_snapshot_near_the_newest_as_restic_does():
    """restic's --keep-within: measured back from the newest snapshot (not from now), the bound included."""
    assert kept(SIX_HOURLY, within=36 * 3600) == {name(t) for t in SIX_HOURLY if t >= T0 + timedelta(days=8, hours=6)}
    assert kept(SIX_HOURLY, within=6 * 3600, daily=3) == {"2026-11-10T180000Z", "2026-11-10T120000Z",
                                                          "2026-11-09T180000Z", "2026-11-08T180000Z"}
    assert apply_policy(snaps(SIX_HOURLY), Policy(within=60)).keep == {"2026-11-10T180000Z": ["within"]}


def test_snapshot_names_are_strict():
    assert parse_name("2026-11-26T041500Z") == datetime(2026, 11, 26, 4, 15, tzinfo=UTC)
    for bad in ("2026-11-26T0415Z", "2026-13-26T041500Z", "2026-11-26 041500Z", "latest", ".2026-11-26T041500Z",
                "2026-11-26T041500Z.tmp"):
        assert parse_name(bad) is None, bad


def expected_by_grouping(times: list[datetime], policy: dict[str, int]) -> set[str]:
    """The policy said differently: per rule, group the snapshots into calendar buckets, take the newest of each of
    the N newest buckets (plus the oldest snapshot if there were fewer than N buckets); the union; the newest."""
    keys = {"last": lambda t: t, "hourly": lambda t: t.strftime("%Y%m%d%H"), "daily": lambda t: t.date(),
            "weekly": lambda t: t.isocalendar()[:2], "monthly": lambda t: (t.year, t.month), "yearly": lambda t: t.year}
    out = set()
    for rule, n in policy.items():
        if not n:
            continue
        buckets: dict[object, list[datetime]] = {}
        for t in times:
            buckets.setdefault(keys[rule](t), []).append(t)
        newest_first = sorted(buckets.values(), key=max, reverse=True)
        chosen = newest_first if n == -1 else newest_first[:n]
        out |= {name(max(b)) for b in chosen}
        if n == -1 or len(buckets) < n:
            out.add(name(min(times)))
    return out | {name(max(times))} if out else {name(t) for t in times}


@pytest.mark.parametrize("seed", range(40))
def test_the_policy_matches_an_independent_formulation_on_random_histories(seed):
    rnd = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=rnd.randrange(500_000))
    times, t = [], start
    for _ in range(rnd.randrange(1, 120)):
        t += timedelta(minutes=rnd.choice((7, 45, 90, 600, 1500, 3000, 10_000, 50_000)))
        times.append(t.replace(second=0))
    policy = {rule: rnd.choice((0, 0, 1, 2, 3, 7, -1)) for rule in ("last", "hourly", "daily", "weekly", "monthly",
                                                                       "yearly")}
    got = apply_policy(snaps(times), Policy(**policy))
    assert set(got.keep) == expected_by_grouping(times, policy), policy
    assert set(got.keep) | set(got.remove) == {name(t) for t in times} and not set(got.keep) & set(got.remove)
    assert name(max(times)) in got.keep


# -- real targets through duet run -------------------------------------------------------------------------------------
DAYS = every(datetime(2026, 11, 20, 4, 15, tzinfo=UTC), timedelta(hours=12), 12)   # 11-20T0415 .. 11-25T1615
KEEP_DAILY_2 = {"2026-11-25T161500Z", "2026-11-24T161500Z"}


class Duet(plugin_dist.CliRunner):
    """``duet`` as a subprocess with its own state directory and an empty config (test plugins optional)."""


def gc_report(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)["tasks"]["gc"]


def make_plain_target(root: str, times, outside: str) -> str:
    """A target on a plain filesystem: one small tree per snapshot, a manifest each, a symlink to ``outside``
    planted in every snapshot, and entries gc must leave alone."""
    target = os.path.join(root, "target")
    os.makedirs(os.path.join(target, ".duet", "manifests"), mode=0o700)
    for t in times:
        snap = os.path.join(target, "snapshots", name(t))
        os.makedirs(os.path.join(snap, "home", "docs"))
        with open(os.path.join(snap, "home", "docs", "note.txt"), "w") as fh:
            fh.write(f"snapshot {name(t)}\n")
        os.symlink(outside, os.path.join(snap, "home", "escape"))
        os.symlink(os.path.dirname(outside), os.path.join(snap, "home", "escape-dir"))
        with open(os.path.join(target, ".duet", "manifests", name(t) + ".json"), "w") as fh:
            json.dump({"snapshot": name(t)}, fh)
        os.makedirs(os.path.join(target, ".duet", "verified"), mode=0o700, exist_ok=True)
        with open(os.path.join(target, ".duet", "verified", name(t) + ".json"), "w") as fh:
            json.dump({"verified": "2026-11-26T00:00:00Z", "problems": 0}, fh)   # as duet verify records it
    os.mkdir(os.path.join(target, "snapshots", "2026-13-01T000000Z"))    # not a time: not a snapshot
    with open(os.path.join(target, "snapshots", "README"), "w") as fh:
        fh.write("not a snapshot\n")
    return target


def listing(target: str) -> set[str]:
    return set(os.listdir(os.path.join(target, "snapshots")))


def test_dry_run_lists_and_deletes_nothing_then_prune_keeps_exactly_the_policy_on_ext4(ext4_fs, tmp_path):
    outside_dir = os.path.join(ext4_fs.mnt, "precious")
    os.mkdir(outside_dir)
    outside = os.path.join(outside_dir, "keep-me")
    with open(outside, "w") as fh:
        fh.write("outside the target\n")
    target = make_plain_target(ext4_fs.mnt, DAYS, outside)
    scope = os.path.join(ext4_fs.mnt, "scope")
    os.mkdir(scope)
    before = listing(target)
    duet = Duet(tmp_path)

    dry = duet("run", "gc", "--path", scope, "--target", target, "--keep-daily", "2", "--json")
    rep = gc_report(dry)["retention"]
    assert set(rep["keep"]) == KEEP_DAILY_2
    assert set(rep["remove"]) == {name(t) for t in DAYS} - KEEP_DAILY_2
    assert rep["removed"] == [] and rep["prune"] is False
    assert set(rep["ignored"]) == {"2026-13-01T000000Z", "README"}
    assert listing(target) == before
    assert dry.stderr.count("would remove snapshot") == len(DAYS) - 2

    # restic's --keep-within, measured from the newest snapshot (11-25T1615), the bound included.
    within = gc_report(duet("run", "gc", "--path", scope, "--target", target, "--keep-within", "1d", "--json"))
    assert set(within["retention"]["keep"]) == {"2026-11-25T161500Z", "2026-11-25T041500Z", "2026-11-24T161500Z"}
    assert len(within["retention"]["remove"]) == len(DAYS) - 3 and listing(target) == before

    pruned = duet("run", "gc", "--path", scope, "--target", target, "--keep-daily", "2", "--prune", "--json")
    rep = gc_report(pruned)["retention"]
    assert sorted(rep["removed"]) == sorted({name(t) for t in DAYS} - KEEP_DAILY_2)
    assert listing(target) == KEEP_DAILY_2 | {"2026-13-01T000000Z", "README"}
    for records in ("manifests", "verified"):
        assert sorted(os.listdir(os.path.join(target, ".duet", records))) == sorted(f"{n}.json" for n in KEEP_DAILY_2)
    assert os.listdir(os.path.join(target, ".duet", "trash")) == []
    assert os.stat(os.path.join(target, ".duet", "trash")).st_mode & 0o777 == 0o700
    for n in KEEP_DAILY_2:   # what is kept is whole
        with open(os.path.join(target, "snapshots", n, "home", "docs", "note.txt")) as fh:
            assert fh.read() == f"snapshot {n}\n"
    # The symlinks inside removed snapshots were removed, never followed.
    with open(outside) as fh:
        assert fh.read() == "outside the target\n"
    assert os.listdir(outside_dir) == ["keep-me"]

    # Nothing left to do: the same policy again removes nothing.
    again = gc_report(duet("run", "gc", "--path", scope, "--target", target, "--keep-daily", "2", "--prune",
                           "--json"))["retention"]
    assert again["remove"] == [] and again["removed"] == []


def test_prune_finishes_a_removal_a_crash_interrupted(ext4_fs, tmp_path):
    outside = os.path.join(ext4_fs.mnt, "outside")
    with open(outside, "w") as fh:
        fh.write("x")
    target = make_plain_target(ext4_fs.mnt, DAYS[:3], outside)
    # The state a crash right after the rename into the trash leaves: the tree is in the trash, out of snapshots/.
    trash = os.path.join(target, ".duet", "trash")
    os.mkdir(trash, 0o700)
    os.rename(os.path.join(target, "snapshots", name(DAYS[0])), os.path.join(trash, name(DAYS[0])))
    scope = os.path.join(ext4_fs.mnt, "scope")
    os.mkdir(scope)
    duet = Duet(tmp_path)
    dry = gc_report(duet("run", "gc", "--path", scope, "--target", target, "--keep-last", "1", "--json"))
    assert name(DAYS[0]) not in dry["retention"]["keep"] and name(DAYS[0]) not in dry["retention"]["remove"]
    assert os.listdir(trash) == [name(DAYS[0])]            # a dry run does not touch the trash either
    rep = gc_report(duet("run", "gc", "--path", scope, "--target", target, "--keep-last", "1", "--prune",
                         "--json"))["retention"]
    assert rep["trash_emptied"] == 1 and rep["removed"] == [name(DAYS[1])]
    assert os.listdir(trash) == []
    assert listing(target) == {name(DAYS[2]), "2026-13-01T000000Z", "README"}
    with open(outside) as fh:
        assert fh.read() == "x"


def test_read_only_btrfs_snapshots_are_deleted_as_subvolumes(btrfs_fs, tmp_path):
    import btrfsutil

    target = os.path.join(btrfs_fs.mnt, "target")
    os.makedirs(os.path.join(target, ".duet"), mode=0o700)
    os.mkdir(os.path.join(target, "snapshots"))
    mirror = fsimage.btrfs_subvol(os.path.join(target, ".duet", "mirror"))
    for i, t in enumerate(DAYS):
        with open(os.path.join(mirror, "file"), "w") as fh:
            fh.write(f"version {i}\n")
        fsimage.btrfs_snapshot(mirror, os.path.join(target, "snapshots", name(t)), readonly=True)
    scope = os.path.join(btrfs_fs.mnt, "scope")
    os.mkdir(scope)
    duet = Duet(tmp_path)
    rep = gc_report(duet("run", "gc", "--path", scope, "--target", target, "--keep-daily", "2", "--prune",
                         "--json"))["retention"]
    assert sorted(rep["removed"]) == sorted({name(t) for t in DAYS} - KEEP_DAILY_2)
    assert listing(target) == KEEP_DAILY_2
    subvols = {os.path.basename(path) for path, _info in btrfsutil.SubvolumeIterator(btrfs_fs.mnt)}
    assert subvols == KEEP_DAILY_2 | {"mirror"}
    for i, t in enumerate(DAYS):
        if name(t) in KEEP_DAILY_2:
            path = os.path.join(target, "snapshots", name(t))
            assert btrfsutil.get_subvolume_read_only(path)
            with open(os.path.join(path, "file")) as fh:
                assert fh.read() == f"version {i}\n"
    assert not os.path.exists(os.path.join(target, ".duet", "trash")) or not os.listdir(
        os.path.join(target, ".duet", "trash"))


# A stand-in for the backup task: it takes --target too and publishes a snapshot (named for the current time) in
# its duet_finish, as backup does, so gc (listed after it) must see it and keep it as the newest.
PUBLISHER = textwrap.dedent('''
    import os
    from datetime import datetime, timezone

    from duet_core import TaskOption, TaskSpec, hookimpl


    class Publisher:
        @hookimpl
        def duet_task(self):
            return TaskSpec("publisher", "publishes an empty snapshot", options=(TaskOption("target", "path"),))

        @hookimpl
        def duet_process(self, ctx):
            return None

        @hookimpl
        def duet_finish(self, run, report):
            name = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
            snaps = os.path.join(run.options["target"], "snapshots")
            os.mkdir(os.path.join(snaps, "." + name))
            os.rename(os.path.join(snaps, "." + name), os.path.join(snaps, name))
            return {"published": name}


    plugin = Publisher()
''')


def test_with_a_backup_task_target_goes_to_both_and_the_new_snapshot_is_kept(ext4_fs, tmp_path):
    outside = os.path.join(ext4_fs.mnt, "outside")
    with open(outside, "w") as fh:
        fh.write("x")
    target = make_plain_target(ext4_fs.mnt, DAYS, outside)
    scope = os.path.join(ext4_fs.mnt, "scope")
    os.mkdir(scope)
    duet = Duet(tmp_path, plugin_dist.Dist("duet-test-publisher", "0.1", {"duet_test_publisher": PUBLISHER},
                                           {"publisher": "duet_test_publisher:plugin"}))
    proc = duet("run", "publisher", "gc", "--path", scope, "--target", target, "--keep-last", "1", "--prune",
                "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    published = summary["tasks"]["publisher"]["published"]
    rep = summary["tasks"]["gc"]["retention"]
    assert rep["keep"] == {published: ["last"]}
    assert listing(target) == {published, "2026-13-01T000000Z", "README"}


@pytest.mark.parametrize("args, code, needle", [
    (["--target", "/nonexistent-gc-target", "--keep-last", "1"], 2, "is not an existing directory"),
    (["--target", "relative/target"], 2, "not an absolute path"),
    (["--keep-daily", "many"], 2, "option 'keep_daily'"),
    (["--keep-within", "soon"], 2, "option 'keep_within'"),
])
def test_bad_retention_input_is_one_line(ext4_fs, tmp_path, args, code, needle):
    scope = os.path.join(ext4_fs.mnt, "scope")
    os.mkdir(scope)
    for name_ in ("a", "b"):
        with open(os.path.join(scope, name_), "wb") as fh:
            fh.write(b"same" * 4096)
    proc = Duet(tmp_path)("run", "gc", "--path", scope, *args, "--json")
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sum(needle in line for line in proc.stderr.splitlines()) == 1, proc.stderr


def test_kill_9_during_prune_leaves_whole_snapshots_and_the_next_prune_finishes(ext4_fs, tmp_path):
    import signal
    import time

    target = os.path.join(ext4_fs.mnt, "target")
    names = [name(t) for t in DAYS[:4]]
    per_snapshot = 3000
    for n in names:
        for i in range(per_snapshot):
            d = os.path.join(target, "snapshots", n, f"d{i % 30}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"f{i}"), "w") as fh:
                fh.write(n)
    scope = os.path.join(ext4_fs.mnt, "scope")
    os.mkdir(scope)
    trash = os.path.join(target, ".duet", "trash")
    duet = Duet(tmp_path)
    argv = plugin_dist.duet_argv("run", "gc", "--path", scope, "--target", target, "--keep-last", "1", "--prune",
                                 "--json", "--config", str(duet.config))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=duet.env)
    try:
        while proc.poll() is None and not (os.path.isdir(trash) and os.listdir(trash)):
            time.sleep(0.001)
        if proc.poll() is not None:
            pytest.skip("the prune finished before it could be interrupted")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=30)

    def files_in(path):
        return sum(len(fs) for _d, _s, fs in os.walk(path))

    # Whatever is still under snapshots/ is whole; what was being removed is out of it, in the trash.
    left = sorted(os.listdir(os.path.join(target, "snapshots")))
    assert names[-1] in left and len(left) < len(names)
    assert all(files_in(os.path.join(target, "snapshots", n)) == per_snapshot for n in left)
    assert os.listdir(trash) and not set(os.listdir(trash)) & set(left)
    rep = gc_report(duet("run", "gc", "--path", scope, "--target", target, "--keep-last", "1", "--prune",
                         "--json"))["retention"]
    assert rep["trash_emptied"] >= 1
    assert os.listdir(os.path.join(target, "snapshots")) == [names[-1]] and os.listdir(trash) == []
