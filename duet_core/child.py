"""duet's own helper processes — the start-up snapshot's reader (:mod:`duet_core.snapshotter`) and the second
process of ``duet run --jobs 2`` (:mod:`duet_core.jobs`): started as ``python -P -m MODULE`` with this very
duet_core first on the path (never the current directory: duet runs as root, anywhere), ended with their parent."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def module_command(module: str, *args: str | bytes) -> tuple[list, dict[str, str]]:
    """The argv and environment that run ``python -m module args...`` on this duet_core."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return [sys.executable, "-P", "-m", module, *args], env


def die_with_parent(parent: int, signum: int) -> bool:
    """In the child: have the kernel send ``signum`` when the parent dies; False if it is already gone (the child
    should exit: nobody wants its work)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    return os.getppid() == parent


def kill_and_reap(proc: subprocess.Popen) -> None:
    """Kill the child if it still runs, and reap it (reading what is left of its pipes)."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
