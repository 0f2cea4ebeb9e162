"""Replace a file so that readers and crashes only ever see the old content or the new, never part of either."""

from __future__ import annotations

import os


def write_atomically(path: str, data: str | bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path``: a temp file beside it (named ``.NAME.PID.tmp``, so globs like ``*.prom`` never
    match it), fsync, ``chmod mode``, rename over ``path``, fsync the directory. The temp file is removed on error."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, data.encode() if isinstance(data, str) else data)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
