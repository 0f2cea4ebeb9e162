"""The fallback source: the same engine API served by polling residency, where BPF cannot be used."""

from __future__ import annotations

import os

import pytest
from test_engine import cold_read, evict, pages_by, write_file

from duet_core import engine as engine_mod
from duet_core.engine import Engine
from duet_core.errors import BpfUnavailable
from duet_core.events import PAGE_SIZE, Event
from duet_core.identity import file_id


def test_poll_source_reports_adds_removes_dirties_and_flushes(ext4_fs):
    path = os.path.join(ext4_fs.mnt, "p")
    write_file(path, 256 * PAGE_SIZE)
    evict(path)
    with Engine(source="poll") as eng:
        assert eng.source_name == "poll"
        reg = eng.register("t", Event.ADDED | Event.REMOVED | Event.DIRTIED | Event.FLUSHED, ext4_fs.mnt)
        eng.pump(force=True)
        eng.fetch(reg)
        fid = file_id(path)
        cold_read(path)
        eng.pump(force=True)
        assert pages_by(eng.fetch(reg).items, Event.ADDED) == {fid: set(range(256))}
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"d" * PAGE_SIZE, 7 * PAGE_SIZE)
            eng.pump(force=True)
            dirtied = pages_by(eng.fetch(reg).items, Event.DIRTIED)
            assert 7 in dirtied[fid]          # ext4 dirties the whole (large) folio around it
            os.fsync(fd)
        finally:
            os.close(fd)
        eng.pump(force=True)
        assert pages_by(eng.fetch(reg).items, Event.FLUSHED) == dirtied
        evict(path)
        eng.pump(force=True)
        assert pages_by(eng.fetch(reg).items, Event.REMOVED) == {fid: set(range(256))}


def test_auto_falls_back_to_polling_with_a_warning(ext4_fs, monkeypatch):
    def no_bpf(**_):
        raise BpfUnavailable("failed to load BPF: locked down")

    monkeypatch.setattr(engine_mod, "BpfSource", no_bpf)
    with Engine(source="auto") as eng:
        assert eng.source_name == "poll"
        assert "locked down" in eng.source_warning and "polling" in eng.source_warning
    with pytest.raises(BpfUnavailable):
        Engine(source="bpf")
