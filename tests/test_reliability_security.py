"""duet runs as root over trees other users write: what it must never do, tried on real filesystems.

Never follow a symlink out of the scope (not even a directory swapped for one during a run), never open a fifo or
device as data, never pass a path through a shell, never let a crafted path widen what the kernel side reports,
keep state private whatever the umask, and load plugins only from installed distributions — never from the tree
it scans.
"""

from __future__ import annotations

import ast
import glob
import os
import stat
import subprocess
import sys
import textwrap
import time

import fsimage
import pytest
from plugin_dist import evict_tree
from reliability import RDuet, duet, fs, sha256, tree_snapshot  # noqa: F401 - duet, fs: shared fixtures
from test_run_cli import summary_of, wait_for

from duet_core.engine import Engine
from duet_core.events import Event
from duet_core.identity import file_id
from duet_core.scope import Scope

pytestmark = pytest.mark.bpf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path: str, data: bytes) -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return data


def test_swaps_during_a_run_never_lead_out_of_the_scope_nor_into_a_fifo(duet, fs):
    """After the scan and before duet reaches them: the last directory is replaced by a symlink to a secret tree
    holding the same names, one file by a symlink to /etc/passwd, one by a fifo. None is followed or opened (a
    fifo opened for reading would hang the run); the run ends normally and counts them as vanished."""
    scope = os.path.join(fs.mnt, "scope")
    secret = os.path.join(fs.mnt, "secret")
    mine = {}
    for d in ("p", "q", "r"):
        for i in range(3):
            mine[f"{d}/f{i}"] = write(os.path.join(scope, d, f"f{i}"), os.urandom(3000 + i))
    evict_tree(scope)
    order = [f.relpath for f in Scope(scope).scan()]      # uncached files are processed in this order
    last_dir = order[-1].split("/")[0]
    assert [p.split("/")[0] for p in order[-3:]] == [last_dir] * 3, order
    secrets = {write(os.path.join(secret, os.path.basename(p)), f"secret {p}\n".encode() * 50)
               for p in order[-3:]}
    swapped_link, swapped_fifo = order[-5], order[-4]
    proc = duet.start("run", "slowhex", "--path", scope, "--sleep", "0.3", "--json")
    wait_for(lambda: len(duet.hex_log()) >= 1, what="the run working", proc=proc)
    assert len(duet.hex_log()) < 4, "the run got too far before the swaps"
    os.rename(os.path.join(scope, last_dir), os.path.join(fs.mnt, "moved-away"))
    os.symlink(secret, os.path.join(scope, last_dir))
    os.unlink(os.path.join(scope, swapped_link))
    os.symlink("/etc/passwd", os.path.join(scope, swapped_link))
    os.unlink(os.path.join(scope, swapped_fifo))
    os.mkfifo(os.path.join(scope, swapped_fifo))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    log = duet.hex_log()
    read = {d for _, _, d in log}
    with open("/etc/passwd", "rb") as fh:
        assert sha256(fh.read()) not in read
    assert not read & {sha256(s) for s in secrets}, "read through the swapped-in symlink"
    assert {p.decode() for _, p, _ in log} == set(order[:-5])
    assert read == {sha256(mine[p]) for p in order[:-5]}
    assert summary_of(proc_result(out))["tasks"]["slowhex"]["counters"]["vanished"] == 5


def proc_result(out: str):
    return subprocess.CompletedProcess([], 0, out, "")


def _calls(tree: ast.AST):
    """(call, owner module, function name) of every call, through imports: ``subprocess.run``, ``sp.run`` after
    ``import subprocess as sp``, ``r`` after ``from subprocess import run as r``."""
    modules: dict[str, str] = {}        # local name -> module, for "import os" / "import subprocess as sp"
    functions: dict[str, tuple[str, str]] = {}   # local name -> (module, name), for "from os import system"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                modules[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                functions[a.asname or a.name] = (node.module, a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                yield node, modules.get(f.value.id, f.value.id), f.attr
            elif isinstance(f, ast.Name) and f.id in functions:
                yield node, *functions[f.id]
            else:
                yield node, "", f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def _shell_uses(source: str, path: str = "<source>") -> tuple[list[str], int]:
    """Where ``source`` could run a shell or a string command, and how many processes it starts with an argv."""
    found, spawns = [], 0
    for node, owner, name in _calls(ast.parse(source, path)):
        where = f"{path}:{node.lineno}"
        if owner == "os" and name in ("system", "popen", "execl", "execlp", "spawnl"):
            found.append(f"{where}: os.{name}")
        if owner == "subprocess" and name in ("getoutput", "getstatusoutput"):
            found.append(f"{where}: subprocess.{name}")
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and not kw.value.value):
                found.append(f"{where}: shell=")
        if owner == "subprocess" and name in ("run", "Popen", "call", "check_call", "check_output"):
            spawns += 1
            first = node.args[0] if node.args else None
            if isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                found.append(f"{where}: a string command")
    return found, spawns


def test_no_path_ever_goes_through_a_shell():
    """Every process duet starts gets an argv list: no shell=True, no os.system/popen, no string command."""
    sources = glob.glob(os.path.join(ROOT, "duet_core", "**", "*.py"), recursive=True)
    sources += glob.glob(os.path.join(ROOT, "plugins", "**", "*.py"), recursive=True)
    sources += glob.glob(os.path.join(ROOT, "examples", "**", "*.py"), recursive=True)
    assert len(sources) > 20
    spawns = 0
    for path in sources:
        with open(path) as fh:
            found, n = _shell_uses(fh.read(), os.path.relpath(path, ROOT))
        assert not found, found
        spawns += n
    assert spawns > 0


@pytest.mark.parametrize("source", [
    "import subprocess\nsubprocess.run('ls ' + p)",
    "import subprocess as sp\nsp.run(['ls'], shell=True)",
    "from subprocess import run as r\nr(f'ls {p}')",
    "from subprocess import check_output\ncheck_output(cmd, shell=flag)",
    "from os import system\nsystem(p)",
    "import os\nos.popen(p)",
])
def test_the_shell_check_sees_through_imports(source):
    assert _shell_uses(source)[0], source


def test_shell_metacharacters_in_scope_paths_do_nothing(duet, tmp_path):
    scope = tmp_path / "$(touch pwned1); `touch pwned2` && touch pwned3 | x"
    scope.mkdir()
    (scope / "$(touch pwned4)").write_bytes(b"x" * 100)
    proc = subprocess.run(duet.argv("run", "hexer", "--path", str(scope), "--json"), capture_output=True,
                          text=True, timeout=60, env=duet.env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert duet.hex_counts() == {b"$(touch pwned4)": 1}
    assert not glob.glob(str(tmp_path / "pwned*")) and not glob.glob(os.path.join(ROOT, "pwned*"))


@pytest.mark.parametrize("craft", ["{scope}/../scope", "{scope}//", "{scope}/./", "{scope}/sub/..", "{link}",
                                   "{fs}/outside/../scope"])
def test_a_crafted_scope_path_does_not_widen_the_kernel_filter(bpf_required, fs, craft):
    """Events of a file beside the scope (same filesystem, same subvolume) never reach a registration, whatever
    spelling of the scope's path it was made with."""
    scope = os.path.join(fs.mnt, "scope")
    inside = os.path.join(scope, "sub", "in")
    outside = os.path.join(fs.mnt, "outside", "out")
    for path in (inside, outside):
        write(path, os.urandom(64 << 10))
        fsimage.drop_file_cache(path)
    os.symlink(scope, os.path.join(fs.mnt, "link"))
    path = craft.format(scope=scope, link=os.path.join(fs.mnt, "link"), fs=fs.mnt)
    with Engine(source="bpf") as engine:
        reg = engine.register("t", Event.ADDED, path)
        engine.fetch(reg)
        for p in (outside, inside):
            subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
        seen: set = set()
        deadline = time.monotonic() + 10
        while file_id(inside) not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            batch = engine.fetch(reg)
            seen |= {item.fid for item in batch.items}
            for item in batch.items:
                assert engine.path_of(reg, item.fid).startswith(scope + "/"), engine.path_of(reg, item.fid)
        assert file_id(inside) in seen
        assert file_id(outside) not in seen


def test_state_is_private_whatever_the_umask(duet, tmp_path):
    scope = tmp_path / "scope"
    scope.mkdir()
    (scope / "a").write_bytes(b"a")
    env = dict(duet.env)
    for args in (["run", "hexer", "--path", str(scope)], ["state", "reset", "--path", str(scope), "--yes"]):
        proc = subprocess.run(duet.argv(*args), capture_output=True, text=True, timeout=60, env=env,
                              preexec_fn=lambda: os.umask(0))
        assert proc.returncode == 0, proc.stderr
    state = duet.state
    dirs = [state, state / "locks"]
    files = [*state.glob("state.db*"), *(state / "locks").iterdir()]
    assert len(files) >= 3       # the database, its copy before the reset, a lock
    assert {p: stat.S_IMODE(os.stat(p).st_mode) for p in dirs} == dict.fromkeys(dirs, 0o700)
    assert {p: stat.S_IMODE(os.stat(p).st_mode) for p in files} == dict.fromkeys(files, 0o600)


EVIL = textwrap.dedent('''
    import os
    open(os.environ["DUET_EVIL_MARKER"], "w").write("imported")

    from duet_core import TaskSpec, hookimpl


    class Evil:
        @hookimpl
        def duet_task(self):
            return TaskSpec("evil", "planted in a scope")


    plugin = Evil()
''')


def test_plugins_planted_in_the_scope_are_never_loaded(duet, tmp_path):
    scope = tmp_path / "scope"
    info = scope / "duet_evil-1.0.dist-info"
    info.mkdir(parents=True)
    (scope / "duet_evil.py").write_text(EVIL)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: duet-evil\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[duet.tasks]\nevil = duet_evil:plugin\n")
    (scope / "sitecustomize.py").write_text(EVIL)
    marker = tmp_path / "imported"
    env = dict(duet.env, DUET_EVIL_MARKER=str(marker))
    before = tree_snapshot(scope)
    console_script = os.path.join(os.path.dirname(sys.executable), "duet")
    for argv in ([console_script], [sys.executable, "-m", "duet_core.cli.main"]):
        for args in (["plugins", "--json"], ["run", "hexer", "--path", str(scope), "--config", str(duet.config),
                                              "--json"]):
            proc = subprocess.run(argv + args, capture_output=True, text=True, timeout=60, env=env, cwd=scope)
            assert proc.returncode == 0, (argv, args, proc.stderr)
            assert "evil" not in proc.stdout.replace("duet_evil", "") and "evil" not in proc.stderr, proc.stderr
            assert not marker.exists(), (argv, args)
    assert tree_snapshot(scope) == before
