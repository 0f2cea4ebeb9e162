"""Exit code 6: a task that reports damage in the data (``ItemResult.damaged``) makes ``duet run`` exit 6.

The task is installed as a real distribution (tests/plugin_dist.py) and ``duet run`` runs as a process over a real
ext4 loop filesystem; the task flags every file whose content starts with ``BAD``.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import plugin_dist

INSPECTOR = textwrap.dedent('''
    import os

    from duet_core import ItemResult, TaskSpec, hookimpl


    class Inspector:
        @hookimpl
        def duet_task(self):
            return TaskSpec("inspector", "flags files whose content starts with BAD")

        @hookimpl
        def duet_process(self, ctx):
            if os.pread(ctx.fd, 3, 0) == b"BAD":
                return ItemResult(damaged=True, message="damaged")
            return None


    plugin = Inspector()
''')


def run_inspector(tmp_path, root: str, *extra: str) -> subprocess.CompletedProcess:
    env = plugin_dist.install(tmp_path / "plugins",
                              plugin_dist.Dist("duet-test-inspector", "0.1", {"duet_test_inspector": INSPECTOR},
                                               {"inspector": "duet_test_inspector:plugin"}))
    env["DUET_STATE_DIR"] = str(tmp_path / "state")
    (tmp_path / "empty.toml").write_text("")
    argv = plugin_dist.duet_argv("run", "inspector", "--path", root, "--source", "poll",
                                 "--config", str(tmp_path / "empty.toml"), *extra)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


def test_damage_found_exits_6_and_is_counted(tmp_path, ext4_fs):
    for name, content in (("good1", b"fine"), ("bad", b"BAD data"), ("good2", b"also fine")):
        with open(f"{ext4_fs.mnt}/{name}", "wb") as fh:
            fh.write(content)
    proc = run_inspector(tmp_path, ext4_fs.mnt, "--json")
    assert proc.returncode == 6, proc.stderr
    report = json.loads(proc.stdout)["tasks"]["inspector"]
    assert (report["items_damaged"], report["items_done"], report["items_failed"]) == (1, 3, 0)
    assert "bad: damaged" in proc.stderr


def test_no_damage_exits_0(tmp_path, ext4_fs):
    with open(f"{ext4_fs.mnt}/good", "wb") as fh:
        fh.write(b"fine")
    proc = run_inspector(tmp_path, ext4_fs.mnt, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tasks"]["inspector"]["items_damaged"] == 0


def test_the_summary_says_damage_was_found(tmp_path, ext4_fs):
    with open(f"{ext4_fs.mnt}/bad", "wb") as fh:
        fh.write(b"BAD data")
    proc = run_inspector(tmp_path, ext4_fs.mnt)
    assert proc.returncode == 6, proc.stderr
    assert "inspector: damage found in 1 file(s)" in proc.stdout
