"""The user side of the kernel boundary: libbpf (``libbpf.so.1``) through ctypes.

One fixed flow, as in libbpf-tools: open the object → set read-only data and map sizes → load → attach →
drain in a loop → one cleanup path (:meth:`PageCacheBpf.close`). Every failure raises
:class:`~duet_core.errors.BpfUnavailable` saying what failed. The ctypes structs below mirror
``pagecache.h`` field for field; ``tests/test_bpf_loader.py`` checks the sizes against the object's BTF.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import time
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_char_p,
    c_int,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
    sizeof,
)
from dataclasses import dataclass

import numpy as np

from duet_core.bpf import MERGE_ENTRIES
from duet_core.errors import BpfUnavailable

# Mirrors of pagecache.h ------------------------------------------------------------------------------------------

WORD_SHIFT = 6                  # pages per bitmap word: 64
KERNEL_CHUNK_SHIFT = 9          # the kernel merges per 512 pages ...
CHUNK_WORDS = 1 << (KERNEL_CHUNK_SHIFT - WORD_SHIFT)
CHUNK_SHIFT = WORD_SHIFT        # ... and user space gets one record per 64-page word that has events (drain)
CHUNK_PAGES = 1 << CHUNK_SHIFT
SCOPE_CHECK_IGNORE = 0x100
STATS = ("events", "pages", "lost_map", "lost_folio", "lost_ring", "flushes", "ignored", "retries", "collisions")
CTL_ACTIVE = 0
CTL_FILTER_GEN = 1              # bumped after every change to `scopes` or `ignore` (the programs' memo checks it)
INFLIGHT0 = 0   # per-CPU in-flight counter of merge buffer 0; INFLIGHT0 + 1: buffer 1


class FileKey(Structure):
    _fields_ = [("dev", c_uint32), ("gen", c_uint32), ("subvol", c_uint64), ("ino", c_uint64)]


class LostKey(Structure):
    _fields_ = [("dev", c_uint32), ("pad", c_uint32), ("subvol", c_uint64)]


class Config(Structure):
    _fields_ = [("dirty_mark_bit", c_uint32), ("skip_added_tgid", c_uint32), ("slot_mask", c_uint32),
                ("skip_added_tgid2", c_uint32)]


class FlushRec(Structure):
    _fields_ = [("file", FileKey), ("ts_ns", c_uint64), ("exact", c_uint32), ("pad", c_uint32)]


# numpy views of the merge map's keys and values, so a drain is parsed without a Python loop per record.
CHUNK_KEY = np.dtype([("dev", "<u4"), ("gen", "<u4"), ("subvol", "<u8"), ("ino", "<u8"), ("chunk", "<u8")])
_WORD = [("added", "<u8"), ("removed", "<u8"), ("present", "<u8"), ("dirtied", "<u8")]
_DIRTY_NS = [("first_dirty_ns", "<u8"), ("last_dirty_ns", "<u8")]
KERNEL_CHUNK_VAL = np.dtype([("w", np.dtype(_WORD), (CHUNK_WORDS,)), *_DIRTY_NS])   # struct chunk_val
SLOT_READY = 2                  # enum duet_slot_state
# struct chunk_slot: a slot of a chunk table, read in place through the table's memory mapping.
CHUNK_SLOT = np.dtype([("key", CHUNK_KEY), ("state", "<u8"), ("val", KERNEL_CHUNK_VAL)])
# What user space works with: one 64-page word of a chunk, its key's "chunk" counted in words (page >> 6).
CHUNK_VAL = np.dtype([*_WORD, *_DIRTY_NS])


def table_slots(merge_entries: int) -> int:
    """Slots of each chunk table: a quarter of the merge map's entries (so a small map, which tests use to force
    loss, stays small in all), as a power of two, at most 8192 (2.5 MiB)."""
    n = 1
    while n < 8192 and n * 8 <= merge_entries:
        n *= 2
    return n


def split_words(keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kernel records (512-page chunks, KERNEL_CHUNK_VAL) -> one CHUNK_KEY/CHUNK_VAL record per word with any
    event, keyed by word (chunk * 8 + word). The dirtying times are the chunk's, for each of its words."""
    w = vals["w"]
    rows, words = np.nonzero((w["added"] | w["removed"] | w["dirtied"]) != 0)
    out_k = keys[rows]
    out_k["chunk"] = (keys["chunk"][rows] << np.uint64(KERNEL_CHUNK_SHIFT - WORD_SHIFT)) + words.astype(np.uint64)
    out_v = np.empty(len(rows), CHUNK_VAL)
    picked = w[rows, words]
    for name, _ in _WORD:
        out_v[name] = picked[name]
    for name, _ in _DIRTY_NS:
        out_v[name] = vals[name][rows]
    return out_k, out_v

PROGRAMS = ("tp_btf_added", "tp_btf_removed", "tp_btf_dirtied", "tp_btf_flushed")
# The verifier gives up with EAGAIN when a signal arrives while it checks a program (a profiler sampling the
# process, a burst of SIGCHLD or SIGUSR1 a handler catches), and libbpf's own retries follow at once, within the
# same burst: the whole object is loaded again after a pause, this many times, before BPF counts as unavailable.
LOAD_ATTEMPTS = 5
LOAD_PAUSE_S = 0.05

log = logging.getLogger("duet.bpf")

# libbpf ------------------------------------------------------------------------------------------------------------

_RING_CB = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)
_PRINT_CB = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_lib: ctypes.CDLL | None = None
_log: list[str] = []


def _vsnprintf():
    libc = ctypes.CDLL(None)
    fn = libc.vsnprintf
    fn.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
    return fn


_vsn = None


@_PRINT_CB
def _print(level, fmt, args):  # libbpf's log: keep the last lines for error messages
    buf = ctypes.create_string_buffer(1 << 20)
    _vsn(buf, len(buf), fmt, args)
    _log.append(buf.value.decode(errors="replace"))
    del _log[:-200]
    return 0


def libbpf() -> ctypes.CDLL:
    """Load libbpf.so.1 once and declare the functions duet uses."""
    global _lib, _vsn
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        raise BpfUnavailable("failed to load libbpf.so.1", hint="apt-get install libbpf1") from None
    sig = {
        "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
        "bpf_object__load": (c_int, [c_void_p]),
        "bpf_object__close": (None, [c_void_p]),
        "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
        "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
        "bpf_map__fd": (c_int, [c_void_p]),
        "bpf_map__set_max_entries": (c_int, [c_void_p, c_uint32]),
        "bpf_map__initial_value": (c_void_p, [c_void_p, POINTER(c_size_t)]),
        "bpf_program__attach": (c_void_p, [c_void_p]),
        "bpf_link__destroy": (c_int, [c_void_p]),
        "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
        "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
        "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_lookup_and_delete_batch": (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                                    POINTER(c_uint32), c_void_p]),
        "ring_buffer__new": (c_void_p, [c_int, _RING_CB, c_void_p, c_void_p]),
        "ring_buffer__consume": (c_int, [c_void_p]),
        "ring_buffer__free": (None, [c_void_p]),
        "libbpf_num_possible_cpus": (c_int, []),
        "libbpf_set_print": (c_void_p, [_PRINT_CB]),
        "btf__load_vmlinux_btf": (c_void_p, []),
        "btf__free": (None, [c_void_p]),
        "btf__type_cnt": (c_uint32, [c_void_p]),
        "btf__type_by_id": (c_void_p, [c_void_p, c_uint32]),
        "btf__name_by_offset": (c_char_p, [c_void_p, c_uint32]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    _vsn = _vsnprintf()
    lib.libbpf_set_print(_print)
    _lib = lib
    return lib


def _fail(what: str, err: int | None = None) -> BpfUnavailable:
    err = abs(err) if err else ctypes.get_errno()
    detail = os.strerror(err) if err else "unknown error"
    tail = [line.strip() for line in _log[-8:] if line.strip()]
    hint = None
    if err == errno.EPERM:
        hint = "run as root (CAP_BPF and CAP_PERFMON are needed)"
    elif tail:
        hint = "libbpf said: " + " | ".join(tail[-3:])
    return BpfUnavailable(f"failed to {what}: {detail}", hint=hint)


class _Interrupted(BpfUnavailable):
    """The verifier stopped because a signal arrived (EAGAIN): worth loading again."""


def kernel_enum_value(name: str) -> int | None:
    """Value of an enumerator in the running kernel's BTF, also from anonymous enums CO-RE cannot reach."""
    lib = libbpf()
    btf = lib.btf__load_vmlinux_btf()
    if not btf:
        return None
    want = name.encode()
    try:
        for type_id in range(1, lib.btf__type_cnt(btf)):
            t = lib.btf__type_by_id(btf, type_id)
            name_off, info = ctypes.cast(t, POINTER(c_uint32 * 3)).contents[:2]
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind != 6:  # BTF_KIND_ENUM; members follow the 12-byte btf_type: {u32 name_off; s32 val}
                continue
            members = ctypes.cast(t + 12, POINTER(ctypes.c_int32 * (2 * vlen))).contents
            for i in range(vlen):
                if lib.btf__name_by_offset(btf, members[2 * i] & 0xFFFFFFFF) == want:
                    return members[2 * i + 1]
    finally:
        lib.btf__free(btf)
    return None


@dataclass
class Drained:
    """One drained merge buffer: parallel numpy arrays of keys and values."""

    keys: np.ndarray
    vals: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


class PageCacheBpf:
    """The loaded and attached page-cache programs and their maps.

    Use as a context manager, or call :meth:`close`; links and the object are released on every path.
    """

    def __init__(self, obj_path: str, merge_entries: int = MERGE_ENTRIES, skip_added_tgid: int = 0,
                 ring_bytes: int = 0, skip_added_tgid2: int = 0):
        self._lib = libbpf()
        self._obj = None
        self._links: list[int] = []
        self._rb = None
        self._flush_buf: list[FlushRec] = []
        self._filter_gen = 0
        self._scopes: dict[tuple[int, int], int] = {}   # what the `scopes` map holds
        self.merge_entries = merge_entries
        self.slots = table_slots(merge_entries)
        self.skip_added_tgid, self.skip_added_tgid2 = skip_added_tgid, skip_added_tgid2
        self._tables: list[mmap.mmap] = []
        for attempt in range(LOAD_ATTEMPTS):
            try:
                self._open_load_attach(obj_path, merge_entries, ring_bytes)
                break
            except _Interrupted:
                self.close()
                if attempt == LOAD_ATTEMPTS - 1:
                    raise
                log.info("loading the BPF programs was interrupted by a signal: trying again (%d of %d)",
                         attempt + 2, LOAD_ATTEMPTS)
                time.sleep(LOAD_PAUSE_S * (attempt + 1))
            except BaseException:
                self.close()
                raise

    # -- set-up ----------------------------------------------------------------------------------------------------
    def _open_load_attach(self, obj_path: str, merge_entries: int, ring_bytes: int) -> None:
        lib = self._lib
        _log.clear()
        self._obj = lib.bpf_object__open_file(obj_path.encode(), None)
        if not self._obj:
            raise _fail(f"open {obj_path}")
        for name in ("merge0", "merge1"):
            if lib.bpf_map__set_max_entries(self._map(name), merge_entries):
                raise _fail(f"size map {name}")
        for name in ("table0", "table1"):
            if lib.bpf_map__set_max_entries(self._map(name), self.slots):
                raise _fail(f"size map {name}")
        # The flush ring's size (a power of two, at least a page; 0: as compiled). Tests shrink it to force loss.
        if ring_bytes and lib.bpf_map__set_max_entries(self._map("flushes"), ring_bytes):
            raise _fail("size the flush ring")
        self._set_rodata()
        err = lib.bpf_object__load(self._obj)
        if err:
            fail = _fail("load the BPF programs (verifier or BTF)", err)
            if abs(err) == errno.EAGAIN:
                raise _Interrupted(str(fail), hint=fail.hint)
            raise fail
        for prog in PROGRAMS:
            p = lib.bpf_object__find_program_by_name(self._obj, prog.encode())
            if not p:
                raise _fail(f"find program {prog}", errno.ENOENT)
            link = lib.bpf_program__attach(p)
            if not link:
                raise _fail(f"attach {prog}")
            self._links.append(link)
        self.fd = {name: lib.bpf_map__fd(self._map(name))
                   for name in ("merge0", "merge1", "table0", "table1", "scopes", "ignore", "lost", "flushes", "stats",
                                "ctl", "inflight")}
        length = -(-self.slots * CHUNK_SLOT.itemsize // mmap.PAGESIZE) * mmap.PAGESIZE
        for name in ("table0", "table1"):
            try:
                self._tables.append(mmap.mmap(self.fd[name], length, mmap.MAP_SHARED,
                                              mmap.PROT_READ | mmap.PROT_WRITE))
            except OSError as exc:
                raise _fail(f"map {name} into memory", exc.errno) from None
        self._ncpu = lib.libbpf_num_possible_cpus()
        self._ring_cb = _RING_CB(self._on_flush)  # keep a reference: libbpf calls it later
        self._rb = lib.ring_buffer__new(self.fd["flushes"], self._ring_cb, None, None)
        if not self._rb:
            raise _fail("open the flush ring buffer")
        self._active = 0

    def _map(self, name: str) -> int:
        m = self._lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise _fail(f"find map {name}", errno.ENOENT)
        return m

    def _set_rodata(self) -> None:
        """Fill ``cfg`` (struct duet_config, the only read-only global) before load."""
        size = c_size_t()
        data = self._lib.bpf_map__initial_value(self._map(".rodata"), byref(size))
        if not data or size.value < sizeof(Config):
            raise _fail("find the config in .rodata", errno.ENOENT)
        cfg = Config.from_address(data)
        bit = kernel_enum_value("___GFP_LAST_BIT")
        if bit is not None:
            cfg.dirty_mark_bit = bit
        cfg.skip_added_tgid = self.skip_added_tgid
        cfg.skip_added_tgid2 = self.skip_added_tgid2
        cfg.slot_mask = self.slots - 1

    # -- scope and filters -----------------------------------------------------------------------------------------
    # Each change is followed by a new filter generation: every program then forgets the answer it kept for the
    # last file it saw on its CPU (struct resolve_memo) and asks the maps again.
    def _filter_changed(self) -> None:
        self._filter_gen = (self._filter_gen + 1) & 0xFFFFFFFF
        key, val = c_uint32(CTL_FILTER_GEN), c_uint32(self._filter_gen)
        if self._lib.bpf_map_update_elem(self.fd["ctl"], byref(key), byref(val), 0):
            raise _fail("update the filter generation")

    def set_scope(self, dev: int, subvol: int, mask: int) -> None:
        """Watch (dev, subvol) for ``mask``; a pair already set so is left alone (the engine sets every pair again
        after each rescan), and so are the programs' kept answers."""
        if self._scopes.get((dev, subvol)) == mask:
            return
        key, val = LostKey(dev, 0, subvol), c_uint32(mask)
        if self._lib.bpf_map_update_elem(self.fd["scopes"], byref(key), byref(val), 0):
            raise _fail("update the scope map")
        self._scopes[(dev, subvol)] = mask
        self._filter_changed()

    def del_scope(self, dev: int, subvol: int) -> None:
        if self._scopes.pop((dev, subvol), None) is None:
            return
        key = LostKey(dev, 0, subvol)
        self._lib.bpf_map_delete_elem(self.fd["scopes"], byref(key))
        self._filter_changed()

    def ignore(self, dev: int, subvol: int, ino: int, gen: int) -> None:
        key, val = FileKey(dev, gen, subvol, ino), ctypes.c_uint8(1)
        self._lib.bpf_map_update_elem(self.fd["ignore"], byref(key), byref(val), 0)
        self._filter_changed()

    def unignore(self, files: set[tuple[int, int, int]]) -> None:
        """Forget every ignored generation of these (dev, subvol, ino): one walk of the map for all of them."""
        lib, fd = self._lib, self.fd["ignore"]
        key, nxt = FileKey(), FileKey()
        doomed, prev = [], None
        while lib.bpf_map_get_next_key(fd, prev, byref(nxt)) == 0:
            key = FileKey(nxt.dev, nxt.gen, nxt.subvol, nxt.ino)
            prev = byref(key)
            if (key.dev, key.subvol, key.ino) in files:
                doomed.append(key)
        for k in doomed:
            lib.bpf_map_delete_elem(fd, byref(k))
        if doomed:
            self._filter_changed()

    # -- draining --------------------------------------------------------------------------------------------------
    def _inflight(self, buffer: int) -> int:
        """Programs still updating merge buffer ``buffer``, summed over the CPUs."""
        key, vals = c_uint32(INFLIGHT0 + buffer), (c_uint64 * self._ncpu)()
        self._lib.bpf_map_lookup_elem(self.fd["inflight"], byref(key), vals)
        return sum(vals)

    def switch(self, timeout_s: float = 1.0) -> int:
        """Make programs write the other merge buffer; return the old one once no program is still in it."""
        old, new = self._active, self._active ^ 1
        key, val = c_uint32(CTL_ACTIVE), c_uint32(new)
        if self._lib.bpf_map_update_elem(self.fd["ctl"], byref(key), byref(val), 0):
            raise _fail("switch merge buffers")
        self._active = new
        deadline = time.monotonic() + timeout_s
        time.sleep(0.0005)  # let the store reach every CPU before trusting the in-flight count
        while self._inflight(old):
            if time.monotonic() > deadline:
                raise _fail("drain: a program stayed in the old buffer", errno.ETIMEDOUT)
            time.sleep(0.0002)
        return old

    def drain(self) -> Drained:
        """Switch buffers and empty the old one into numpy arrays: its chunk table read and cleared in place, then
        its hash map in a few batch syscalls — no loop per record."""
        old = self.switch()
        table = np.frombuffer(self._tables[old], CHUNK_SLOT, self.slots)
        used = np.flatnonzero(table["state"])
        ready = used[table["state"][used] == SLOT_READY]   # all of them: no program is left in this buffer
        slot_keys, slot_vals = table["key"][ready], table["val"][ready]   # copies: the table is cleared next
        table[used] = np.zeros((), CHUNK_SLOT)
        del table                             # no view outlives the drain (close unmaps the table)
        fd = self.fd[f"merge{old}"]
        cap = self.merge_entries
        keys = np.empty(cap, CHUNK_KEY)
        vals = np.empty(cap, KERNEL_CHUNK_VAL)
        total = 0
        out_batch = c_uint64()
        in_batch = None
        while total < cap:
            count = c_uint32(cap - total)
            err = self._lib.bpf_map_lookup_and_delete_batch(
                fd, in_batch, byref(out_batch),
                keys.ctypes.data + total * CHUNK_KEY.itemsize, vals.ctypes.data + total * KERNEL_CHUNK_VAL.itemsize,
                byref(count), None)
            total += count.value
            if err:
                e = ctypes.get_errno()
                if e == errno.ENOENT:
                    break
                raise _fail("drain the merge map", e)
            in_batch = byref(out_batch)
        if total:
            keys = np.concatenate((slot_keys, keys[:total]))
            vals = np.concatenate((slot_vals, vals[:total]))
        else:
            keys, vals = slot_keys, slot_vals
        return Drained(*split_words(keys, vals))

    def _on_flush(self, _ctx, data, size) -> int:
        if size >= sizeof(FlushRec):
            self._flush_buf.append(FlushRec.from_buffer_copy(ctypes.string_at(data, sizeof(FlushRec))))
        return 0

    def flushes(self) -> list[FlushRec]:
        """Flush records that arrived since the last call."""
        self._lib.ring_buffer__consume(self._rb)
        out, self._flush_buf = self._flush_buf, []
        return out

    def take_lost(self) -> dict[tuple[int, int], int]:
        """Pages lost per (dev, subvol) since the last call; the entries are deleted as they are read."""
        lib, fd = self._lib, self.fd["lost"]
        out: dict[tuple[int, int], int] = {}
        key, nxt, val = LostKey(), LostKey(), c_uint64()
        prev = None
        while lib.bpf_map_get_next_key(fd, prev, byref(nxt)) == 0:
            key = LostKey(nxt.dev, 0, nxt.subvol)
            prev = byref(key)
            if lib.bpf_map_lookup_elem(fd, byref(key), byref(val)) == 0 and val.value:
                out[(key.dev, key.subvol)] = val.value
        for dev, subvol in out:
            # Subtract what was read instead of deleting, so pages lost meanwhile are not lost twice over.
            k = LostKey(dev, 0, subvol)
            if lib.bpf_map_lookup_elem(fd, byref(k), byref(val)) == 0:
                left = c_uint64(val.value - out[(dev, subvol)])
                lib.bpf_map_update_elem(fd, byref(k), byref(left), 0)
        return out

    def stats(self) -> dict[str, int]:
        """Counters summed over CPUs since load."""
        vals = (c_uint64 * self._ncpu)()
        out = {}
        for i, name in enumerate(STATS):
            key = c_uint32(i)
            self._lib.bpf_map_lookup_elem(self.fd["stats"], byref(key), vals)
            out[name] = sum(vals)
        return out

    # -- teardown --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        lib = self._lib
        if self._rb:
            lib.ring_buffer__free(self._rb)
            self._rb = None
        for link in self._links:
            lib.bpf_link__destroy(link)
        self._links.clear()
        for table in self._tables:
            table.close()
        self._tables.clear()
        if self._obj:
            lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> "PageCacheBpf":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
