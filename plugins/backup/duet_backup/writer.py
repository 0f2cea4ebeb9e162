"""The backup's writer process: the copies' hashing, writing and metadata, beside the run instead of inside it.

A backup run is CPU-bound in one Python thread: the scheduler around each file and the reads on one side, the
copy's blake3, writes, owner, mode, xattrs and times on the other (docs/benchmarks.md, "Where the time goes").
Threads cannot split that work (they share one interpreter lock, which changes hands at every system call: measured
slower), a second process can — rsync's split of sender and receiver. The run reads each file (``pread``, sharing
the device read with the other tasks, as before) and streams it over a socket pair to this process, which builds
the copy under its temporary name with the very code an in-process copy uses (:class:`~duet_backup.fsops.
FileBuilder`) and answers with the copy's digest. The run renames copies into place only after that answer, in
its durable batches (:class:`~duet_backup.task._Open`), so a name in the tree still always points at a complete
copy that is on disk.

The protocol, over a ``SOCK_STREAM`` socket pair: run -> writer, a header ``(op, seq, offset, length)`` and
``length`` bytes —

* ``OPEN``: a pickled ``(reldir, tmp)``: create ``tmp`` in the tree's ``reldir`` (made if missing);
* ``DATA``: bytes of the file at ``offset``;
* ``CLOSE``: a pickled :class:`~duet_backup.fsops.Meta`: finish the copy, answer ``(seq, 0, digest)``;
* ``ABORT``: remove the unfinished copy (the source changed while read, or the run stopped), no answer;

writer -> run, fixed records ``(seq, errno, digest)``: a copy finished, or failed (``errno`` != 0; its later
messages are ignored). The run's end of the socket closed (the run finished, or died) ends the writer: unfinished
copies are removed; stray temporary names of a killed run are the next sync pass's to remove, as always.
"""

from __future__ import annotations

import errno
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass

from duet_backup.fsops import DIR_CACHE, FileBuilder, Meta, open_dir

OPEN, DATA, CLOSE, ABORT = 1, 2, 3, 4
HEADER = struct.Struct("<BIQQI")     # op, seq, offset in the file, position in the ring, length
REPLY = struct.Struct("<Ii32s")      # seq, errno (0: done), blake3 digest
FREED = struct.Struct("<Q")          # after the ring: how far the writer has used it (a position, only grows)
RING = 16 << 20                      # data read, not yet written: 16 chunks, or hundreds of small files


class WriterGone(Exception):
    """The writer process ended before the run was done with it."""


@dataclass
class Reply:
    tmp: str | None        # the copy's temporary name (None: a copy abandoned since)
    errno: int             # 0: the copy is complete under ``tmp``
    blake3: str | None


# --------------------------------------------------------------------------------------------------- the run's side
class Writer:
    """The run's handle on its writer process (started on the first copy). Copies are streamed with
    :meth:`build`; their answers are collected, in order, by :meth:`replies` (never blocking) and :meth:`close`
    (waiting for all)."""

    def __init__(self, tree_fd: int):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        memfd = os.memfd_create("duet-backup-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, RING + FREED.size)
            self.ring = mmap.mmap(memfd, RING + FREED.size)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "duet_backup.writer", str(theirs.fileno()), str(tree_fd), str(memfd)],
                pass_fds=(theirs.fileno(), tree_fd, memfd), stdin=subprocess.DEVNULL,
                process_group=0)    # a Ctrl-C stops the run, which then ends the writer (not the other way round)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(memfd)
        ours.setblocking(False)
        self.sock = ours
        self.view = memoryview(self.ring)
        self._head = 0               # ring position of the next read (only grows; the ring is at head % RING)
        self._seq = 0
        self._out: list = []         # buffers not yet sent
        self._in = bytearray()       # answers not yet parsed
        self._answers: list[Reply] = []
        self._tmp: dict[int, str] = {}   # seq -> temporary name, until answered or abandoned
        self.gone = False

    def build(self, reldir: str, tmp: str) -> "_RemoteCopy":
        """A copy of a file, made by the writer as ``tmp`` in the tree's ``reldir`` (see FileBuilder)."""
        self._seq += 1
        self._tmp[self._seq] = tmp
        return _RemoteCopy(self, self._seq, reldir, tmp)

    def send(self, op: int, seq: int, payload: bytes = b"", flush: bool = False) -> None:
        self._out.append(HEADER.pack(op, seq, 0, 0, len(payload)))
        if payload:
            self._out.append(payload)
        if flush:
            self._flush()

    def read(self, seq: int, src_fd: int, off: int, n: int) -> int:
        """Read up to ``n`` bytes of ``src_fd`` at ``off`` into the ring, for copy ``seq``; returns how many."""
        at = self._head
        if at % RING + n > RING:
            at += RING - at % RING          # a chunk never wraps: what is left at the end is skipped
        while at + n - FREED.unpack_from(self.ring, RING)[0] > RING:
            self._wait()                    # the writer is behind: the ring is full
        pos = at % RING
        got = os.preadv(src_fd, [self.view[pos:pos + n]], off)
        if got:
            self._head = at + got
            self._out.append(HEADER.pack(DATA, seq, off, at, got))
            if got >= 65536:
                self._flush()
        return got

    def _wait(self) -> None:
        self._flush()       # the writer frees only what it was told of
        if self.gone:
            raise WriterGone(self._why())
        readable, _, _ = select.select([self.sock], [], [], 0.002)
        if readable:
            self._receive()
        elif self.proc.poll() is not None:
            self.gone = True

    def _flush(self) -> None:
        """Send what is queued; while the writer is behind, collect its answers (it may be waiting to send one)."""
        bufs = self._out
        while bufs:
            if self.gone:
                raise WriterGone(self._why())
            try:
                sent = self.sock.sendmsg(bufs)
            except BlockingIOError:
                readable, _, _ = select.select([self.sock], [self.sock], [], 1.0)
                if readable:
                    self._receive()
                elif self.proc.poll() is not None:
                    self.gone = True
                continue
            except (BrokenPipeError, ConnectionResetError):
                self.gone = True
                continue
            while sent:
                if sent >= len(bufs[0]):
                    sent -= len(bufs[0])
                    bufs.pop(0)
                else:
                    bufs[0] = memoryview(bufs[0])[sent:]
                    sent = 0

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except ConnectionResetError:
                data = b""
            if not data:
                self.gone = True
                break
            self._in += data
        n = len(self._in) - len(self._in) % REPLY.size
        for seq, err, digest in REPLY.iter_unpack(self._in[:n]):
            self._answers.append(Reply(self._tmp.pop(seq, None), err, digest.hex() if not err else None))
        del self._in[:n]

    def replies(self) -> list[Reply]:
        """The answers that arrived so far (sending what is queued first)."""
        self._flush()
        self._receive()
        answers, self._answers = self._answers, []
        return answers

    def close(self) -> list[Reply]:
        """Wait for the writer to finish every copy sent, and end it; returns the answers not collected yet.
        Raises WriterGone if it ended before it answered all."""
        try:
            self._flush()
            self.sock.shutdown(socket.SHUT_WR)      # no more copies: the writer answers the rest and exits
            while not self.gone:
                select.select([self.sock], [], [], 1.0)
                self._receive()
                if not self.gone and self.proc.poll() is not None:
                    self._receive()
                    self.gone = True
            code = self.proc.wait()
            if code != 0:
                raise WriterGone(self._why())
            answers, self._answers = self._answers, []
            return answers
        finally:
            self.kill()

    def kill(self) -> None:
        """End the writer now (a run that failed): unfinished copies are its to remove."""
        if self.proc.poll() is None:
            self.sock.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        self.view.release()
        self.ring.close()

    def _why(self) -> str:
        code = self.proc.poll()
        how = "is not answering" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
        return f"the backup's writer process {how}"


class _RemoteCopy:
    """FileBuilder's methods, forwarded to the writer process (``finish`` returns None: the digest comes later)."""

    def __init__(self, writer: Writer, seq: int, reldir: str, tmp: str):
        self.writer, self.seq, self.tmp = writer, seq, tmp
        self.fd = seq
        writer.send(OPEN, seq, pickle.dumps((reldir, tmp)))

    def copy_in(self, src_fd: int, off: int, n: int) -> int:
        return self.writer.read(self.seq, src_fd, off, n)

    def finish(self, meta: Meta, durable: bool) -> None:
        self.writer.send(CLOSE, self.seq, pickle.dumps(meta), flush=True)
        self.fd = None

    def abandon(self) -> None:
        if self.fd is not None and not self.writer.gone:
            self.fd = None
            self.writer._tmp.pop(self.seq, None)
            try:
                self.writer.send(ABORT, self.seq, flush=True)
            except WriterGone:
                pass    # its copies went with it


# ------------------------------------------------------------------------------------------- the writer's side
def serve(sock: socket.socket, tree_fd: int, ring: mmap.mmap) -> None:
    """Build copies as the run streams them, until the run closes its end."""
    view = memoryview(ring)
    dirs: dict[str, int] = {}
    building: dict[int, FileBuilder] = {}
    header = bytearray(HEADER.size)
    payload = bytearray(1 << 20)

    def directory(reldir: str) -> int:
        fd = dirs.get(reldir)
        if fd is None:
            if len(dirs) >= DIR_CACHE:
                for old in dirs.values():
                    os.close(old)
                dirs.clear()
            fd = dirs[reldir] = open_dir(tree_fd, reldir, create=True)
        return fd

    try:
        while _receive_exactly(sock, memoryview(header)):
            op, seq, offset, at, length = HEADER.unpack(header)
            if op != DATA:
                if length > len(payload):
                    payload = bytearray(length)
                message = memoryview(payload)[:length]
                if not _receive_exactly(sock, message):
                    break
            try:
                if op == OPEN:
                    reldir, tmp = pickle.loads(message)
                    building[seq] = FileBuilder(directory(reldir), tmp)
                elif op == DATA:
                    try:
                        if seq in building:
                            pos = at % RING
                            building[seq].write(offset, view[pos:pos + length])
                    finally:
                        FREED.pack_into(ring, RING, at + length)
                elif op == CLOSE:
                    if seq in building:
                        digest = building.pop(seq).finish(pickle.loads(message), durable=False)
                        sock.sendall(REPLY.pack(seq, 0, bytes.fromhex(digest)))
                elif op == ABORT:
                    if seq in building:
                        building.pop(seq).abandon()
            except OSError as exc:
                if seq in building:
                    building.pop(seq).abandon()
                sock.sendall(REPLY.pack(seq, exc.errno or errno.EIO, b""))
    finally:
        for b in building.values():
            b.abandon()
        for fd in dirs.values():
            os.close(fd)


def _receive_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from the socket; False at the end of the stream (before the first byte, or in the middle)."""
    while view:
        n = sock.recv_into(view)
        if not n:
            return False
        view = view[n:]
    return True


def main(argv: list[str]) -> int:
    # Stops are the run's to decide: it ends this process by closing the socket, after the copies it wants.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sock_fd, tree_fd, ring_fd = (int(a) for a in argv[:3])
    sock = socket.socket(fileno=sock_fd)
    try:
        serve(sock, tree_fd, mmap.mmap(ring_fd, RING + FREED.size))
    except (BrokenPipeError, ConnectionResetError):
        return 0        # the run is gone: nothing to answer to
    except Exception as exc:  # noqa: BLE001 - one line for the run's user, who sees the run fail because of it
        print(f"duet: backup writer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
