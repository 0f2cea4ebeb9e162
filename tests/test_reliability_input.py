"""Bad input and hostile scopes, through ``duet`` as a real process (issue #7; the table in docs/reliability.md).

Every row of :data:`CASES` is one test and one row of the table in docs/reliability.md (a test checks that they
agree): the process exits with the documented code, prints exactly one ``duet: error:`` line containing the
expected words and no traceback, and changes nothing — no task ran, the scope is byte for byte what it was, and no
state database was created. To cover a new plugin's options, add rows.

The hostile-scope tests build real trees on ext4 loop filesystems: names with newlines, terminal escapes, bytes
that are not UTF-8, 255-byte names, a path deeper than PATH_MAX, symlinks out of the scope and in loops, fifos,
sockets and device nodes. duet must process every regular file exactly once, open nothing else, print every name
on one line, and leave the tree as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import plugin_dist
import pytest
from prometheus_client.parser import text_string_to_metric_families
from reliability import RDuet, duet, sha256, tree_snapshot  # noqa: F401 - duet: shared fixtures
from test_run_cli import one_error, summary_of

pytestmark = pytest.mark.bpf

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "reliability.md")


@dataclass(frozen=True)
class Case:
    """One bad input: ``args`` with ``{tmp}``/``{scope}`` filled in, and an optional config file's text."""

    id: str
    args: tuple[str, ...]
    code: int
    needle: str
    config: str | bytes | None = None


RUN = ("run", "hexer", "--path", "{scope}")
CASES = [
    # paths
    Case("missing-path", ("run", "hexer", "--path", "{tmp}/missing"), 2, "not a directory: {tmp}/missing"),
    Case("file-as-path", ("run", "hexer", "--path", "{scope}/a"), 2, "not a directory"),
    Case("fifo-as-path", ("run", "hexer", "--path", "{tmp}/fifo"), 2, "not a directory"),
    Case("device-as-path", ("run", "hexer", "--path", "/dev/null"), 2, "not a directory: /dev/null"),
    Case("symlink-loop-as-path", ("run", "hexer", "--path", "{tmp}/loop1"), 2,
         "not a directory: {tmp}/loop1 (Too many levels of symbolic links)"),
    Case("256-byte-component-path", ("run", "hexer", "--path", "{tmp}/" + "x" * 256), 2,
         "xxx (File name too long)"),
    Case("path-over-4096-bytes", ("run", "hexer", "--path", "{tmp}" + "/a" * 2100), 2,
         "a/a (File name too long)"),
    Case("empty-path", ("run", "hexer", "--path", ""), 2, "--path is empty"),
    Case("control-chars-in-path", ("run", "hexer", "--path", "{tmp}/no\nsuch\x1b[31m"), 2, r"no\nsuch\x1b[31m"),
    Case("non-utf8-path", ("run", "hexer", "--path", "{tmp}/bad\udcff\udcfe"), 2, r"bad\xff\xfe"),
    # tasks
    Case("unknown-task", ("run", "nope", "--path", "{scope}"), 2, "unknown task 'nope'"),
    Case("misspelled-task", ("run", "hexr", "--path", "{scope}"), 2, "did you mean 'hexer'"),
    Case("broken-plugin", ("run", "broken", "--path", "{scope}"), 2, "installed but broken"),
    Case("task-named-twice", ("run", "hexer", "hexer", "--path", "{scope}"), 2, "named twice"),
    Case("no-task", ("run", "--path", "{scope}"), 2, "no task given"),
    Case("no-path-no-config-scope", ("run", "hexer"), 2, "no --path given and no scope in the config"),
    # option values and units
    Case("bad-duration", (*RUN, "--for", "soon"), 2, "bad duration 'soon'"),
    Case("negative-duration", (*RUN, "--for", "-5s"), 2, "must not be negative"),
    Case("nan-duration", (*RUN, "--for", "nan"), 2, "bad duration 'nan'"),
    Case("bad-rate", (*RUN, "--rate-limit", "fast"), 2, "bad rate 'fast'"),
    Case("bad-rate-unit", (*RUN, "--rate-limit", "10XB/s"), 2, "bad rate '10XB/s'"),
    Case("bad-size-option", ("run", "reader", "--path", "{scope}", "-o", "reader.chunk=12QB"), 2, "bad size"),
    Case("bad-bool-option", ("run", "reader", "--path", "{scope}", "-o", "reader.verbose=maybe"), 2,
         "not a boolean"),
    Case("bad-int-option", ("run", "reader", "--path", "{scope}", "-o", "reader.limit=1.5"), 2,
         "option 'limit': '1.5' is not a whole number"),
    Case("nan-float-option", ("run", "reader", "--path", "{scope}", "-o", "reader.ratio=nan"), 2,
         "option 'ratio': 'nan' is not a finite number"),
    Case("unknown-option", (*RUN, "--nosuch", "1"), 2, "no such option: --nosuch"),
    Case("option-without-value", (*RUN, "--sleep"), 2, "needs a value"),
    Case("malformed-o", (*RUN, "-o", "hexer.sleep"), 2, "bad -o"),
    Case("bad-source", (*RUN, "--source", "quantum"), 2, "unknown event source 'quantum'"),
    # the config file
    Case("config-missing", (*RUN, "--config", "{tmp}/none.toml"), 2, "does not exist"),
    Case("config-is-directory", (*RUN, "--config", "{tmp}"), 2, "is a directory"),
    Case("config-malformed-toml", ("run",), 2, "invalid TOML", config="[[scope]\npath = \n"),
    Case("config-not-utf8", ("run",), 2, "not UTF-8", config=b'state_dir = "/tmp/\xff"\n'),
    Case("config-wrong-type", ("run",), 2, "tasks",
         config='[[scope]]\npath = "{scope}"\ntasks = "hexer"\n'),
    Case("config-unknown-key", ("run",), 2, "unknown key",
         config='[[scope]]\npath = "{scope}"\ntasks = ["hexer"]\nbudgt = "1h"\n'),
    Case("config-relative-scope", ("run",), 2, "absolute path",
         config='[[scope]]\npath = "relative/dir"\ntasks = ["hexer"]\n'),
    Case("config-bad-unit", ("run",), 2, "2 fortnights",
         config='[defaults]\nbudget = "2 fortnights"\n[[scope]]\npath = "{scope}"\ntasks = ["hexer"]\n'),
    Case("config-wrong-typed-option", ("run",), 2, "option 'limit': 'lots' is not a whole number",
         config='[[scope]]\npath = "{scope}"\ntasks = ["reader"]\n[task.reader]\nlimit = "lots"\n'),
    Case("config-fraction-for-int-option", ("run",), 2, "option 'limit': 1.5 is not a whole number",
         config='[[scope]]\npath = "{scope}"\ntasks = ["reader"]\n[task.reader]\nlimit = 1.5\n'),
    Case("config-list-for-option", ("run",), 2, "option 'ratio': expected a single value, got list",
         config='[[scope]]\npath = "{scope}"\ntasks = ["reader"]\n[task.reader]\nratio = [1]\n'),
    Case("config-bool-for-size-option", ("run",), 2, "option 'chunk': bad size True",
         config='[[scope]]\npath = "{scope}"\ntasks = ["reader"]\n[task.reader]\nchunk = true\n'),
    Case("config-negative-duration-option", ("run",), 2, "option 'sleep': bad duration -1",
         config='[[scope]]\npath = "{scope}"\ntasks = ["reader"]\n[task.reader]\nsleep = -1\n'),
    # the plugins' options (checked by their duet_check hooks before anything is written)
    Case("backup-no-target", ("run", "backup", "--path", "{scope}"), 2, "task 'backup' needs option 'target'"),
    Case("backup-target-missing", ("run", "backup", "--path", "{scope}", "--target", "{tmp}/missing"), 2,
         "backup target {tmp}/missing is not an existing directory"),
    Case("backup-target-is-a-file", ("run", "backup", "--path", "{scope}", "--target", "{tmp}/file"), 2,
         "backup target {tmp}/file is not an existing directory"),
    Case("backup-target-is-a-symlink-loop", ("run", "backup", "--path", "{scope}", "--target", "{tmp}/loop1"), 2,
         "backup target {tmp}/loop1 is not an existing directory"),
    Case("backup-target-inside-the-scope", ("run", "backup", "--path", "{scope}", "--target", "{scope}/sub"), 2,
         "backup target {scope}/sub is inside the scope {scope}"),
    Case("backup-scope-inside-the-target", ("run", "backup", "--path", "{scope}", "--target", "{tmp}"), 2,
         "the scope {scope} is inside the backup target {tmp}"),
    Case("backup-relative-target", ("run", "backup", "--path", "{scope}", "--target", "rel/dir"), 2,
         "option 'target': 'rel/dir' is not an absolute path"),
    Case("watch-backup-target-missing", ("watch", "backup", "--path", "{scope}", "--target", "{tmp}/missing"), 2,
         "backup target {tmp}/missing is not an existing directory"),
    Case("snapshots-target-missing", ("snapshots", "--target", "{tmp}/missing"), 2,
         "backup target {tmp}/missing is not an existing directory"),
    Case("restore-no-snapshots", ("restore", "--target", "{tmp}/realstate", "a", "--to", "{tmp}/realstate"), 2,
         "no snapshots at {tmp}/realstate"),
    Case("gc-keep-negative", ("run", "gc", "--path", "{scope}", "--target", "{tmp}/realstate", "--keep-daily", "-2"),
         2, "--keep-daily -2: use a count ≥ 0, or -1 for all"),
    Case("gc-keep-not-a-number", ("run", "gc", "--path", "{scope}", "--target", "{tmp}/realstate", "--keep-weekly",
                                  "lots"), 2, "option 'keep_weekly': 'lots' is not a whole number"),
    Case("gc-keep-fraction", ("run", "gc", "--path", "{scope}", "--target", "{tmp}/realstate", "--keep-last", "1.5"),
         2, "option 'keep_last': '1.5' is not a whole number"),
    Case("gc-target-missing", ("run", "gc", "--path", "{scope}", "--target", "{tmp}/missing", "--keep-last", "3"), 2,
         "backup target {tmp}/missing is not an existing directory"),
    Case("gc-negative-min-size", ("run", "gc", "--path", "{scope}", "--min-size", "-1"), 2,
         "option 'min_size': bad size '-1': must not be negative"),
    Case("gc-prune-maybe", ("run", "gc", "--path", "{scope}", "--prune", "maybe"), 2,
         "option 'prune': 'maybe' is not a boolean"),
    Case("scrub-every-bad", ("run", "scrub", "--path", "{scope}", "--every", "soon"), 2,
         "option 'every': bad duration 'soon'"),
    Case("scrub-every-negative", ("run", "scrub", "--path", "{scope}", "--every", "-1d"), 2,
         "option 'every': bad duration '-1d': must not be negative"),
    Case("defrag-threshold-words", ("run", "defrag", "--path", "{scope}", "--threshold", "lots"), 2,
         "option 'threshold': 'lots' is not a finite number"),
    Case("defrag-threshold-below-one", ("run", "defrag", "--path", "{scope}", "--threshold", "0.5"), 2,
         "--threshold 0.5: use 1 or more"),
    Case("defrag-extent-size-zero", ("run", "defrag", "--path", "{scope}", "--extent-size", "0"), 2,
         "--extent-size 0: use a size"),
    Case("defrag-dry-run-maybe", ("run", "defrag", "--path", "{scope}", "--dry-run", "maybe"), 2,
         "option 'dry_run': 'maybe' is not a boolean"),
    # the state directory
    Case("state-dir-is-a-file", (*RUN, "--state-dir", "{scope}/a"), 2, "state directory"),
    Case("state-dir-is-a-symlink", (*RUN, "--state-dir", "{tmp}/statelink"), 2, "not a plain directory"),
    Case("state-reset-without-target", ("state", "reset", "--state-dir", "{tmp}/state"), 2, "say what to reset"),
    Case("state-reset-both-targets", ("state", "reset", "--all", "--path", "{scope}", "--state-dir", "{tmp}/state"),
         2, "say what to reset"),
    Case("state-reset-nothing-there", ("state", "reset", "--all", "--yes", "--state-dir", "{tmp}/nostate"), 2,
         "nothing to reset"),
]


def _fill(text: str, tmp: str, scope: str) -> str:
    return text.replace("{tmp}", tmp).replace("{scope}", scope)


def _prepare(case: Case, tmp_path) -> list[str]:
    """The scratch tree of one case (a scope, a fifo, a symlink loop, a state directory and a symlink to it, the
    config); returns the command line."""
    tmp = str(tmp_path)
    scope = tmp_path / "scope"
    scope.mkdir(parents=True)
    (scope / "a").write_bytes(b"data of a\n")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_bytes(b"a file, not a directory\n")
    os.symlink("loop2", tmp_path / "loop1")
    os.symlink("loop1", tmp_path / "loop2")
    (tmp_path / "realstate").mkdir(mode=0o700)
    os.symlink("realstate", tmp_path / "statelink")
    args = [_fill(a, tmp, str(scope)) for a in case.args]
    if case.config is not None:
        config = tmp_path / "duet.toml"
        if isinstance(case.config, bytes):
            config.write_bytes(case.config)
        else:
            config.write_text(_fill(case.config, tmp, str(scope)))
        args += ["--config", str(config)]
    return args


@pytest.fixture(scope="module")
def bad_input_outcomes(tmp_path_factory):
    """Every case run at once (four processes at a time: each is mostly interpreter start-up), each in its own
    scratch tree with its own state directory and task log: {case id: (process, tree before, tree after)}."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    base = tmp_path_factory.mktemp("bad-input")
    duet = RDuet(base)

    def one(case: Case):
        where = base / case.id
        args = _prepare(case, where)
        env = dict(duet.env, DUET_STATE_DIR=str(where / "state"), DUET_TEST_LOG=str(where / "log"))
        before = tree_snapshot(where)
        proc = duet(*args, timeout=120, env=env)
        return proc, before, tree_snapshot(where)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip((c.id for c in CASES), pool.map(one, CASES)))
    return base, results


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_a_documented_code_and_changes_nothing(bad_input_outcomes, case):
    base, results = bad_input_outcomes
    proc, before, after = results[case.id]
    where = base / case.id
    line = one_error(proc, case.code, _fill(case.needle, str(where), str(where / "scope")))
    assert "\x1b" not in proc.stderr and line.isprintable()
    assert proc.stdout == ""
    assert not (where / "log").exists(), "a task ran"
    assert after == before, "something changed"


def test_every_case_is_in_the_table_of_docs_reliability():
    with open(DOC) as fh:
        doc = fh.read()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", doc, re.M))
    ids = {c.id for c in CASES} | {name for name in HOSTILE}
    assert ids <= documented, sorted(ids - documented)
    for c in CASES:
        row = re.search(rf"^\| `{c.id}` \|.*\| (\d) \| (.*) \|$", doc, re.M)
        assert row and int(row.group(1)) == c.code, c.id
        assert _fill(c.needle, "T", "S") in row.group(2).replace("…", ""), (c.id, "the message in the table")
    assert len(CASES) >= 25


def test_a_relative_path_is_resolved_against_the_working_directory(duet, tmp_path):
    (tmp_path / "scope").mkdir()
    (tmp_path / "scope" / "a").write_bytes(b"relative\n")
    proc = subprocess.run(duet.argv("run", "hexer", "--path", "scope", "--json"), capture_output=True, text=True,
                          timeout=60, env=duet.env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert summary_of(proc)["scope"] == str(tmp_path / "scope")
    assert duet.hex_counts() == {b"a": 1}


CHECKER_MODULE = textwrap.dedent('''
    """duet test task whose duet_check logs the root it is given and refuses the option value "refuse"."""

    import os

    from duet_core import TaskOption, TaskSpec, hookimpl
    from duet_core.errors import DuetError


    class Checker:
        @hookimpl
        def duet_task(self):
            return TaskSpec("checker", "test task: checks its option before the run", options=(
                TaskOption("mode", "str", default="ok"),))

        @hookimpl
        def duet_check(self, root, options):
            with open(os.environ["DUET_TEST_LOG"], "a") as fh:
                fh.write(f"check {root} {options['mode']}\\n")
            if options["mode"] == "refuse":
                raise DuetError("checker refuses mode 'refuse'")

        @hookimpl
        def duet_process(self, ctx):
            with open(os.environ["DUET_TEST_LOG"], "a") as fh:
                fh.write(f"process {ctx.file.relpath}\\n")


    plugin = Checker()
''')


def test_duet_check_refuses_a_run_before_anything_is_written(duet, tmp_path):
    """The core calls each task's duet_check with the scope's real path and parsed options before the state
    database exists: a DuetError there is one line, exit 2, no state, no item processed."""
    plugin_dist.install(tmp_path / "plugins", plugin_dist.Dist("duet-test-checker", "0.1",
                                                              {"duet_test_checker": CHECKER_MODULE},
                                                              {"checker": "duet_test_checker:plugin"}))
    scope = tmp_path / "scope"
    scope.mkdir()
    (scope / "a").write_bytes(b"checked\n")
    os.symlink("scope", tmp_path / "via-link")
    one_error(duet("run", "checker", "--path", str(tmp_path / "via-link"), "--mode", "refuse"), 2,
              "checker refuses mode 'refuse'")
    assert not duet.state.exists()
    assert duet.log.read_text().splitlines() == [f"check {scope} refuse"]
    ok = duet("run", "checker", "--path", str(tmp_path / "via-link"), "--mode", "fine")
    assert ok.returncode == 0, ok.stderr
    assert duet.log.read_text().splitlines()[1:] == [f"check {scope} fine", "process a"]


# -- hostile scopes ----------------------------------------------------------------------------------------------------
NAME_MAX_NAME = "L" * 255
# The regular files of the hostile tree (path bytes -> content), and what else is in it (see make_hostile_tree).
HOSTILE = {
    "newline-in-name": b"nl\nname",
    "control-chars-in-name": b"ctl\x01\x1b[31mred",
    "non-utf8-name": b"bad\xff\xfe",
    "255-byte-name": NAME_MAX_NAME.encode(),
    "shell-metachars-in-name": b"$(touch PWNED); `touch PWNED2` | rm -rf x",
    "leading-dash-name": b"-rf",
    "path-of-4000-bytes": None,      # filled in by make_hostile_tree
}


def _mkdirs_at(root: str, parts: list[str]) -> int:
    """mkdir a chain of directories below ``root`` one level at a time (by fd: the full path may exceed
    PATH_MAX); returns an fd of the last one."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            os.mkdir(part, dir_fd=fd)
            new = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new
        return fd
    except BaseException:
        os.close(fd)
        raise


def _write_at(dir_fd: int, name: str | bytes, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def make_hostile_tree(scope: str) -> tuple[dict[bytes, bytes], bytes]:
    """The hostile tree under ``scope``; returns ({relpath bytes: content} of the regular files duet must process,
    the relpath of the one file too deep to open)."""
    os.makedirs(scope)
    files: dict[bytes, bytes] = {}
    for i, (key, name) in enumerate(HOSTILE.items()):
        if name is None:
            continue
        data = f"{key} {i}\n".encode() * (i + 1)
        with open(os.path.join(os.fsencode(scope), name), "wb") as fh:
            fh.write(data)
        files[name] = data
    # A file at a relative path of about 4000 bytes (under PATH_MAX: processed) ...
    parts = ["d" * 249] * 15
    fd = _mkdirs_at(scope, parts)
    _write_at(fd, "deep", b"deep file\n")
    os.close(fd)
    files[os.fsencode("/".join(parts) + "/deep")] = b"deep file\n"
    HOSTILE["path-of-4000-bytes"] = os.fsencode("/".join(parts) + "/deep")
    # ... and one deeper than PATH_MAX (4096): no path to it can be opened, so it is skipped and said so.
    fd = _mkdirs_at(scope, ["e" * 249] * 17)
    _write_at(fd, "too-deep", b"beyond PATH_MAX\n")
    os.close(fd)
    too_deep = os.fsencode("/".join(["e" * 249] * 17) + "/too-deep")
    # Things that are not regular files, and symlinks out of the scope and in loops.
    os.mkfifo(os.path.join(scope, "fifo"))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(scope, "sock"))
    sock.close()
    os.mknod(os.path.join(scope, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(os.path.join(scope, "blk"), 0o600 | stat.S_IFBLK, os.makedev(7, 250))
    os.symlink("/etc", os.path.join(scope, "etc"))
    os.symlink("/etc/passwd", os.path.join(scope, "passwd"))
    os.symlink("loop-b", os.path.join(scope, "loop-a"))
    os.symlink("loop-a", os.path.join(scope, "loop-b"))
    os.symlink("nowhere", os.path.join(scope, "dangling"))
    os.symlink("..", os.path.join(scope, "parent"))
    return files, too_deep


def test_hostile_names_and_special_files_are_processed_or_skipped_cleanly(duet, ext4_fs):
    scope = os.path.join(ext4_fs.mnt, "scope")
    files, too_deep = make_hostile_tree(scope)
    # One more hostile file that the task refuses: its name must come out escaped, on one line.
    fail_name = b"fail\nme\x1b[2J\xff"
    with open(os.path.join(os.fsencode(scope), fail_name), "wb") as fh:
        fh.write(b"FAIL this file\n")
    outside = os.path.join(ext4_fs.mnt, "outside")
    os.mkdir(outside)
    with open(os.path.join(outside, "secret"), "wb") as fh:
        fh.write(b"outside the scope\n")
    before = tree_snapshot(ext4_fs.mnt)
    argv = duet.argv("run", "hexer", "--path", scope, "--json")
    argv.insert(argv.index("run"), "-v")            # log each skipped entry
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=duet.env)  # a fifo opened hangs
    assert proc.returncode == 1, proc.stderr   # exit 1: one item failed (the refused file), nothing else
    assert "Traceback" not in proc.stderr
    summary = summary_of(proc)
    rep = summary["tasks"]["hexer"]
    assert (rep["items_done"], rep["items_failed"]) == (len(files), 1)
    assert summary["scan_skipped"] == 1       # the directory beyond PATH_MAX
    # Every regular file exactly once, with the bytes it holds; nothing else, nothing outside.
    log = duet.hex_log()
    assert {p: d for _, p, d in log} == {p: sha256(data) for p, data in files.items()}
    assert sorted(p for _, p, _ in log) == sorted(files)
    assert too_deep not in {p for _, p, _ in log}
    with open("/etc/passwd", "rb") as fh:
        assert sha256(fh.read()) not in {d for _, _, d in log}
    # Everything duet printed is one line per message, names escaped, no terminal escapes.
    assert "\x1b" not in proc.stderr
    for line in proc.stderr.splitlines():
        assert line.startswith("duet: "), line
    failed = [line for line in proc.stderr.splitlines() if "refusing a file marked to fail" in line]
    assert failed == ["duet: hexer: fail\\nme\\x1b[2J\\xff: RuntimeError: refusing a file marked to fail"]
    assert any("could not be read and were skipped" in line for line in proc.stderr.splitlines())
    assert any("skipped: File name too long" in line for line in proc.stderr.splitlines())
    assert os.fsdecode(fail_name) in rep["errors"][0]      # JSON keeps the exact name (escaped by JSON)
    # Nothing in the tree changed, and no shell ran the metacharacters.
    assert tree_snapshot(ext4_fs.mnt) == before
    assert not os.path.exists(os.path.join(scope, "PWNED")) and not os.path.exists("PWNED")
    # The state holds the names: status works, and a second run has nothing left but the refused file.
    status = duet("status", "--path", scope, "--json")
    assert status.returncode == 0, status.stderr
    again = duet("run", "hexer", "--path", scope, "--json", timeout=120)
    assert again.returncode == 1 and summary_of(again)["tasks"]["hexer"]["items_failed"] == 1
    assert sorted(p for _, p, _ in duet.hex_log()) == sorted(files)


# -- not root, BPF unavailable, tmpfs ----------------------------------------------------------------------------------
@pytest.fixture
def world_dir(require_root):
    """A directory the user ``nobody`` can use: the plugins, a scope and a state directory (not under tmp_path,
    which is 0700 root)."""
    d = tempfile.mkdtemp(prefix="duet-nobody-", dir="/var/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", d], check=False)


def as_nobody(duet: RDuet, world: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``duet ARGS`` run as nobody:nogroup with no supplementary groups (setpriv), from ``/``."""
    site = os.path.join(world, "site")
    if not os.path.exists(site):
        shutil.copytree(plugin_dist.site_dir(duet.env), site)
        subprocess.run(["chmod", "-R", "a+rX", site], check=True)
        for name, mode in (("empty.toml", 0o644), ("log", 0o666)):
            with open(os.path.join(world, name), "w"):
                pass
            os.chmod(os.path.join(world, name), mode)
    env = {k: v for k, v in duet.env.items() if k not in ("DUET_STATE_DIR", "DUET_TEST_LOG")}
    env.update(PYTHONPATH=site, DUET_TEST_LOG=os.path.join(world, "log"), HOME="/nonexistent", **(env_extra or {}))
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
            *duet.argv(*args, "--config", os.path.join(world, "empty.toml"))]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd="/")


@pytest.fixture
def checkout_traversable(require_root):
    """nobody must reach duet's code: a checkout under /root (0700), as in a fresh clone, is not. Grant search
    permission (x, not read) on the ancestors that lack it, for this test only, and take it back after."""
    changed = []
    path = os.path.dirname(os.path.realpath(sys.executable))
    for top in (path, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        d = top
        while d != "/":
            mode = os.stat(d).st_mode
            if not mode & stat.S_IXOTH and (d, mode) not in changed:
                changed.append((d, mode))
                os.chmod(d, stat.S_IMODE(mode) | stat.S_IXOTH)
            d = os.path.dirname(d)
    try:
        yield
    finally:
        for d, mode in reversed(changed):
            os.chmod(d, stat.S_IMODE(mode))


def test_bpf_that_cannot_be_built_as_root_is_exit_3_or_one_notice_and_polling(duet, tmp_path):
    """Root, but the BPF object cannot be built (here its directory is a file): --source bpf is one line and exit 3;
    the default source says so once and polls, and the run does its work."""
    scope = tmp_path / "scope"
    scope.mkdir()
    (scope / "a").write_bytes(b"polled\n")
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    env = {**duet.env, "DUET_BPF_DIR": str(blocker)}
    argv = duet.argv("run", "hexer", "--path", str(scope))
    proc = subprocess.run([*argv, "--source", "bpf"], capture_output=True, text=True, timeout=60, env=env)
    one_error(proc, 3, f"cannot build the BPF object in {blocker}: File exists")
    assert duet.hex_log() == []
    proc = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("polling page-cache residency instead") == 1, proc.stderr
    assert summary_of(proc)["source"] == "poll"
    assert duet.hex_counts() == {b"a": 1}


def test_a_part_of_the_scope_the_scan_cannot_read_makes_the_run_exit_1(duet, ext4_fs, tmp_path):
    """Nothing failed but a directory beyond PATH_MAX was left out: the run says so and exits 1 (as rsync's 23), and
    the metrics say how many entries, so a nightly run that silently missed part of the scope is seen."""
    scope = os.path.join(ext4_fs.mnt, "scope")
    os.makedirs(scope)
    with open(os.path.join(scope, "a"), "wb") as fh:
        fh.write(b"readable\n")
    fd = _mkdirs_at(scope, ["e" * 249] * 17)
    _write_at(fd, "too-deep", b"beyond PATH_MAX\n")
    os.close(fd)
    prom = tmp_path / "prom"
    prom.mkdir()
    proc = subprocess.run(duet.argv("run", "hexer", "--path", scope, "--json", "--metrics-dir", str(prom)),
                          capture_output=True, text=True, timeout=120, env=duet.env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = summary_of(proc)
    rep = summary["tasks"]["hexer"]
    assert summary["scan_skipped"] == 1
    assert (rep["items_done"], rep["items_failed"], rep["complete"]) == (1, 0, True)
    assert [p for _, p, _ in duet.hex_log()] == [b"a"]
    (line,) = [x for x in proc.stderr.splitlines() if "could not be read" in x]
    assert line.startswith("duet: 1 director(ies) or entries of the scope could not be read")
    (name,) = os.listdir(prom)
    text = (prom / name).read_text()
    assert "duet_run_scan_skipped{" in text and 'duet_run_exit_code{' in text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert (samples["duet_run_scan_skipped"], samples["duet_run_exit_code"]) == (1, 1)


def test_not_root(duet, world_dir, checkout_traversable):
    """As nobody: the default state directory is refused in one line; with a writable one, the run falls back to
    polling (one notice) and processes what nobody may read; --source bpf is exit 3; unreadable parts are skipped."""
    scope = os.path.join(world_dir, "scope")
    os.mkdir(scope)
    for name in ("a", "b"):
        with open(os.path.join(scope, name), "w") as fh:
            fh.write(f"file {name}\n")
    os.chmod(os.path.join(scope, "b"), 0o600)            # root's, unreadable for nobody
    os.mkdir(os.path.join(scope, "private"), 0o700)     # root's, unreadable for nobody
    with open(os.path.join(scope, "private", "c"), "w") as fh:
        fh.write("private\n")
    state = os.path.join(world_dir, "state")
    os.mkdir(state)
    os.chown(state, 65534, 65534)
    before = tree_snapshot(scope)

    one_error(as_nobody(duet, world_dir, "run", "hexer", "--path", scope), 2,
              "cannot use state directory /var/lib/duet: Permission denied")
    private = os.path.join(scope, "private")
    one_error(as_nobody(duet, world_dir, "run", "hexer", "--path", private, "--state-dir", state), 2,
              f"cannot read directory: {private} (permission denied)")
    one_error(as_nobody(duet, world_dir, "run", "hexer", "--path", scope, "--state-dir", state, "--source", "bpf"),
              3, "not running as root")
    proc = as_nobody(duet, world_dir, "run", "hexer", "--path", scope, "--state-dir", state, "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr             # b could not be opened: one failed item
    summary = json.loads(proc.stdout)
    assert summary["source"] == "poll" and summary["scan_skipped"] == 1   # the private directory
    assert "polling page-cache residency instead" in proc.stderr
    rep = summary["tasks"]["hexer"]
    assert (rep["items_done"], rep["items_total"], rep["items_failed"]) == (1, 2, 1)
    assert rep["errors"] == ["b: cannot open: Permission denied"]
    assert "duet: hexer: b: cannot open: Permission denied" in proc.stderr.splitlines()
    assert proc.stderr.count("polling page-cache residency instead") == 1
    with open(os.path.join(world_dir, "log")) as fh:
        assert fh.read().split(" ")[1] == b"a".hex()
    assert tree_snapshot(scope) == before
    st = os.stat(os.path.join(state, "state.db"))
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o600)


def test_tmpfs_scope_is_processed_as_all_cached(duet, tmp_path, require_root):
    """tmpfs has no page-cache events (shmem pages never pass the filemap hooks) and no device: every file is
    resident, so duet processes them all in one pass, all counted from the cache, and reads nothing from a device."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "duet-test-tmpfs", str(mnt)], check=True)
    try:
        files = {f"f{i}": os.urandom(64 << 10) for i in range(6)}
        for name, data in files.items():
            (mnt / name).write_bytes(data)
        proc = duet("run", "hexer", "--path", str(mnt), "--json")
        assert proc.returncode == 0, proc.stderr
        rep = summary_of(proc)["tasks"]["hexer"]
        assert rep["items_done"] == len(files)
        assert rep["bytes_from_cache"] == sum(map(len, files.values())) and rep["bytes_from_device"] == 0
        assert {p: d for _, p, d in duet.hex_log()} == {n.encode(): sha256(d) for n, d in files.items()}
        assert all((mnt / n).read_bytes() == d for n, d in files.items())
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_duet_events_prints_hostile_names_escaped(duet, ext4_fs):
    """``duet events`` (plain lines when not on a terminal) shows the files read meanwhile, names escaped."""
    scope = os.path.join(ext4_fs.mnt, "scope")
    os.mkdir(scope)
    names = {b"ev\nnl": "ev\\nnl", b"ev\x1b[31mred": "ev\\x1b[31mred", b"ev\xff": "ev\\xff"}
    for name in names:
        path = os.path.join(os.fsencode(scope), name)
        with open(path, "wb") as fh:
            fh.write(os.urandom(64 << 10))
        plugin_dist.evict(path)
    proc = duet.start("events", "--path", scope, "--duration", "4", "--mask", "added")
    time.sleep(1.5)      # the BPF programs are attached by then
    for name in names:
        with open(os.path.join(os.fsencode(scope), name), "rb") as fh:
            fh.read()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "\x1b" not in out
    shown = {line.split(": added")[0] for line in out.splitlines()}
    assert set(names.values()) <= shown, out
