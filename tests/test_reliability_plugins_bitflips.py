"""Seeded bit flips under many files, on btrfs and ext4: scrub reports every one, with its file and a range holding
the flipped byte, and no other file. The flips are made behind the filesystem's back in the image (FIEMAP, and on
btrfs the chunk tree, map a file offset to the device: tests/test_scrub.py's helpers). The seed is printed;
``DUET_FLIP_SEED=N`` replays one.
"""

from __future__ import annotations

import os
import random
import time

import fsimage
import pytest
from plugin_dist import make_dataset
from test_scrub import Duet, corrupt_map, covers, flip_bit

pytestmark = pytest.mark.bpf

FILES = 14
FLIPPED = 10
SIZES = (64 << 10, 192 << 10, 1 << 20, 300_001)


@pytest.fixture
def duet(tmp_path, bpf_required):
    return Duet(tmp_path)


@pytest.mark.parametrize("fstype", ["btrfs", "ext4"])
def test_every_seeded_bit_flip_is_reported_with_its_file_and_range(fstype, duet, require_root):
    seed = int(os.environ.get("DUET_FLIP_SEED") or time.time_ns() % 1_000_000)
    print(f"bit flip test ({fstype}): seed {seed} (replay with DUET_FLIP_SEED={seed})")
    rng = random.Random(seed)
    with fsimage.loop_fs(fstype, direct_io=True) as fs:
        scope, files = make_dataset(fs.mnt, n=FILES, sizes=SIZES)
        code, report, err = duet.scrub(scope)       # ext4: the manifest's baseline; btrfs: a clean first round
        assert code == 0 and report["corrupt"] == [], err
        flips: dict[str, list[int]] = {}
        for rel in rng.sample(sorted(files), FLIPPED):
            offsets = sorted(rng.sample(range(files[rel]), rng.choice((1, 1, 2))))
            for off in offsets:
                flip_bit(fs, os.path.join(scope, rel), off)
            flips[rel] = offsets
        code, report, err = duet.scrub(scope, "--every", "0")
        assert code == 6, (seed, err)
        found = corrupt_map(report)
        assert set(found) == {os.path.join(scope, rel) for rel in flips}, (seed, sorted(found))
        for rel, offsets in flips.items():
            ranges = found[os.path.join(scope, rel)]
            for off in offsets:
                assert covers(ranges, off), (seed, rel, off, ranges)
            # Only the damaged blocks (btrfs, 4 KiB) or chunks (ext4, 256 KiB; adjacent ones merge into one range):
            # every range holds a flip, and together they are at most a chunk per flip.
            assert all(any(s <= off < e for off in offsets) for s, e in ranges), (seed, rel, offsets, ranges)
            assert sum(e - s for s, e in ranges) <= len(offsets) * (256 << 10), (seed, rel, offsets, ranges)
            assert f"{rel}: CORRUPT" in err
        assert report["items_damaged"] == FLIPPED
        print(f"bit flip test ({fstype}): {sum(map(len, flips.values()))} flips in {FLIPPED} of {FILES} files, "
              f"all reported")
