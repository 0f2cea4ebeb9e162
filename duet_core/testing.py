"""duet's pytest plugin for task authors: a scratch filesystem and a way to run installed tasks over it.

It is registered through the ``pytest11`` entry point of the ``duet`` distribution, so any test suite in an
environment where duet is installed can use its fixtures without importing anything::

    def test_my_task(duet_fs, duet_cli):
        duet_fs.write("docs/a.txt", b"hello")
        duet_fs.evict()                          # cold cache, as after a reboot
        result = duet_cli.run("mytask", duet_fs.root)
        assert result.exit_code == 0
        assert result.task("mytask")["items_done"] == 1

``duet_fs`` is a fresh filesystem on a loop device (btrfs by default; ext4 or xfs with
``@pytest.mark.duet_fs("ext4")``), unmounted and detached after the test even when it fails; it needs root, and
the test is skipped without it (fails instead with ``DUET_REQUIRE_ROOT=1``, for a CI that must run it).
``duet_cli`` runs ``duet run`` / ``duet watch`` / ``duet status`` as a separate process with a private state
directory and an empty config, and returns its exit code, stderr and parsed ``--json`` summary: the task is found
through its entry point, exactly as it will be in production, so the test also proves the plugin is installed
correctly.

Nothing here is used at import time by the plugin loader: importing this module (pytest does it at start-up)
costs one import of :mod:`duet_core.loopfs`.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from duet_core import loopfs, residency

FS_TYPES = ("btrfs", "ext4", "xfs")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "duet_fs(fstype, size_mb=256): the filesystem the duet_fs fixture makes")


# -- the scratch filesystem ----------------------------------------------------------------------------------------
class ScratchFs:
    """A mounted loop filesystem for one test, with a data directory ``root`` to use as a duet scope."""

    def __init__(self, fs: loopfs.LoopFs):
        self.fstype = fs.fstype
        self.mnt = fs.mnt
        self.device = fs.loopdev
        self.root = os.path.join(fs.mnt, "data")
        os.makedirs(self.root, exist_ok=True)

    def path(self, relpath: str) -> str:
        return os.path.join(self.root, relpath)

    def write(self, relpath: str, data: bytes) -> str:
        """Write a file under ``root`` (directories made as needed), fsync it; returns its absolute path."""
        path = self.path(relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return path

    def read(self, relpath: str) -> bytes:
        """Read a whole file (bringing it into the page cache, as an application would)."""
        with open(self.path(relpath), "rb") as fh:
            return fh.read()

    def evict(self, relpath: str | None = None) -> None:
        """Write back and drop from the page cache one file, or every file under ``root``.

        Per file (``POSIX_FADV_DONTNEED``): never the global ``drop_caches``, which would disturb everything else
        running on the machine.
        """
        if relpath is None:
            evict_tree(self.root)
        else:
            evict_file(self.path(relpath))

    def resident_pages(self, relpath: str) -> int:
        """How many pages of a file are in the page cache now."""
        return resident_pages(self.path(relpath))


def evict_tree(root: str) -> None:
    """Write back and drop from the page cache every regular file under ``root``, file by file (never the global
    cache; symlinks are neither followed nor evicted)."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                regular = stat.S_ISREG(os.lstat(path).st_mode)
            except FileNotFoundError:   # gone since it was listed
                continue
            if regular:
                evict_file(path)


def evict_file(path: str) -> None:
    """Write back and drop from the page cache the file at ``path`` (never followed if a symlink).

    One ``fadvise(DONTNEED)`` can leave a few pages (still in a per-CPU LRU batch, or locked for a moment on a busy
    machine): it is tried again, briefly, until none is left."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        for _ in range(50):
            residency.evict(fd)
            if residency.resident_count(fd) == 0:
                return
            time.sleep(0.02)
    finally:
        os.close(fd)


def cached_pages(path: str) -> set[int]:
    """The pages of the file at ``path`` in the page cache now, as the kernel says (cachestat/mincore)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return set(residency.resident_pages(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def resident_pages(path: str) -> int:
    """How many pages of the file at ``path`` are in the page cache now."""
    return len(cached_pages(path))


@pytest.fixture
def duet_fs(request: pytest.FixtureRequest) -> Iterator[ScratchFs]:
    """A fresh, empty filesystem on a loop device for this test (``@pytest.mark.duet_fs("ext4")`` to choose)."""
    if os.geteuid() != 0:
        why = "duet_fs needs root: it makes a loop device and mounts a filesystem"
        if os.environ.get("DUET_REQUIRE_ROOT") == "1":    # CI that must run these tests: fail, never skip
            pytest.fail(why + " (DUET_REQUIRE_ROOT=1)")
        pytest.skip(why)
    marker = request.node.get_closest_marker("duet_fs")
    fstype = marker.args[0] if marker and marker.args else "btrfs"
    size_mb = int(marker.kwargs.get("size_mb", 256)) if marker else 256
    if fstype not in FS_TYPES:
        raise pytest.UsageError(f"duet_fs: unknown filesystem {fstype!r} (choose from {', '.join(FS_TYPES)})")
    with loopfs.loop_fs(fstype, size_mb=size_mb, prefix="duet-plugintest-") as fs:
        yield ScratchFs(fs)


# -- running duet --------------------------------------------------------------------------------------------------
@dataclass
class DuetResult:
    """What one ``duet`` command did: exit code, stdout, stderr, and the JSON it printed (``--json``)."""

    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        """The last JSON object printed on stdout (``duet run --json`` prints one per scope)."""
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise AssertionError(f"no JSON on stdout of {' '.join(self.argv)}:\n{self.stdout}\n{self.stderr}")
        return json.loads(lines[-1])

    def task(self, name: str) -> dict[str, Any]:
        """One task's entry in the run summary: items_total/done/failed, bytes_*, counters, errors, and what its
        ``duet_finish`` returned."""
        return self.json["tasks"][name]

    def __str__(self) -> str:
        return f"$ {' '.join(self.argv)}\nexit {self.exit_code}\n{self.stdout}{self.stderr}"


class DuetCli:
    """Runs duet commands as this test's user would, with private state and no system config.

    Every command gets ``--state-dir`` (``state_dir``) and ``--config`` (``config``, empty unless the test writes
    one), so a test never reads ``/etc/duet/duet.toml`` nor touches ``/var/lib/duet``.
    """

    def __init__(self, tmp: str):
        self.state_dir = os.path.join(tmp, "state")
        self.config = os.path.join(tmp, "duet.toml")
        with open(self.config, "w"):
            pass
        self.env = dict(os.environ)

    def argv(self, *args: str) -> list[str]:
        args_l = list(args)
        if args_l and args_l[0] in ("run", "watch", "status"):
            if "--config" not in args_l:
                args_l += ["--config", self.config]
            if "--state-dir" not in args_l:
                args_l += ["--state-dir", self.state_dir]
        return [sys.executable, "-m", "duet_core.cli.main", *args_l]

    def __call__(self, *args: str, timeout: float = 120) -> DuetResult:
        """Any duet command, e.g. ``duet_cli("plugins", "--json")``."""
        argv = self.argv(*args)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env)
        return DuetResult(argv, proc.returncode, proc.stdout, proc.stderr)

    def run(self, tasks: str | list[str], path: str, *args: str, timeout: float = 120, **options: Any) -> DuetResult:
        """``duet run TASKS --path PATH --json ARGS``; keyword ``options`` become ``--KEY VALUE`` task options."""
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        extra = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        return self("run", *names, "--path", path, "--json", *args, *extra, timeout=timeout)

    def plugins(self) -> dict[str, dict[str, Any]]:
        """The installed tasks by name, as ``duet plugins --json`` lists them."""
        result = self("plugins", "--json")
        assert result.exit_code == 0, str(result)
        return {t["name"]: t for t in result.json["tasks"]}


@pytest.fixture
def duet_cli(tmp_path) -> DuetCli:
    """Runs ``duet`` commands in a separate process with private state (see :class:`DuetCli`)."""
    return DuetCli(str(tmp_path))
