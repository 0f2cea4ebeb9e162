"""Scope locks across real processes: one holder per scope, the busy error names it, death releases it, and a
symlink or hard link planted at the lock path is refused."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from duet_core.errors import DuetError
from duet_core.lock import ScopeBusy, ScopeLock, lock_name

HOLD = textwrap.dedent("""\
    import sys, time
    from duet_core.lock import ScopeLock
    with ScopeLock(sys.argv[1], sys.argv[2]):
        print("locked", flush=True)
        time.sleep(60)
""")

TRY = textwrap.dedent("""\
    import sys
    from duet_core.lock import ScopeBusy, ScopeLock
    try:
        with ScopeLock(sys.argv[1], sys.argv[2]):
            print("locked")
    except ScopeBusy as exc:
        print(exc)
        sys.exit(exc.exit_code)
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of (state_dir, scope) until killed; yields the Popen."""
    procs: list[subprocess.Popen] = []

    def start(state_dir, scope) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(state_dir), str(scope)], stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline() == "locked\n"  # "" (EOF) if the child failed instead
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def try_in_child(state_dir, scope) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY, str(state_dir), str(scope)], capture_output=True, text=True,
                          timeout=30)


@pytest.fixture
def scope(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return path


def test_lock_file_layout(tmp_path, scope):
    state = tmp_path / "state" / "duet"
    lock = ScopeLock(state, scope)
    expected = hashlib.sha256(os.fsencode(os.path.realpath(scope))).hexdigest()[:16] + ".lock"
    assert lock_name(scope) == expected
    assert lock.path == str(state / "locks" / expected)
    with lock:
        assert lock.held
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(state / "locks").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(lock.path).st_mode) == 0o600
        with open(lock.path) as f:
            assert f.read() == f"{os.getpid()}\n{os.path.realpath(scope)}\n"
    assert not lock.held
    assert os.path.exists(lock.path)           # never unlinked (see duet_core/lock.py) ...
    assert os.path.getsize(lock.path) == 0     # ... but names no one once released


def test_busy_in_another_process_names_its_pid(tmp_path, scope, holder):
    proc = holder(tmp_path / "state", scope)
    with pytest.raises(ScopeBusy) as err:
        ScopeLock(tmp_path / "state", scope).acquire()
    assert f"another duet run (pid {proc.pid}) is working on {scope}" in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 4
    assert isinstance(err.value, DuetError)


def test_another_process_is_busy_while_we_hold(tmp_path, scope):
    with ScopeLock(tmp_path / "state", scope):
        result = try_in_child(tmp_path / "state", scope)
    assert result.returncode == 4, result.stderr
    assert result.stdout.startswith(f"another duet run (pid {os.getpid()}) is working on {scope}")
    assert try_in_child(tmp_path / "state", scope).stdout == "locked\n"   # and free again after the with


def test_same_scope_by_another_name_conflicts(tmp_path, scope, holder):
    os.symlink(scope, tmp_path / "alias")
    holder(tmp_path / "state", scope)
    for name in (tmp_path / "alias", f"{scope}/", f"{scope}/../home"):
        with pytest.raises(ScopeBusy, match=f"is working on {scope}"):
            ScopeLock(tmp_path / "state", name).acquire()


def test_different_scopes_do_not_conflict(tmp_path, scope, holder):
    other = tmp_path / "srv"
    other.mkdir()
    holder(tmp_path / "state", scope)
    with ScopeLock(tmp_path / "state", other) as lock:
        assert lock.held
        nested = scope / "sub"  # a directory inside a locked scope is a scope of its own
        nested.mkdir()
        with ScopeLock(tmp_path / "state", nested):
            pass
    assert try_in_child(tmp_path / "state", other).returncode == 0


def test_second_lock_in_same_process_is_busy(tmp_path, scope):
    with ScopeLock(tmp_path / "state", scope):
        with pytest.raises(ScopeBusy, match=f"pid {os.getpid()}"):
            ScopeLock(tmp_path / "state", scope).acquire()


def test_release_and_reacquire(tmp_path, scope):
    lock = ScopeLock(tmp_path / "state", scope)
    with pytest.raises(RuntimeError, match="boom"):
        with lock:
            raise RuntimeError("boom")
    assert not lock.held
    lock.acquire()
    with pytest.raises(RuntimeError, match="already held"):
        lock.acquire()
    lock.release()
    lock.release()  # harmless
    with ScopeLock(tmp_path / "state", scope):
        pass


def test_killed_holder_releases_the_lock(tmp_path, scope, holder):
    proc = holder(tmp_path / "state", scope)
    with pytest.raises(ScopeBusy):
        ScopeLock(tmp_path / "state", scope).acquire()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    with ScopeLock(tmp_path / "state", scope) as lock:  # the stale pid in the file does not matter
        with open(lock.path) as f:
            assert f.readline() == f"{os.getpid()}\n"


def test_holder_that_wrote_no_pid(tmp_path, scope):
    lock = ScopeLock(tmp_path / "state", scope)
    with lock:
        pass  # creates the file, now empty
    fd = os.open(lock.path, os.O_RDWR)  # like a holder that has not written its pid yet
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ScopeBusy) as err:
            lock.acquire()
        assert str(err.value).startswith(f"another duet run is working on {scope}")
    finally:
        os.close(fd)


def test_descriptor_is_not_inherited(tmp_path, scope):
    with ScopeLock(tmp_path / "state", scope) as lock:
        assert not os.get_inheritable(lock._fd)
        # a program the run executes does not keep the lock after the run lets go
        child = subprocess.Popen(["sleep", "30"], close_fds=False)
    try:
        assert try_in_child(tmp_path / "state", scope).stdout == "locked\n"
    finally:
        child.kill()
        child.wait()


def test_symlink_at_lock_path_is_refused(tmp_path, scope):
    lock = ScopeLock(tmp_path / "state", scope)
    os.makedirs(os.path.dirname(lock.path))
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, lock.path)
    with pytest.raises(DuetError) as err:
        lock.acquire()
    assert not isinstance(err.value, ScopeBusy)
    assert f"refusing lock file {lock.path}: it is a symbolic link" in str(err.value)
    assert victim.read_text() == "precious\n"
    assert not lock.held
    os.symlink(tmp_path / "missing", tmp_path / "dangling")  # a dangling one is not created through either
    os.replace(tmp_path / "dangling", lock.path)
    with pytest.raises(DuetError, match="symbolic link"):
        lock.acquire()
    assert not (tmp_path / "missing").exists()


def test_symlinked_locks_dir_is_refused(tmp_path, scope):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "state").mkdir()
    os.symlink(elsewhere, tmp_path / "state" / "locks")
    with pytest.raises(DuetError, match="refusing lock directory .*symbolic link"):
        ScopeLock(tmp_path / "state", scope).acquire()
    assert os.listdir(elsewhere) == []


def test_hard_link_at_lock_path_is_refused(tmp_path, scope):
    lock = ScopeLock(tmp_path / "state", scope)
    os.makedirs(os.path.dirname(lock.path))
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.link(victim, lock.path)
    with pytest.raises(DuetError, match="2 hard links"):
        lock.acquire()
    assert victim.read_text() == "precious\n"


def test_fifo_at_lock_path_is_refused_without_hanging(tmp_path, scope):
    lock = ScopeLock(tmp_path / "state", scope)
    os.makedirs(os.path.dirname(lock.path))
    os.mkfifo(lock.path)
    with pytest.raises(DuetError, match="not a regular file"):
        lock.acquire()


def test_state_dir_that_is_a_file(tmp_path, scope):
    (tmp_path / "state").write_text("")
    with pytest.raises(DuetError, match="cannot create lock directory"):
        ScopeLock(tmp_path / "state", scope).acquire()
