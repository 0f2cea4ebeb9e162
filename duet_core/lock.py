"""One duet run per scope at a time: an exclusive ``flock`` on a file under ``state_dir/locks``.

The lock file is named after the resolved scope root (``sha256(realpath)[:16].lock``), so ``/home`` and a symlink
to it are the same scope. ``flock`` is non-blocking (a second run fails at once with :class:`ScopeBusy` instead of
queueing) and belongs to the open file, so the kernel drops it when the holder exits or is killed: there are no
stale locks to clean up. The holder writes its pid and the scope path into the file after locking, only to name
itself in the other run's error message.

The lock file is never unlinked: removing it while another run has it open would let two runs lock two different
files for the same scope. It is opened with ``O_NOFOLLOW`` beneath a ``locks`` directory opened the same way, and
must be a regular file with one link, so a planted symlink or hard link cannot redirect the pid write elsewhere.
The descriptor is ``O_CLOEXEC``, so programs the run executes do not inherit the lock (a ``fork`` without ``exec``
does share it, until both processes have closed it).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import time
from types import TracebackType

from duet_core.errors import DuetError

HOLDER_READS = 5  # reads of an empty lock file, 10 ms apart, before giving up on naming the holder's pid


class ScopeBusy(DuetError):
    """Another duet run holds the lock of this scope."""

    exit_code = 4


def lock_name(scope_root: str | os.PathLike[str]) -> str:
    """The lock file name of a scope: the first 16 hex digits of the sha256 of its resolved path."""
    root = os.path.realpath(scope_root)
    return hashlib.sha256(os.fsencode(root)).hexdigest()[:16] + ".lock"


class ScopeLock:
    """``with ScopeLock(state_dir, "/home"):`` holds the scope's lock, or raises :class:`ScopeBusy` at once.

    ``acquire()``/``release()`` do the same without ``with``. Directories are created 0700 and the file 0600.
    """

    def __init__(self, state_dir: str | os.PathLike[str], scope_root: str | os.PathLike[str]):
        self.state_dir = os.fspath(state_dir)
        self.root = os.path.realpath(scope_root)
        self.locks_dir = os.path.join(self.state_dir, "locks")
        self.path = os.path.join(self.locks_dir, lock_name(self.root))
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> ScopeLock:
        """Take the lock; :class:`ScopeBusy` if another run (or another ScopeLock in this process) holds it."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this ScopeLock")
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"another duet run (pid {holder})" if holder else "another duet run"
            raise ScopeBusy(f"{who} is working on {self.root}",
                            hint="wait for it to finish, or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{self.root}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise DuetError(f"cannot write lock file {self.path}: {exc.strerror}") from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (clearing the pid first, so the file names no one); does nothing if it is not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the pid left behind is only ever read by a run that failed to lock, i.e. while it is true
        os.close(fd)  # closing the last descriptor of the open file releases the flock

    def __enter__(self) -> ScopeLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ScopeLock({self.root!r}, {'held' if self.held else 'not held'}, {self.path!r})"

    # -- opening -------------------------------------------------------------------------------------------------------
    def _open(self) -> int:
        """Create (0700/0600) and open the lock file without following a symlink at ``locks`` or at the file."""
        try:
            _mkdir(self.state_dir, parents=True)
            _mkdir(self.locks_dir)
        except OSError as exc:
            raise DuetError(f"cannot create lock directory {self.locks_dir}: {exc.strerror}",
                            hint="check state_dir and that duet may write there") from None
        try:
            dir_fd = os.open(self.locks_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise DuetError(f"refusing lock directory {self.locks_dir}: it is a symbolic link or not a directory",
                                hint="remove it; duet creates it") from None
            raise DuetError(f"cannot open lock directory {self.locks_dir}: {exc.strerror}") from None
        name = os.path.basename(self.path)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600,
                         dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DuetError(f"refusing lock file {self.path}: it is a symbolic link",
                                hint="remove it; something may be tampering with the state directory") from None
            raise DuetError(f"cannot open lock file {self.path}: {exc.strerror}") from None
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
            raise DuetError(f"refusing lock file {self.path}: it is {what}",
                            hint="remove it; something may be tampering with the state directory")
        return fd


def _mkdir(path: str, parents: bool = False) -> None:
    """Create ``path`` with mode 0700 if it does not exist (its missing parents too, if ``parents``)."""
    if parents:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def _read_holder(fd: int) -> int | None:
    """The pid the lock holder wrote into the file, or None if it has not written one or it is garbage.

    The holder writes just after it locks, so an empty file is read again a few times, briefly.
    """
    for attempt in range(HOLDER_READS):
        try:
            first = os.pread(fd, 64, 0).split(b"\n", 1)[0]
        except OSError:
            return None
        if first:
            try:
                pid = int(first)
            except ValueError:
                return None
            return pid if pid > 0 else None
        if attempt + 1 < HOLDER_READS:
            time.sleep(0.01)
    return None
