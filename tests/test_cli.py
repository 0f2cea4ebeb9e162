"""The command line as a user meets it: real processes, exit codes, one-line errors, JSON that parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from plugin_dist import RECLAIM_SLACK

from duet_core.events import PAGE_SIZE
from duet_core.testing import evict_file


def duet(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "duet_core.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["events", "--path", "/nonexistent/dir"], "not a directory"),
    (["events", "--path", "/", "--mask", "bogus"], "unknown event 'bogus'"),
    (["events", "--path", "/", "--mask", "exists"], "choose events from"),
    (["events", "--path", "/", "--interval", "0"], "--interval must be"),
    (["events", "--path", "/", "--source", "carrier-pigeon"], "unknown event source"),
])
def test_bad_input_is_one_line_and_nonzero(args, needle):
    proc = duet(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("duet: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_unknown_option_is_a_usage_error():
    proc = duet("events", "--pth", "/")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["run", "--help"], ["-v", "--log-format", "json", "status", "--help"],
                                  ["--log-format=text", "bench", "--help"], ["restore", "--help"]])
def test_a_command_s_help_is_the_same_when_only_it_is_loaded(args):
    """`duet CMD` loads only CMD's module (start-up time); its help and options are those of the whole app."""
    from typer.testing import CliRunner

    from duet_core.cli.main import app, invoked_command

    proc = duet(*args)
    assert proc.returncode == 0, proc.stderr
    whole = CliRunner().invoke(app, args, prog_name="duet", terminal_width=80)
    cmd = next(a for a in args if not a.startswith("-") and a not in ("json", "text"))
    assert invoked_command(args) == (None if cmd == "restore" else cmd)   # a plugin's command needs them all
    if cmd != "restore":
        alone = proc.stdout.replace("python -m duet_core.cli.main", "duet")
        assert whole.exit_code == 0 and alone.split("Usage:")[1].split() == whole.output.split("Usage:")[1].split()


def test_version():
    proc = duet("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("duet ")


@pytest.mark.bpf
def test_doctor_json_says_bpf_works(bpf_required):
    proc = duet("doctor", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0
    assert report["bpf"] is True and report["source"] == "bpf"
    assert {c["name"] for c in report["checks"]} >= {"kernel", "btf", "tracepoints", "bpf"}


def events_json(root: str, during, *args: str) -> list[dict]:
    """``duet events --json`` over ``root`` for 5 s while ``during()`` runs (once it is watching): its lines."""
    proc = subprocess.Popen([sys.executable, "-m", "duet_core.cli.main", "events", "--path", root,
                             "--duration", "5", "--interval", "0.5", "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()     # "watching ...": attached and registered (however long start-up took)
        assert first.startswith("duet: watching "), first
        during()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, first + err
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.bpf
def test_events_json_reports_interval_deltas(bpf_required, btrfs_fs):
    """A file read during the run shows up with its pages added; counts are per interval, not running totals."""
    path = os.path.join(btrfs_fs.mnt, "sub", "f")
    os.mkdir(os.path.dirname(path))
    with open(path, "wb") as fh:
        fh.write(os.urandom(64 * PAGE_SIZE))
        os.fsync(fh.fileno())
    evict_file(path)    # every page: one DONTNEED can leave one, and then the reads add one fewer

    def reads():
        rfd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_RANDOM)   # no readahead: exactly the pages read
        os.pread(rfd, 32 * PAGE_SIZE, 0)
        os.close(rfd)
        time.sleep(1.2)
        with open(path, "rb") as fh:
            fh.read()

    lines = events_json(btrfs_fs.mnt, reads)
    mine = [rec for rec in lines if rec["path"] == path]
    assert len(mine) >= 2, lines          # two reads, in two different intervals
    for rec in mine:
        assert set(rec) >= {"path", "added", "removed", "dirtied", "flushed"}
    assert mine[0]["added"] == 32
    # Exact, net of removals: the pages added less those removed are the pages cached at the end — also when the
    # kernel reclaims some meanwhile on its own (DAMON pages out cold memory on these machines: seen as a last
    # interval with one page removed).
    resident = round(mine[-1]["resident_pct"] * 64 / 100)
    assert sum(rec["added"] - rec["removed"] for rec in mine) == resident, mine
    assert resident >= 64 - RECLAIM_SLACK, mine


@pytest.mark.bpf
def test_events_leaves_out_what_is_excluded(bpf_required, btrfs_fs):
    paths = {rel: os.path.join(btrfs_fs.mnt, rel) for rel in ("keep", "d/.cache/skip", "d/skip.tmp")}
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(os.urandom(8 * PAGE_SIZE))
        evict_file(p)

    def reads():
        for p in paths.values():
            with open(p, "rb") as fh:
                fh.read()

    seen = {rec["path"] for rec in events_json(btrfs_fs.mnt, reads, "--exclude", ".cache/", "-e", "*.tmp")}
    assert seen == {paths["keep"]}, seen
