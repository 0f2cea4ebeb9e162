"""How fragmented a file is, from its extent map (``duet_core.fiemap``).

``filefrag`` counts a file's extents after merging neighbours that are contiguous on disk; so does
:func:`layout`. Whether a file is *fragmented* is judged against the ideal for its size on its filesystem: btrfs
writes data extents of at most 128 MiB (128 KiB when compressed), ext4 at most 32768 blocks of 4 KiB (128 MiB). A
1 GiB file in 8 extents is perfect; a 1 MiB file in 3 is not. Compressed (``ENCODED``) and inline extents are
counted at their ideal (one per 128 KiB, one per inline tail), never as fragmentation: rewriting them cannot merge
them. Holes split a file into data runs, each with its own ideal, so a sparse file is not "fragmented" by its holes.
"""

from __future__ import annotations

from dataclasses import dataclass

from duet_core.fiemap import (
    FIEMAP_EXTENT_DATA_INLINE,
    FIEMAP_EXTENT_ENCODED,
    FIEMAP_EXTENT_SHARED,
    FIEMAP_EXTENT_UNWRITTEN,
    Extent,
    extents,
)

__all__ = ["Extent", "Layout", "extents", "layout", "merge"]

MiB = 1 << 20
KiB = 1 << 10
# The largest data extent each filesystem writes: the ideal extent size for a file.
MAX_EXTENT = {"btrfs": 128 * MiB, "ext4": 32768 * 4 * KiB, "xfs": 8 * 1024 * MiB}
MAX_ENCODED_EXTENT = 128 * KiB      # btrfs compressed extents cover at most 128 KiB of the file


@dataclass(frozen=True)
class Layout:
    """How a file lies on disk, summed up from its extents.

    ``extents``: extents after merging physically contiguous neighbours (what ``filefrag`` reports);
    ``ideal``: the fewest this file could have on its filesystem; ``data_bytes``: bytes mapped;
    ``shared``: extents shared with a snapshot or reflink; ``unplaced``: delayed-allocation
    extents (being written); ``runs``: logical ranges ``(start, end)`` worth rewriting — each a stretch of
    mergeable extents (unshared ones, unless asked otherwise) that holds more extents than it could.
    """

    extents: int
    ideal: int
    data_bytes: int
    shared: int
    unplaced: int
    runs: tuple[tuple[int, int], ...]

    @property
    def excess(self) -> int:
        """Extents beyond the ideal: 0 for a perfectly laid out file."""
        return max(0, self.extents - self.ideal)


def merge(records: list[Extent]) -> list[Extent]:
    """Merge neighbours that continue each other both in the file and on disk, as ``filefrag`` counts them.

    Flags must agree on sharing and encoding: a shared extent next to an exclusive one stays separate.
    """
    merged: list[Extent] = []
    keep = FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_ENCODED | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_UNWRITTEN
    for e in records:
        if merged:
            p = merged[-1]
            if (not e.unplaced and not p.unplaced and not e.fixed_size and not p.fixed_size
                    and p.end == e.logical and p.physical + p.length == e.physical
                    and (p.flags & keep) == (e.flags & keep)):
                merged[-1] = Extent(p.logical, p.physical, p.length + e.length, p.flags | e.flags)
                continue
        merged.append(e)
    return merged


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def layout(records: list[Extent], fstype: str, rewrite_shared: bool = False) -> Layout:
    """Sum up ``records`` (from :func:`extents`) for a file on ``fstype``.

    The ideal counts, per data run (logically adjacent extents; holes split runs): one extent per
    ``MAX_EXTENT[fstype]`` of ordinary data, one per 128 KiB of compressed data, one per inline tail. Rewrite runs
    are maximal stretches of ordinary, placed extents — exclusive ones only, unless ``rewrite_shared`` — that hold
    more extents than their ideal.
    """
    max_extent = MAX_EXTENT.get(fstype, MAX_EXTENT["ext4"])
    merged = merge(records)
    ideal = 0
    runs: list[tuple[int, int]] = []
    # Ideal per data run.
    run_plain = run_encoded = 0
    run_end = None

    def close_run() -> int:
        return _ceil_div(run_plain, max_extent) + _ceil_div(run_encoded, MAX_ENCODED_EXTENT)

    # Candidate rewrite stretches: consecutive mergeable extents, logically adjacent.
    stretch: list[Extent] = []

    def close_stretch() -> None:
        if len(stretch) > 1:
            size = stretch[-1].end - stretch[0].logical
            if len(stretch) > _ceil_div(size, max_extent):
                runs.append((stretch[0].logical, stretch[-1].end))
        stretch.clear()

    for e in merged:
        if run_end is not None and e.logical != run_end:
            ideal += close_run()
            run_plain = run_encoded = 0
        if e.flags & FIEMAP_EXTENT_DATA_INLINE:
            ideal += 1
        elif e.fixed_size:
            run_encoded += e.length
        else:
            run_plain += e.length
        run_end = e.end
        mergeable = not (e.fixed_size or e.unplaced or (e.shared and not rewrite_shared))
        if not mergeable or (stretch and stretch[-1].end != e.logical):
            close_stretch()
        if mergeable:
            stretch.append(e)
    if run_end is not None:
        ideal += close_run()
    close_stretch()
    return Layout(
        extents=len(merged),
        ideal=ideal,
        data_bytes=sum(e.length for e in merged),
        shared=sum(1 for e in merged if e.shared),
        unplaced=sum(1 for e in merged if e.unplaced),
        runs=tuple(runs),
    )
