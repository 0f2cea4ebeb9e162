"""Sub-commands published by installed packages (entry-point group ``duet.commands``), as a user meets them."""

from __future__ import annotations

import subprocess
import textwrap

import plugin_dist
from plugin_dist import Dist, duet_argv

COMMANDS = textwrap.dedent('''
    import typer

    group = typer.Typer(help="A command group from a plugin.")


    @group.command("hello")
    def hello(name: str = typer.Option("world", "--name")):
        """Greets."""
        print(f"hello {name}")


    def shout(word: str):
        """One command from a plain function."""
        print(word.upper())


    not_a_command = 42
''')


def run(env, *args):
    return subprocess.run(duet_argv(*args), capture_output=True, text=True, timeout=60, env=env)


def test_plugin_commands_are_added_and_broken_ones_reported_in_one_line(tmp_path):
    dist = Dist("duet-test-commands", "0.1", {"duet_test_commands": COMMANDS}, {}, extra_groups={
        "duet.commands": {"greet": "duet_test_commands:group", "shout": "duet_test_commands:shout",
                          "number": "duet_test_commands:not_a_command", "missing": "duet_test_nowhere:cmd",
                          "run": "duet_test_commands:shout"}})
    env = plugin_dist.install(tmp_path, dist)
    proc = run(env, "greet", "hello", "--name", "duet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello duet\n"
    proc = run(env, "shout", "quiet")
    assert (proc.returncode, proc.stdout) == (0, "QUIET\n")
    # Broken entries: one line each, named, and the rest of duet still works.
    lines = proc.stderr.splitlines()
    for name, why in (("number", "not a typer.Typer or a function"), ("missing", "No module named"),
                      ("run", "already exists")):
        mine = [line for line in lines if line.startswith(f"duet: command {name} ")]
        assert len(mine) == 1 and why in mine[0], proc.stderr
    assert "Traceback" not in proc.stderr
    helptext = run(env, "--help").stdout
    assert "greet" in helptext and "shout" in helptext and "number" not in helptext
    assert run(env, "run", "--help").stdout.count("Run maintenance tasks") == 1   # the built-in is untouched
