"""The kernel boundary: the structs user space reads must be laid out exactly as the BPF object's BTF says."""

from __future__ import annotations

import ctypes
import re
import subprocess

import pytest

from duet_core.bpf import loader
from duet_core.bpf.build import build


def btf_structs(obj: str) -> dict[str, tuple[int, dict[str, int]]]:
    """{struct name: (size, {member: byte offset})} from ``bpftool btf dump file OBJ``."""
    out: dict[str, tuple[int, dict[str, int]]] = {}
    current = None
    text = subprocess.run(["bpftool", "btf", "dump", "file", obj], capture_output=True, text=True, check=True).stdout
    for line in text.splitlines():
        if m := re.match(r"\[\d+\] STRUCT '(\w+)' size=(\d+)", line):
            current = m[1]
            out[current] = (int(m[2]), {})
        elif current and (m := re.match(r"\s+'(\w+)' type_id=\d+ bits_offset=(\d+)", line)):
            out[current][1][m[1]] = int(m[2]) // 8
        elif line.startswith("["):
            current = None
    return out


@pytest.fixture(scope="module")
def structs():
    return btf_structs(str(build()))


@pytest.mark.parametrize("name, mirror", [
    ("chunk_key", loader.CHUNK_KEY), ("chunk_val", loader.KERNEL_CHUNK_VAL),
    ("file_key", loader.FileKey), ("lost_key", loader.LostKey), ("chunk_slot", loader.CHUNK_SLOT),
    ("duet_config", loader.Config),
])
def test_user_space_mirrors_match_the_objects_btf(structs, name, mirror):
    size, members = structs[name]
    if isinstance(mirror, type) and issubclass(mirror, ctypes.Structure):
        assert ctypes.sizeof(mirror) == size
        assert {f: getattr(mirror, f).offset for f, _ in mirror._fields_} == members
    else:   # a numpy dtype flattening a nested struct: compare the flattened offsets
        assert mirror.itemsize == size
        flat = {f: off for f, (_, off) in mirror.fields.items()}
        if name == "chunk_key":
            file_size, file_members = structs["file_key"]
            assert members == {"file": 0, "chunk": file_size}
            assert flat == {**file_members, "chunk": file_size}
        else:
            assert flat == members


def test_kernel_enum_lookup_reads_btf():
    # PG_head is a named enumerator CO-RE could relocate too; the loader must find the same value.
    text = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "c"],
                          capture_output=True, text=True, check=True).stdout
    want = int(re.search(r"\bPG_head = (\d+),", text)[1])
    assert loader.kernel_enum_value("PG_head") == want
    assert loader.kernel_enum_value("___GFP_LAST_BIT") == int(re.search(r"\b___GFP_LAST_BIT = (\d+),", text)[1])
    assert loader.kernel_enum_value("no_such_enumerator_anywhere") is None
