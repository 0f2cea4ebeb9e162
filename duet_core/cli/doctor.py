"""``duet doctor``: what works on this machine, and what to install or change for the rest."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass

import typer
from rich.table import Table

from duet_core.cli.output import console, emit_json
from duet_core.errors import DuetError

TRACEPOINTS = ("filemap/mm_filemap_add_to_page_cache", "filemap/mm_filemap_delete_from_page_cache",
               "writeback/writeback_dirty_folio", "writeback/sb_clear_inode_writeback")
TOOLS = (("clang", "clang"), ("bpftool", "bpftool"), ("btrfs", "btrfs-progs"), ("mkfs.ext4", "e2fsprogs"),
         ("mkfs.xfs", "xfsprogs"), ("losetup", "util-linux"), ("fio", "fio"))


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True   # required for the BPF source


def _kernel() -> Check:
    release = platform.release()
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return Check("kernel", False, release, "could not parse the kernel version")
    ok = (major, minor) >= (6, 5)
    return Check("kernel", ok, f"Linux {release}", "" if ok else "cachestat() needs Linux 6.5; mincore is used")


def _root() -> Check:
    ok = os.geteuid() == 0
    return Check("root", ok, "running as root" if ok else f"uid {os.geteuid()}",
                 "" if ok else "run as root: loading BPF needs CAP_BPF and CAP_PERFMON")


def _btf() -> Check:
    ok = os.path.exists("/sys/kernel/btf/vmlinux")
    return Check("btf", ok, "/sys/kernel/btf/vmlinux" if ok else "missing",
                 "" if ok else "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")


def _tracepoints() -> Check:
    base = "/sys/kernel/tracing/events"
    if not os.path.isdir(base):
        return Check("tracepoints", False, "tracefs not mounted", "mount -t tracefs nodev /sys/kernel/tracing",
                     required=False)
    missing = [tp for tp in TRACEPOINTS if not os.path.isdir(os.path.join(base, tp))]
    return Check("tracepoints", not missing, "all 4 present" if not missing else "missing: " + ", ".join(missing),
                 "" if not missing else "this kernel lacks page-cache tracepoints")


def _libbpf() -> Check:
    from duet_core.bpf import loader

    try:
        loader.libbpf()
    except DuetError as exc:
        return Check("libbpf", False, str(exc), "apt-get install libbpf1")
    return Check("libbpf", True, "libbpf.so.1 loaded")


def _bpf_load() -> Check:
    from duet_core.sources import BpfSource

    try:
        src = BpfSource(merge_entries=1024)
    except DuetError as exc:
        return Check("bpf", False, str(exc), exc.hint or "see the lines above")
    src.close()
    return Check("bpf", True, "page-cache programs compiled, loaded and attached (tp_btf)")


def _cachestat() -> Check:
    from duet_core import residency

    fd = os.open("/proc/self/exe", os.O_RDONLY)
    try:
        ok = residency.cachestat(fd) is not None
    except OSError:
        ok = False
    finally:
        os.close(fd)
    return Check("cachestat", ok, "cachestat() works" if ok else "unavailable: mincore fallback",
                 required=False)


def _filesystems() -> Check:
    with open("/proc/filesystems") as fh:
        have = {line.split()[-1] for line in fh if line.strip()}
    wanted = ("btrfs", "ext4", "xfs")
    missing = [fs for fs in wanted if fs not in have]
    return Check("filesystems", not missing, ", ".join(fs for fs in wanted if fs in have) or "none",
                 "modprobe " + " ".join(missing) if missing else "", required=False)


def _tools() -> list[Check]:
    out = []
    for exe, pkg in TOOLS:
        path = shutil.which(exe) or (f"/usr/sbin/{exe}" if os.path.exists(f"/usr/sbin/{exe}") else None)
        out.append(Check(f"tool {exe}", bool(path), path or "not found", "" if path else f"apt-get install {pkg}",
                         required=exe in ("clang", "bpftool")))
    return out


def run_checks() -> list[Check]:
    checks = [_kernel(), _root(), _btf(), _tracepoints(), _libbpf(), *_tools(), _cachestat(), _filesystems()]
    checks.append(_bpf_load())
    return checks


def doctor(json_out: bool = typer.Option(False, "--json", help="One JSON object instead of a table.")) -> None:
    """Check kernel, BPF, BTF, tracepoints, filesystems and tools; exit 0 when the BPF source is usable.

    Examples:
      duet doctor
      duet doctor --json | jq .source
    """
    checks = run_checks()
    bpf_ok = next(c for c in checks if c.name == "bpf").ok
    source = "bpf" if bpf_ok else "poll"
    if json_out:
        emit_json({"bpf": bpf_ok, "source": source, "checks": [asdict(c) for c in checks]})
    else:
        table = Table(title="duet doctor", title_justify="left")
        for col in ("check", "", "detail", "to fix"):
            table.add_column(col)
        for c in checks:
            mark = "[green]ok[/]" if c.ok else ("[red]FAIL[/]" if c.required else "[yellow]warn[/]")
            table.add_row(c.name, mark, c.detail, c.fix)
        console.print(table)
        console.print(f"event source: [bold]{source}[/]"
                      + ("" if bpf_ok else " (polling fallback: slower, coarser; fix the failures above)"))
    raise typer.Exit(0 if bpf_ok else 1)
