"""Helpers for the reliability and security tests (tests/test_reliability_*.py).

They drive ``duet`` as a real process through :class:`test_run_cli.Duet` (the test plugins installed as
distributions), plus one more test plugin, ``hexer``, written for hostile file names: it logs each file it is handed
as ``<task> <hex of the path's bytes> <sha256 of what it read>``, one ``O_APPEND`` write per line, so names with
newlines, spaces or bytes that are not UTF-8 can be counted exactly, and a test can tell which bytes were read.
"""

from __future__ import annotations

import collections
import hashlib
import os
import stat
import textwrap

import fsimage
import plugin_dist
import pytest
from test_run_cli import Duet

HEXER_MODULE = textwrap.dedent('''
    """duet test task for hostile names: logs the path as hex and the sha256 of the bytes it read."""

    import hashlib
    import os
    import time

    from duet_core import TaskOption, TaskSpec, hookimpl


    class Hexer:
        def __init__(self, name, sleep=0.0):
            self.name = name
            self.sleep = sleep

        @hookimpl
        def duet_task(self):
            return TaskSpec(self.name, "test task: logs hex(path) and sha256(content) per file", options=(
                TaskOption("sleep", "duration", default=self.sleep, help="sleep this long after each file"),
                TaskOption("fail_on", "str", default="FAIL", help="raise on files whose content starts so"),
            ))

        @hookimpl
        def duet_process(self, ctx):
            h = hashlib.sha256()
            off = 0
            while off < ctx.file.size:
                data = os.pread(ctx.fd, 1 << 20, off)
                if not data:
                    break
                h.update(data)
                off += len(data)
            marker = ctx.options["fail_on"].encode()
            if marker and os.pread(ctx.fd, len(marker), 0) == marker:
                raise RuntimeError("refusing a file marked to fail")
            if ctx.options["sleep"]:
                time.sleep(ctx.options["sleep"])
            line = f"{self.name} {os.fsencode(ctx.file.relpath).hex()} {h.hexdigest()}\\n"
            fd = os.open(os.environ["DUET_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


    hexer = Hexer("hexer")
    slowhex = Hexer("slowhex", sleep=0.05)
''')


def hexer_dist() -> plugin_dist.Dist:
    return plugin_dist.Dist("duet-test-hexer", "0.1", {"duet_test_hexer": HEXER_MODULE},
                            {"hexer": "duet_test_hexer:hexer", "slowhex": "duet_test_hexer:slowhex"})


class RDuet(Duet):
    """:class:`Duet` with the ``hexer`` and ``slowhex`` tasks installed too."""

    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        plugin_dist.install(tmp_path / "plugins", hexer_dist())   # the same site directory, already on the path

    def hex_log(self) -> list[tuple[str, bytes, str]]:
        """(task, path bytes, sha256 hex) per line the hexer tasks logged."""
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            task, path, digest = line.split(" ")
            if task in ("hexer", "slowhex"):
                out.append((task, bytes.fromhex(path), digest))
        return out

    def hex_counts(self, task: str = "hexer") -> collections.Counter:
        """path bytes -> how often ``task`` processed it."""
        return collections.Counter(p for t, p, _ in self.hex_log() if t == task)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_snapshot(root: str | os.PathLike) -> dict[bytes, tuple]:
    """Everything under ``root`` as {relative path bytes: (kind, content sha256 / link target / mode)}, never
    opening anything but regular files and never following a symlink: to check that nothing was changed. Walks by
    directory fd, so paths longer than PATH_MAX are seen too."""
    root_b = os.fsencode(os.fspath(root))
    out: dict[bytes, tuple] = {}
    for dirpath, dirs, files, dir_fd in os.fwalk(root_b):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(dirpath, name), root_b)
            st = os.lstat(name, dir_fd=dir_fd)
            if stat.S_ISREG(st.st_mode):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as fh:
                    out[rel] = ("file", sha256(fh.read()), st.st_mode)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(name, dir_fd=dir_fd))
            else:
                out[rel] = (stat.S_IFMT(st.st_mode), st.st_mode)
    return out


duet = RDuet.fixture()


@pytest.fixture
def fs(require_root):
    """A fresh btrfs on a loop device."""
    with fsimage.loop_fs("btrfs") as f:
        yield f
