"""Shared fixtures: real btrfs / ext4 filesystems on loop devices, a root check, and a leak check for the session."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # make tests/fsimage.py importable from every test module

import fsimage


@pytest.fixture
def require_root() -> None:
    """Skip the test unless it runs as root (loop devices, mounts, btrfs commands)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates loop devices and mounts filesystems")


@pytest.fixture
def btrfs_fs(require_root: None) -> Iterator[fsimage.LoopFs]:
    """A fresh, empty btrfs mounted on a loop device for this test only."""
    with fsimage.loop_fs("btrfs") as fs:
        yield fs


@pytest.fixture
def ext4_fs(require_root: None) -> Iterator[fsimage.LoopFs]:
    """A fresh, empty ext4 (4 KiB blocks) mounted on a loop device for this test only."""
    with fsimage.loop_fs("ext4") as fs:
        yield fs


@pytest.fixture(scope="session", autouse=True)
def no_leaked_filesystems() -> Iterator[None]:
    """After the session, unmount and detach anything the tests left behind, and fail loudly if there was any."""
    yield
    if os.geteuid() != 0:
        return
    leaked = fsimage.clean_leaks()
    if leaked:
        pytest.fail(f"tests leaked mounts / loop devices (now cleaned up): {', '.join(leaked)}")


@pytest.fixture(scope="session")
def bpf_available() -> str | None:
    """None if duet's BPF programs load and attach here, else why not."""
    from duet_core.errors import DuetError
    from duet_core.sources import BpfSource

    try:
        BpfSource(merge_entries=64).close()
    except DuetError as exc:
        return str(exc)
    return None


@pytest.fixture
def bpf_required(bpf_available: str | None, require_root: None) -> None:
    """Skip a kernel test where BPF cannot load — or fail it, under DUET_REQUIRE_BPF=1 (as CI runs)."""
    if bpf_available is not None:
        if os.environ.get("DUET_REQUIRE_BPF") == "1":
            pytest.fail(f"BPF is required (DUET_REQUIRE_BPF=1) but unavailable: {bpf_available}")
        pytest.skip(f"BPF unavailable: {bpf_available}")


@pytest.fixture
def tracefs(require_root: None):
    """The kernel's own tracing, to compare the engine with (tracefs is mounted if it is not)."""
    import subprocess

    from tracing import TRACEFS, TraceFs

    if not os.path.exists(os.path.join(TRACEFS, "instances")):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)
    return TraceFs()
