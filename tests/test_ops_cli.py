"""The command line as an administrator meets it: --help with examples everywhere, a reference page that names
every command and option, shell completion that completes commands and installed task names."""

from __future__ import annotations

import os
import subprocess
import sys

import plugin_dist
import pytest
import typer.main
from typer.testing import CliRunner

from duet_core.cli import reference
from duet_core.cli.main import app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(cmd=None, path=("duet",)):
    """(command path, click command) for duet and every group and command under it."""
    cmd = cmd or typer.main.get_command(app)
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from commands(sub, (*path, name))


ALL = [" ".join(path) for path, _ in commands()]


@pytest.mark.parametrize("command", ALL)
def test_every_command_has_help_with_examples(command):
    out = CliRunner().invoke(app, [*command.split()[1:], "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "Examples" in out.output, out.output


def test_the_reference_in_docs_cli_md_is_current():
    """docs/cli.md ends with the reference generated from the commands (duet_core.cli.reference)."""
    with open(os.path.join(REPO, "docs", "cli.md")) as fh:
        doc = fh.read()
    assert doc == reference.updated(doc, reference.render(app)), (
        f"docs/cli.md is stale: run `{reference.REGENERATE}`")
    for command in ALL:
        assert f"### `{command}`" in doc


def test_the_hook_reference_in_docs_plugins_md_is_current():
    with open(os.path.join(REPO, "docs", "plugins.md")) as fh:
        doc = fh.read()
    assert doc == reference.updated_hooks(doc), f"docs/plugins.md is stale: run `{reference.REGENERATE}`"
    assert "### `duet_process(ctx) -> ItemResult | None`" in doc
    assert "- `ctx`: the item:" in doc


def test_the_reference_documents_every_option_of_run():
    section = reference.render(app).split("### `duet run`")[1].split("### ")[0]
    cmd = typer.main.get_command(app).commands["run"]
    for param in cmd.params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert f"`{opt}`" in section


@pytest.fixture
def completion_env(tmp_path):
    env = plugin_dist.install(tmp_path, plugin_dist.tasks_dist({"reader": "ReaderTask('reader')",
                                                                "rewind": "ReaderTask('rewind')"}))
    return env


def test_completion_of_commands_and_installed_task_names(completion_env):
    script = os.path.join(os.path.dirname(sys.executable), "duet")   # the console script, as a shell runs it

    def offer(words):
        cword = len(words.split()) - (0 if words.endswith(" ") else 1)
        out = subprocess.run([script], capture_output=True, text=True, timeout=60,
                             env=dict(completion_env, _DUET_COMPLETE="complete_bash", COMP_WORDS=words,
                                      COMP_CWORD=str(cword)))
        return out.stdout.split()

    assert offer("duet plu") == ["plugins"]
    assert offer("duet plugins ") == ["new"]
    assert offer("duet install") == ["install-units"]
    assert offer("duet run re") == ["reader", "rewind"]
    assert offer("duet watch rew") == ["rewind"]
    show = subprocess.run([script, "--show-completion", "bash"], capture_output=True, text=True, timeout=60)
    assert "_duet_completion()" in show.stdout and "complete " in show.stdout
