"""duet_core.residency on real btrfs and ext4: exact page sets, no side effects on the cache."""

from __future__ import annotations

import errno
import os

import pytest
from fsimage import drop_file_cache
from pyroaring import BitMap

from duet_core import residency
from duet_core.events import PAGE_SIZE
from duet_core.residency import (
    cachestat,
    evict,
    file_pages,
    mincore_pages,
    open_noatime,
    resident_count,
    resident_pages,
)

NPAGES = 64
SIZE = NPAGES * PAGE_SIZE + 100  # a partial last page: 65 pages


@pytest.fixture(params=["btrfs_fs", "ext4_fs"])
def cold_file(request):
    """A 65-page file with nothing in the page cache, and an O_NOATIME fd on it with readahead off."""
    fs = request.getfixturevalue(request.param)
    path = f"{fs.mnt}/data"
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    drop_file_cache(path)
    fd = open_noatime(path)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: a pread caches exactly what it reads
    yield path, fd
    os.close(fd)


def read_pages(fd: int, pages) -> None:
    for index in pages:
        os.pread(fd, PAGE_SIZE, index * PAGE_SIZE)


def test_file_pages():
    assert [file_pages(n) for n in (0, 1, PAGE_SIZE, PAGE_SIZE + 1)] == [0, 1, 1, 2]


def test_cold_file_has_no_pages(cold_file):
    _, fd = cold_file
    assert cachestat(fd).nr_cache == 0
    assert resident_pages(fd, SIZE) == BitMap()
    assert mincore_pages(fd, SIZE) == BitMap()
    assert resident_count(fd) == 0


@pytest.mark.parametrize("count", [1, 5, 17])
def test_cold_read_of_first_pages_is_exact(cold_file, count):
    _, fd = cold_file
    read_pages(fd, range(count))
    assert resident_pages(fd, SIZE) == BitMap(range(count))


def test_scattered_pages_and_partial_last_page(cold_file):
    _, fd = cold_file
    pages = [0, 3, 10, 11, 40, NPAGES]  # NPAGES is the partial last page
    read_pages(fd, pages)
    assert resident_pages(fd, SIZE) == BitMap(pages)
    assert resident_count(fd) == len(pages)


def test_cachestat_and_mincore_agree(cold_file):
    _, fd = cold_file
    read_pages(fd, range(0, NPAGES, 3))
    bits = mincore_pages(fd, SIZE)
    assert len(bits) == cachestat(fd).nr_cache == len(range(0, NPAGES, 3))
    for first, length in [(0, 8), (9, 20), (30, 35)]:
        expected = bits.range_cardinality(first, first + length)
        assert cachestat(fd, first * PAGE_SIZE, length * PAGE_SIZE).nr_cache == expected


def test_mincore_in_several_windows(cold_file, monkeypatch):
    _, fd = cold_file
    monkeypatch.setattr(residency, "MINCORE_WINDOW", 16)
    pages = [0, 15, 16, 33, 47, 48, NPAGES]
    read_pages(fd, pages)
    assert mincore_pages(fd, SIZE) == BitMap(pages)


def test_fully_cached_file_is_the_full_range(cold_file):
    _, fd = cold_file
    os.pread(fd, SIZE, 0)
    assert resident_pages(fd, SIZE) == BitMap(range(file_pages(SIZE)))


def test_checking_does_not_change_the_cache(cold_file):
    _, fd = cold_file
    read_pages(fd, [2, 7])
    before = cachestat(fd)
    for _ in range(3):
        resident_pages(fd, SIZE)
        mincore_pages(fd, SIZE)
    assert cachestat(fd) == before
    assert mincore_pages(fd, SIZE) == BitMap([2, 7])


def test_evict_empties_the_cache(cold_file):
    _, fd = cold_file
    os.pread(fd, SIZE, 0)
    assert resident_count(fd) == file_pages(SIZE)
    evict(fd)
    assert resident_count(fd) == 0
    assert resident_pages(fd, SIZE) == BitMap()


def test_evict_range(cold_file):
    _, fd = cold_file
    os.pread(fd, SIZE, 0)
    evict(fd, 8 * PAGE_SIZE, 8 * PAGE_SIZE)
    assert resident_pages(fd, SIZE) == BitMap(range(file_pages(SIZE))) - BitMap(range(8, 16))


def test_empty_file(ext4_fs):
    path = f"{ext4_fs.mnt}/empty"
    open(path, "wb").close()
    fd = open_noatime(path)
    try:
        assert resident_pages(fd, 0) == BitMap()
        assert mincore_pages(fd, 0) == BitMap()
        assert resident_count(fd) == 0
    finally:
        os.close(fd)


def test_file_shrunk_since_its_size_was_taken(cold_file):
    path, fd = cold_file
    read_pages(fd, [1, 2, 50])
    os.truncate(path, 10 * PAGE_SIZE)
    assert resident_pages(fd, SIZE) == BitMap([1, 2])
    assert mincore_pages(fd, SIZE) == BitMap([1, 2])
    os.truncate(path, 0)
    assert resident_pages(fd, SIZE) == BitMap()


def test_without_cachestat_mincore_answers(cold_file, monkeypatch):
    _, fd = cold_file
    read_pages(fd, [4, 5])
    monkeypatch.setattr(residency, "cachestat", lambda *args: None)
    assert resident_pages(fd, SIZE) == BitMap([4, 5])
    assert resident_count(fd) == 2


def test_dirty_pages_are_counted_and_survive_evict(ext4_fs):
    path = f"{ext4_fs.mnt}/dirty"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"d" * (4 * PAGE_SIZE))
        assert cachestat(fd).nr_dirty == 4
        evict(fd)
        assert resident_pages(fd, 4 * PAGE_SIZE) == BitMap(range(4))
        os.fsync(fd)
        evict(fd)
        assert resident_count(fd) == 0
    finally:
        os.close(fd)


def test_open_noatime_refuses_symlinks(ext4_fs):
    os.symlink("missing-or-not", f"{ext4_fs.mnt}/link")
    with pytest.raises(OSError) as err:
        open_noatime(f"{ext4_fs.mnt}/link")
    assert err.value.errno == errno.ELOOP


def test_open_noatime_keeps_atime(ext4_fs):
    path = f"{ext4_fs.mnt}/f"
    with open(path, "wb") as f:
        f.write(b"x" * PAGE_SIZE)
    os.utime(path, (1_000_000, 1_000_000))
    fd = open_noatime(path)
    try:
        os.pread(fd, PAGE_SIZE, 0)
        resident_pages(fd, PAGE_SIZE)
    finally:
        os.close(fd)
    assert os.stat(path).st_atime == 1_000_000
