"""Build the kernel side: ``vmlinux.h`` from the running kernel's BTF, then ``pagecache.bpf.o`` with clang.

Run at set-up (``python -m duet_core.bpf.build``) or on first use. Rebuilds only when a source is newer than the
object. The object is CO-RE: field offsets are relocated by libbpf against the BTF of whatever kernel loads it,
so the ``vmlinux.h`` it was compiled with only has to name the types, not match their layout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from duet_core.errors import BpfUnavailable

SRC_DIR = Path(__file__).resolve().parent
SOURCES = (SRC_DIR / "pagecache.bpf.c", SRC_DIR / "pagecache.h")
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")


def build_dir() -> Path:
    """Where the object lives: ``$DUET_BPF_DIR``, else beside the sources if writable, else /var/cache/duet."""
    if env := os.environ.get("DUET_BPF_DIR"):
        return Path(env)
    local = SRC_DIR / "build"
    if os.access(SRC_DIR, os.W_OK):
        return local
    return Path("/var/cache/duet/bpf")


def object_path() -> Path:
    return build_dir() / "pagecache.bpf.o"


def is_stale(obj: Path) -> bool:
    if not obj.exists():
        return True
    built = obj.stat().st_mtime_ns
    return any(src.stat().st_mtime_ns > built for src in SOURCES)


def _run(argv: list[str], what: str, stdout=None) -> None:
    try:
        proc = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, text=True, check=False)
    except FileNotFoundError:
        raise BpfUnavailable(f"failed to {what}: {argv[0]} is not installed",
                        hint="run scripts/dev, or apt-get install clang llvm libbpf-dev bpftool") from None
    if proc.returncode != 0:
        raise BpfUnavailable(f"failed to {what}: {proc.stderr.strip()[-2000:]}")


def build(force: bool = False) -> Path:
    """Return the path of an up-to-date object, compiling it if needed. Any failure is :class:`BpfUnavailable`: with
    ``--source auto`` the run goes on polling, with ``--source bpf`` it exits 3."""
    obj = object_path()
    try:
        if not force and not is_stale(obj):
            return obj
        return _build(obj, force)
    except OSError as exc:       # the build directory cannot be made or written (a file there, read-only, full)
        raise BpfUnavailable(f"cannot build the BPF object in {obj.parent}: {exc.strerror or exc}",
                             hint="set DUET_BPF_DIR to a writable directory, or run scripts/dev setup") from None


def _build(obj: Path, force: bool) -> Path:
    out = obj.parent
    out.mkdir(parents=True, exist_ok=True)
    print(f"duet: building the BPF object for this kernel in {out} (once; clang and bpftool needed)", file=sys.stderr)
    vmlinux_h = out / "vmlinux.h"
    if not vmlinux_h.exists() or force:
        if not VMLINUX_BTF.exists():
            raise BpfUnavailable("failed to build the BPF object: this kernel has no BTF (/sys/kernel/btf/vmlinux)",
                            hint="use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
        bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
        tmp = vmlinux_h.with_suffix(".h.tmp")
        with open(tmp, "w") as fh:
            _run([bpftool, "btf", "dump", "file", str(VMLINUX_BTF), "format", "c"], "generate vmlinux.h",
                 stdout=fh)
        os.replace(tmp, vmlinux_h)
    tmp_obj = obj.with_suffix(".o.tmp")
    _run(["clang", "-g", "-O2", "-target", "bpf", "-mcpu=v3", "-D__TARGET_ARCH_x86",
          "-I", str(out), "-I", str(SRC_DIR), "-c", str(SOURCES[0]), "-o", str(tmp_obj)],
         "compile pagecache.bpf.c")
    os.replace(tmp_obj, obj)
    return obj


def main() -> int:
    try:
        obj = build(force="--force" in sys.argv)
    except BpfUnavailable as exc:
        print(f"duet: {exc}", file=sys.stderr)
        return 1
    print(f"duet: BPF object ready: {obj}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
