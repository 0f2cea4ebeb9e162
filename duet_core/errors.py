"""The one exception family for expected failures.

Raise :class:`DuetError` (or a subclass) with a message that says what went wrong and, where it helps, a hint of
what to do. Only the CLI turns it into a line on stderr and an exit code; everything else lets it propagate.
"""

from __future__ import annotations

import errno
import os
import stat


class DuetError(Exception):
    """An expected failure: bad input, missing tool, unusable kernel feature."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg} ({self.hint})" if self.hint else msg


class Stopped(BaseException):
    """The run is stopping (SIGTERM, SIGINT; SIGHUP for ``duet watch``): the work in progress is abandoned.

    Raised by ``ctx.checkpoint()`` / ``run.checkpoint()`` in a task's long loops. The scheduler counts the item it
    interrupts as neither done nor failed — the next run does it again — and ends the run cleanly, progress saved
    (exit 5). It derives from BaseException, like KeyboardInterrupt, so an ``except Exception`` around the work in
    a task does not swallow it; ``finally`` blocks run as usual (remove a half-written temporary file there).
    """

    def __init__(self, reason: str = "stopped"):
        super().__init__(reason)
        self.reason = reason


class BpfUnavailable(DuetError):
    """The BPF event source cannot be used here (not root, no BTF, object missing, load refused)."""

    exit_code = 3


def require_directory(path: str) -> None:
    """Refuse ``path`` in one line unless it is a directory this process can list and enter, saying why when it is
    not just missing (a name too long, a symlink loop, a parent that may not be searched, no permission)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        why = "" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else f" ({exc.strerror})"
        raise DuetError(f"not a directory: {path}{why}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DuetError(f"not a directory: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DuetError(f"cannot read directory: {path} (permission denied)")


def printable(text: str) -> str:
    """``text`` safe to print on one line: control characters (a newline in a file name, terminal escapes) become
    backslash escapes, and bytes that are not UTF-8 (surrogate-escaped by Python) become ``\\xNN``."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)
