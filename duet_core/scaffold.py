"""``duet plugins new``: a new task plugin package that installs, lists and passes its own test from the start.

The generated project is the smallest complete plugin: a ``pyproject.toml`` publishing the task under the
entry-point group ``duet.tasks``, a task module (hash every file with BLAKE3, reusing a hash another task already
computed for the same file version, as the built-in tasks do), and a test that runs the installed task over a real
loop filesystem with the fixtures of :mod:`duet_core.testing`. The test suite checks that all of it works, so the
template cannot rot.
"""

from __future__ import annotations

import os
import re

from duet_core import __version__
from duet_core.errors import DuetError
from duet_core.hookspecs import API_VERSION

NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,39}")

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "duet task: {name}"
requires-python = ">=3.11"
dependencies = ["duet>={duet_version}", "blake3"]

[project.optional-dependencies]
test = ["pytest"]

# This is what makes the task exist for duet: `duet plugins` lists every entry point of this group.
[project.entry-points."duet.tasks"]
{name} = "{module}:plugin"

[tool.setuptools]
packages = ["{module}"]
'''

MODULE = '''\
"""duet task {name!r}: hash every file of the scope with BLAKE3, files already in the page cache first.

Replace the body of duet_process with your task's work; the hook contract is in duet_core/hookspecs.py and the guide
in duet's docs/plugins.md.
"""

import os

import blake3

from duet_core import ItemResult, TaskSpec, hookimpl

CHUNK = 1 << 20


class Task:
    @hookimpl
    def duet_task(self):
        # Built for duet plugin API {api}: a duet with another API refuses this plugin with one clear line.
        return TaskSpec("{name}", "hash every file with BLAKE3, cached files first", api_version={api})

    @hookimpl
    def duet_process(self, ctx):
        digest = ctx.shared.get(ctx.file, "blake3")   # another task may have hashed this very version already
        if digest is None:
            hasher, offset = blake3.blake3(), 0
            while chunk := os.pread(ctx.fd, CHUNK, offset):
                ctx.checkpoint()        # keeps --rate-limit; on SIGTERM it raises and the file is redone next run
                hasher.update(chunk)
                offset += len(chunk)
            digest = hasher.hexdigest()
            ctx.shared.put(ctx.file, "blake3", digest)
        ctx.state.put(ctx.file.relpath, digest)          # the task's own store, committed with duet's progress
        return ItemResult(counters={{"hashed_bytes": ctx.file.size}})

    @hookimpl
    def duet_finish(self, run, report):
        return {{"complete": report.complete}}


plugin = Task()
'''

TEST = '''\
"""The {name!r} task, installed, run by duet over a real filesystem (fixtures from duet_core.testing)."""

import os


def test_{ident}_processes_every_file(duet_fs, duet_cli):
    sizes = {{"a.bin": 5000, "sub/b.bin": 70000, "sub/c.bin": 0}}
    for relpath, size in sizes.items():
        duet_fs.write(relpath, os.urandom(size))
    duet_fs.evict()

    assert "{name}" in duet_cli.plugins()
    result = duet_cli.run("{name}", duet_fs.root)

    assert result.exit_code == 0, result
    report = result.task("{name}")
    assert report["items_done"] == report["items_total"] == len(sizes)
    assert report["counters"]["hashed_bytes"] == sum(sizes.values())
    assert report["complete"] is True
'''

README = '''\
# {dist}

A duet maintenance task: `{name}`.

```sh
pip install -e '.[test]'    # into the environment where duet is installed
duet plugins                # lists {name}
duet run {name} --path /srv
pytest                      # as root: the test makes a loop filesystem
```
'''


def plugin_files(name: str) -> dict[str, str]:
    """The files of a new plugin project for task ``name``: relative path -> text."""
    if not NAME_RE.fullmatch(name):
        raise DuetError(f"bad plugin name {name!r}",
                        hint="use lower-case letters, digits, - and _, starting with a letter (at most 40)")
    ident = name.replace("-", "_")
    module = f"duet_{ident}"
    dist = f"duet-{name.replace('_', '-')}"
    fields = {"name": name, "ident": ident, "module": module, "dist": dist, "api": API_VERSION,
              "duet_version": __version__}
    return {
        "pyproject.toml": PYPROJECT.format(**fields),
        "README.md": README.format(**fields),
        f"{module}/__init__.py": MODULE.format(**fields),
        f"tests/test_{ident}.py": TEST.format(**fields),
    }


def create(name: str, directory: str) -> str:
    """Write a new plugin project ``directory/duet-NAME``; returns its path. Never overwrites anything."""
    files = plugin_files(name)
    project = os.path.join(os.path.abspath(directory), f"duet-{name.replace('_', '-')}")
    if os.path.lexists(project):
        raise DuetError(f"{project} already exists", hint="choose another name or --dir")
    if not os.path.isdir(os.path.abspath(directory)):
        raise DuetError(f"not a directory: {directory}")
    os.mkdir(project)
    for rel, text in files.items():
        path = os.path.join(project, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "x") as fh:
            fh.write(text)
    return project
