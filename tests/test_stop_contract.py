"""The stop contract for task plugins: ``ctx.checkpoint()`` in a long item gives way to SIGTERM / SIGINT within a
second, the item counts neither done nor failed and the next run does it again; ``Stopped`` raised while the run is
not stopping fails the item (it does not stall the run); ``run.stopping()`` tells ``duet_finish``; ``--rate-limit``
holds inside an item and its wait wakes for a stop.

The plugin is a test distribution installed like any other (:mod:`plugin_dist`), run by ``duet run`` as a real
process over a btrfs loop filesystem.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time

import fsimage
import plugin_dist
import pytest

pytestmark = pytest.mark.bpf

STOP_EXIT = 5          # docs/cli.md: stopped early, progress saved
WITHIN_S = 1.0         # a stop must be honoured this fast, in every phase

CHUNKER_MODULE = textwrap.dedent('''
    """duet test task: reads a file in 64 KiB chunks with a checkpoint before each; logs start, done and finish."""

    import os
    import time

    from duet_core import Stopped, TaskOption, TaskSpec, hookimpl


    def log(line):
        fd = os.open(os.environ["DUET_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, (line + "\\n").encode())
        finally:
            os.close(fd)


    class Chunker:
        def __init__(self, name, rogue=False):
            self.name, self.rogue = name, rogue

        @hookimpl
        def duet_task(self):
            return TaskSpec(self.name, "test task: chunked reads with checkpoints", api_version=1, options=(
                TaskOption("pause", "float", default=0.0, help="sleep this long after each chunk"),))

        @hookimpl
        def duet_process(self, ctx):
            log(f"start {ctx.file.relpath}")
            if self.rogue:
                raise Stopped("not asked to")
            off = 0
            try:
                while chunk := os.pread(ctx.fd, 64 << 10, off):
                    ctx.checkpoint()
                    off += len(chunk)
                    time.sleep(ctx.options["pause"])
            except Stopped:
                log(f"abandoned {ctx.file.relpath} at {off}")
                raise
            log(f"done {ctx.file.relpath}")

        @hookimpl
        def duet_finish(self, run, report):
            log(f"finish stopping={run.stopping()}")


    chunker = Chunker("chunker")
    rogue = Chunker("rogue", rogue=True)
''')


class StopDuet(plugin_dist.CliRunner):
    config_for = ("run",)

    def __init__(self, tmp_path):
        self.log = tmp_path / "log"
        dist = plugin_dist.Dist("duet-test-chunker", "0.1", {"duet_test_chunker": CHUNKER_MODULE},
                                {"chunker": "duet_test_chunker:chunker", "rogue": "duet_test_chunker:rogue"})
        super().__init__(tmp_path, dist, log=str(self.log))

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


duet = StopDuet.fixture()


@pytest.fixture
def scope(require_root):
    """Three 2 MiB files (32 chunks each) on btrfs, not cached."""
    with fsimage.loop_fs("btrfs", direct_io=True) as fs:
        root = os.path.join(fs.mnt, "data")
        os.mkdir(root)
        for name in ("a", "b", "c"):
            path = os.path.join(root, name)
            with open(path, "wb") as fh:
                fh.write(os.urandom(2 << 20))
            fsimage.drop_file_cache(path)
        yield root


def stop(proc, signum: int) -> dict:
    """Send ``signum``; the process must exit 5 within WITHIN_S with one JSON summary and no traceback."""
    t0 = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - t0
    assert proc.returncode == STOP_EXIT, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert took < WITHIN_S, f"took {took:.2f} s to stop after {signal.Signals(signum).name}"
    summary = json.loads(out)
    assert summary["result"] == signal.Signals(signum).name, summary
    return summary


def wait_for_line(duet, proc, prefix: str, timeout: float = 30.0) -> str:
    end = time.monotonic() + timeout
    while True:
        found = [line for line in duet.lines() if line.startswith(prefix)]
        if found:
            return found[0]
        assert proc.poll() is None, ("duet exited", proc.communicate())
        assert time.monotonic() < end, f"no {prefix!r} line: {duet.lines()}"
        time.sleep(0.01)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_checkpoint_gives_the_item_up_within_a_second_and_the_next_run_does_it_again(duet, scope, signum):
    # 32 chunks of 0.1 s: an item lasts over 3 s, far longer than the stop may take.
    proc = duet.start("run", "chunker", "--path", scope, "--json", "--pause", "0.1")
    first = wait_for_line(duet, proc, "start ").split()[1]
    time.sleep(0.5)
    summary = stop(proc, signum)
    rep = summary["tasks"]["chunker"]
    assert (rep["items_done"], rep["items_failed"], rep["complete"], rep["bytes_processed"]) == (0, 0, False, 0), rep
    lines = duet.lines()
    abandoned = [line for line in lines if line.startswith("abandoned ")]
    assert len(abandoned) == 1 and abandoned[0].startswith(f"abandoned {first} at "), lines
    assert 0 < int(abandoned[0].split()[-1]) < 2 << 20, lines
    assert not any(line.startswith("done ") for line in lines), lines
    assert lines[-1] == "finish stopping=True", lines      # duet_finish is told
    # The next run does every file, the abandoned one included, each once.
    proc = duet("run", "chunker", "--path", scope, "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)["tasks"]["chunker"]
    assert (rep["items_done"], rep["complete"], rep["bytes_processed"]) == (3, True, 3 * (2 << 20)), rep
    done = [line.split()[1] for line in duet.lines() if line.startswith("done ")]
    assert sorted(done) == ["a", "b", "c"]
    assert duet.lines()[-1] == "finish stopping=False"


def test_the_rate_limit_holds_inside_an_item_and_its_wait_wakes_for_a_stop(duet, scope):
    # 6 MiB at 1 MB/s: about 6 s, of which the first file alone takes 2; without the limit the run takes well
    # under a second (the reads are the only work).
    proc = duet.start("run", "chunker", "--path", scope, "--json", "--rate-limit", "1MB/s")
    wait_for_line(duet, proc, "start ")
    time.sleep(1.0)
    assert not any(line.startswith("done ") for line in duet.lines()), "the first file was read at full speed"
    summary = stop(proc, signal.SIGTERM)              # lands in the rate limit's wait, inside the item
    assert summary["tasks"]["chunker"]["items_done"] == 0


def test_stopped_raised_when_no_stop_was_asked_fails_the_item_and_the_run_goes_on(duet, scope):
    proc = duet("run", "rogue", "--path", scope, "--json", timeout=60)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["result"] == "complete"
    rep = summary["tasks"]["rogue"]
    assert (rep["items_done"], rep["items_failed"]) == (0, 3), rep
    assert all("raised Stopped while the run was not stopping" in e for e in rep["errors"]), rep
    assert sorted(line.split()[1] for line in duet.lines() if line.startswith("start ")) == ["a", "b", "c"]
