"""File-level operations of a backup: exact, atomic copies and metadata, all relative to directory fds.

Nothing here takes a user path through a shell or follows a symlink: directories are opened with
:func:`~duet_core.identity.open_beneath` below a root fd, entries are named by one component relative to an open
directory, and every new file or symlink is made under a temporary name and renamed over its final name only once it
is complete (data, holes, owner, mode, xattrs and POSIX ACLs, ns times) and fsynced.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

import blake3

from duet_core.filesystems import remove_tree_at
from duet_core.identity import open_beneath
from duet_core.scope import open_regular

CHUNK = 1 << 20
FICLONE = 0x40049409               # _IOW(0x94, 9, int): share all of another file's extents (ioctl_ficlone(2))
# FICLONE errors that mean "this filesystem cannot share extents between these files" (ext4: EOPNOTSUPP).
NO_CLONE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL)
TMP_PREFIX = ".duet-tmp."
_ZEROS = bytes(CHUNK)
_tmp_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def _carry_on() -> None:
    """The default checkpoint of a copy: nothing to wait for, never stopped."""


def tmp_name() -> str:
    """A short name for a file being built (unique in this process); the sync pass removes strays of killed runs."""
    return f"{TMP_PREFIX}{os.getpid()}.{next(_tmp_counter)}"


def syncfs(fd: int) -> None:
    """Write back everything of the filesystem holding ``fd`` (syncfs(2))."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sig(st: os.stat_result) -> tuple[int, int, int, int]:
    """The version of a file as backup compares it: (inode, size, mtime ns, ctime ns)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class Copied:
    """One file copied: the hash of its contents, the source version copied, and whether it kept changing."""

    blake3: str
    sig: tuple[int, int, int, int]
    changed: bool          # the source changed during every attempt: the copy may mix versions
    nbytes: int            # data bytes read (holes are not read)
    tmp: str | None = None  # durable=False: the temporary name the copy still has


# --------------------------------------------------------------------------------------------------- directories
def open_dir(root_fd: int, reldir: str, create: bool = False) -> int:
    """Open the directory ``reldir`` below ``root_fd`` (never through a symlink); with ``create``, make missing
    components (mode 0700 until the sync pass sets the source's metadata), replacing anything that is not a
    directory."""
    try:
        return open_beneath(root_fd, reldir or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if not create or exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise
    fd = os.dup(root_fd)
    try:
        for name in [p for p in reldir.split("/") if p]:
            try:
                nxt = open_beneath(fd, name, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                if exc.errno != errno.ENOENT:
                    remove_tree_at(fd, name)
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:   # made meanwhile by the thread committing copies
                    pass
                nxt = open_beneath(fd, name, os.O_RDONLY | os.O_DIRECTORY)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


# ------------------------------------------------------------------------------------------------------ metadata
def copy_xattrs(src: int, dst: int, fresh: bool = False) -> None:
    """Make the open file ``dst``'s extended attributes (POSIX ACLs included: ``system.posix_acl_*``) exactly those
    of ``src``. ``fresh``: ``dst`` was just created by us and has none yet."""
    want = {n: os.getxattr(src, n) for n in os.listxattr(src)}
    have = set() if fresh else set(os.listxattr(dst))
    for name in have - set(want):
        os.removexattr(dst, name)
    for name, value in want.items():
        os.setxattr(dst, name, value)


# ------------------------------------------------------------------------------------------------------- copying
def copy_file(src_fd: int, dst_dir: int, name: str, attempts: int = 3, durable: bool = True,
              checkpoint: Callable[[], None] = _carry_on) -> Copied:
    """Copy the open regular file ``src_fd`` to ``name`` in ``dst_dir``: exactly and atomically.

    Data is read with ``pread`` (``src_fd`` may be shared with other tasks: its offset is never used); holes are
    found with SEEK_DATA/SEEK_HOLE on a private re-open of the same file and left as holes. The copy is hashed
    (blake3 of the whole contents, holes as zeros) while it is written, gets the source's owner, mode, xattrs and
    ns times, is fsynced and renamed over ``name``. If the source changes while it is copied (size, mtime or ctime
    differ before and after), the copy is made again, up to ``attempts`` times; the last one is kept and flagged.

    With ``durable=False`` the copy is neither fsynced nor renamed: it is left under ``Copied.tmp`` for the caller,
    who makes a whole batch durable at once (one ``syncfs``) before renaming each into place — the same guarantee
    (no name ever points at data that is not on disk) at a fraction of the cost of one fsync per file.

    ``checkpoint`` is called before every chunk (``ctx.checkpoint``: the rate limit, a stop). Whatever it raises
    (:class:`~duet_core.errors.Stopped`) abandons the copy: the temporary file is removed, ``name`` is untouched.
    """
    for attempt in range(attempts):
        before = os.fstat(src_fd)
        tmp, digest, nbytes = _build_copy(src_fd, dst_dir, before, durable, checkpoint)
        changed = sig(os.fstat(src_fd))[1:] != sig(before)[1:]
        if not changed or attempt == attempts - 1:
            break   # still changing after the last attempt: keep it rather than nothing; it is flagged
        os.unlink(tmp, dir_fd=dst_dir)
    if not durable:
        return Copied(digest, sig(before), changed, nbytes, tmp)
    replace(dst_dir, tmp, name)
    return Copied(digest, sig(before), changed, nbytes)


def _build_copy(src_fd: int, dst_dir: int, st: os.stat_result, durable: bool,
                checkpoint: Callable[[], None]) -> tuple[str, str, int]:
    """Write a complete copy under a temporary name; returns (name, blake3 hex, data bytes read)."""
    tmp = tmp_name()
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_dir)
    try:
        digest, nbytes = _copy_data(src_fd, out, st, checkpoint)
        set_metadata(src_fd, out, st, fresh=True)
        if durable:
            os.fsync(out)
    except BaseException:
        os.close(out)
        os.unlink(tmp, dir_fd=dst_dir)
        raise
    os.close(out)
    return tmp, digest, nbytes


def set_metadata(src_fd: int, out: int, st: os.stat_result, fresh: bool = False) -> None:
    """Give the open file ``out`` the owner, mode, xattrs/ACLs and ns times of ``src_fd`` (whose ``fstat`` is
    ``st``). The owner first: a chown clears the set-id bits the mode then sets."""
    os.fchown(out, st.st_uid, st.st_gid)
    os.fchmod(out, stat.S_IMODE(st.st_mode))
    copy_xattrs(src_fd, out, fresh=fresh)
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))


def _open_copy(dir_fd: int, name: str, src: os.stat_result) -> tuple[int, os.stat_result] | None:
    """The regular file ``name`` of ``dir_fd`` opened for reading, and its ``fstat``, if it has ``src``'s size and
    mtime (a copy of that version, as far as metadata can tell); None otherwise. Opened as
    :func:`~duet_core.scope.open_regular` opens: nothing but a regular file is ever opened, not even a fifo."""
    try:
        fd = open_regular(dir_fd, name)
    except OSError:
        return None
    have = os.fstat(fd)
    if (have.st_size, have.st_mtime_ns) != (src.st_size, src.st_mtime_ns):
        os.close(fd)
        return None
    return fd, have


def _hashes_as(src_fd: int, before: os.stat_result, blake3_hex: str,
               checkpoint: Callable[[], None]) -> tuple[str, int] | None:
    """Read and hash the source: (digest, bytes read) when its contents hash to ``blake3_hex`` and it did not change
    while read, else None. A same-size rewrite whose mtime was set back looks just like a chmod, so a copy is never
    kept on metadata alone."""
    digest, nbytes = _copy_data(src_fd, None, before, checkpoint)
    if digest != blake3_hex or sig(os.fstat(src_fd)) != sig(before):
        return None
    return digest, nbytes


def refresh_metadata(src_fd: int, dst_dir: int, name: str, blake3_hex: str,
                     checkpoint: Callable[[], None] = _carry_on, durable: bool = False) -> Copied | None:
    """Bring the copy ``name`` in ``dst_dir`` up to date in place when only the source's metadata changed.

    A chmod, chown, xattr or ACL change moves a file's ctime and nothing else, and rsync then updates the copy's
    metadata without copying the data again. Here the source is read and hashed all the same (:func:`_hashes_as`),
    and only when its contents still hash to ``blake3_hex`` (the blake3 recorded for the copy) does ``name`` get the
    source's owner, mode, xattrs and times, keeping its data and its extents (on a btrfs target, shared with every
    earlier snapshot: a ``chmod -R`` costs no space). ``durable``: fsynced before returning (the caller records it
    at once); otherwise the caller makes a batch durable first, as for ``copy_file(durable=False)``.

    The caller says ``name`` is its own inode to change: never one a published snapshot shares (a hard-link
    snapshot's files are). A copy linked under other names in the tree (``st_nlink`` > 1) is left alone, as is one
    whose size or mtime is not the source's. Returns None whenever the update is not made — the contents differ,
    the source changed while it was read, the copy is not as expected — and the caller copies the file instead.
    """
    before = os.fstat(src_fd)
    opened = _open_copy(dst_dir, name, before)
    if opened is None:
        return None
    out, have = opened
    try:
        if have.st_nlink != 1 or (same := _hashes_as(src_fd, before, blake3_hex, checkpoint)) is None:
            return None
        set_metadata(src_fd, out, before)
        if durable:
            os.fsync(out)
    finally:
        os.close(out)
    return Copied(same[0], sig(before), False, same[1])


class CannotClone(Exception):
    """The target's filesystem cannot share extents between files (FICLONE refused): copy instead."""


def clone_metadata_change(src_fd: int, prev_dir: int, dst_dir: int, name: str, blake3_hex: str,
                          checkpoint: Callable[[], None] = _carry_on, durable: bool = False) -> Copied | None:
    """A hard-link snapshot's copy of a file whose metadata alone changed, made without writing its data.

    The previous snapshot's ``name`` in ``prev_dir`` holds the data (its blake3 is ``blake3_hex``) but cannot take
    the new metadata: it is that snapshot's inode. On a filesystem that shares extents between files (xfs with
    reflink, the default of mkfs.xfs; btrfs) the new copy is a clone of it (``FICLONE``: no data written, no space
    taken) under a temporary name in ``dst_dir``, given the source's owner, mode, xattrs and times — once the
    source, read and hashed, shows the same contents (:func:`_hashes_as`). Left under ``Copied.tmp``, as
    ``copy_file(durable=False)`` leaves a copy; ``durable``: fsynced and renamed over ``name``. None when the
    contents differ, the source changed meanwhile or the previous copy is not as recorded (the caller copies);
    :class:`CannotClone` when the filesystem cannot clone (ext4), found before anything is read.
    """
    before = os.fstat(src_fd)
    opened = _open_copy(prev_dir, name, before)
    if opened is None:
        return None
    prev = opened[0]
    tmp = tmp_name()
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=dst_dir)
        try:
            try:
                fcntl.ioctl(out, FICLONE, prev)
            except OSError as exc:
                if exc.errno in NO_CLONE:
                    raise CannotClone(exc.strerror) from None
                raise
            if (same := _hashes_as(src_fd, before, blake3_hex, checkpoint)) is None:
                return None
            set_metadata(src_fd, out, before, fresh=True)
            if durable:
                os.fsync(out)
        finally:
            os.close(out)
        if durable:
            replace(dst_dir, tmp, name)
        done, tmp = tmp, None
        return Copied(same[0], sig(before), False, same[1], None if durable else done)
    finally:
        os.close(prev)
        if tmp is not None:
            try:
                os.unlink(tmp, dir_fd=dst_dir)
            except FileNotFoundError:     # its open failed
                pass


def replace(dir_fd: int, tmp: str, name: str) -> None:
    """Rename ``tmp`` over ``name`` in one directory; a directory in the way is removed first."""
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except IsADirectoryError:
        remove_tree_at(dir_fd, name)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        remove_tree_at(dir_fd, name)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _copy_data(src_fd: int, out: int | None, st: os.stat_result,
               checkpoint: Callable[[], None]) -> tuple[str, int]:
    """Copy the file's bytes, data segments only; returns (blake3 hex of the contents, data bytes read). ``out``
    None: only read and hash them."""
    hasher = blake3.blake3(max_threads=1)
    size = st.st_size
    nbytes = 0
    pos = 0
    # A file with as many blocks as bytes has no hole: skip the SEEK_DATA/SEEK_HOLE walk (most files).
    segments = [(0, size)] if size and st.st_blocks * 512 >= size else data_segments(src_fd, size)
    for start, end in segments:
        _hash_zeros(hasher, start - pos)
        off = start
        while off < end:
            checkpoint()
            chunk = os.pread(src_fd, min(CHUNK, end - off), off)
            if not chunk:
                break
            hasher.update(chunk)
            if out is not None:
                _write_all(out, chunk, off)
            off += len(chunk)
        nbytes += off - start
        pos = off
    _hash_zeros(hasher, size - pos)
    # A hole at the end (or a file that shrank while read): give the copy its full size.
    if pos != size and out is not None:
        os.ftruncate(out, size)
    return hasher.hexdigest(), nbytes


def _write_all(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


def _hash_zeros(hasher, n: int) -> None:
    while n > 0:
        k = min(n, CHUNK)
        hasher.update(_ZEROS[:k] if k < CHUNK else _ZEROS)
        n -= k


def data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of ``fd`` that hold data, found with SEEK_DATA/SEEK_HOLE on a private open file
    description (``/proc/self/fd`` re-open), so the shared descriptor's offset is never moved."""
    if size == 0:
        return []
    priv = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = []
        pos = 0
        while pos < size:
            try:
                start = os.lseek(priv, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:   # only a hole from here to the end
                    break
                if exc.errno == errno.EINVAL:  # no SEEK_DATA support: all data
                    return [(0, size)]
                raise
            if start >= size:
                break
            end = min(os.lseek(priv, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
        return out
    finally:
        os.close(priv)
