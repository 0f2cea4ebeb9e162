"""Task plugins installed "for real" for the tests, and the data sets they run over.

:func:`install` writes each :class:`Dist` into a fresh ``site`` directory — its modules plus a
``NAME-VERSION.dist-info/`` with ``METADATA`` and an ``entry_points.txt`` in the ``duet.tasks`` group — and returns an
environment whose ``PYTHONPATH`` starts there. ``python -m duet_core.cli.main plugins/run/...`` started with that
environment finds the tasks through ``importlib.metadata`` entry points, exactly as it finds installed plugins; none
of them is known to duet by name.

Ready-made plugins (the sources are plain strings, so the same code runs in-process through :func:`load_source`):

* :data:`TASKS_MODULE` defines ``ReaderTask``: it reads every byte it is handed, optionally sleeps, and appends
  ``"<task> <relpath> <cached>/<pages>\\n"`` to a log (option ``log``, else ``$DUET_TEST_LOG``; one ``O_APPEND``
  write per line) so a test can count how often each file was processed and whether it was cached when handed over.
  :func:`tasks_dist` publishes any number of them (a "slow" variant is just ``ReaderTask('slow', sleep=0.2)``).
* :func:`broken_import_dist`: an entry point whose module fails to import.
* :func:`raising_task_dist`: a plugin whose ``duet_task`` raises.
* :func:`api_mismatch_dist` and :func:`misspelled_hook_dist`: plugins duet must refuse when loading them.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import mmap
import os
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

from duet_core import testing

GROUP = "duet.tasks"
LOG_ENV = "DUET_TEST_LOG"

TASKS_MODULE = textwrap.dedent('''
    """duet test tasks: read every byte of each item, log one line per item."""

    import os
    import time

    from duet_core import Event, TaskOption, TaskSpec, hookimpl

    PAGE = 4096


    def log_line(path, line):
        if not path:
            return
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


    class ReaderTask:
        """Reads every byte it is handed; sleeps ``sleep`` s per item; logs "<task> <relpath> <cached>/<pages>"."""

        def __init__(self, name, sleep=0.0, events=Event.EXISTS, description=None, api_version=None, fail=""):
            self.name = name
            self.sleep = sleep
            self.events = events
            self.api_version = api_version
            self.fail = fail
            self.description = description or f"test task {name}: reads every byte and logs each file"

        @hookimpl
        def duet_task(self):
            extra = {} if self.api_version is None else {"api_version": self.api_version}
            return TaskSpec(self.name, self.description, events=self.events, options=(
                TaskOption("log", "path", help="append one line per file here (default $DUET_TEST_LOG)"),
                TaskOption("sleep", "duration", default=self.sleep, help="sleep this long after each file"),
                TaskOption("fail", "str", default=self.fail, help="raise on files whose path contains this"),
                TaskOption("chunk", "size", default=1 << 20, help="read size"),
                TaskOption("verbose", "bool", default=False),
                TaskOption("limit", "int", default=0),
                TaskOption("ratio", "float", default=1.0),
            ), **extra)

        @hookimpl
        def duet_process(self, ctx):
            opts = ctx.options
            if opts.get("fail") and opts["fail"] in ctx.file.relpath:
                raise RuntimeError(f"{self.name} refuses {ctx.file.relpath}")
            cached = set()
            for first, count in ctx.cached:
                cached.update(range(first, first + count))
            wanted = 0
            chunk = opts.get("chunk") or (1 << 20)
            for first, count in ctx.ranges:
                wanted += len(cached.intersection(range(first, first + count)))
                off, end = first * PAGE, min(ctx.file.size, (first + count) * PAGE)
                while off < end:
                    data = os.pread(ctx.fd, min(chunk, end - off), off)
                    if not data:
                        break
                    off += len(data)
            if opts.get("sleep"):
                time.sleep(opts["sleep"])
            pages = sum(count for _, count in ctx.ranges)
            log_line(opts.get("log") or os.environ.get("DUET_TEST_LOG"),
                     f"{self.name} {ctx.file.relpath} {wanted}/{pages}\\n")

        @hookimpl
        def duet_finish(self, run, report):
            return {"options": dict(run.options), "finished_complete": report.complete}
''')


@dataclass
class Dist:
    """One distribution: its modules (name -> source) and its ``duet.tasks`` entry points (name -> "module:attr")."""

    name: str
    version: str
    modules: dict[str, str]
    entry_points: dict[str, str]
    summary: str = "duet test plugin"
    extra_groups: dict[str, dict[str, str]] = field(default_factory=dict)


def tasks_dist(tasks: dict[str, str] | None = None, name: str = "duet-test-tasks", version: str = "1.2.3",
               module: str = "duet_test_tasks") -> Dist:
    """A distribution of ReaderTask plugins: ``tasks`` maps a task (and entry-point) name to the expression that
    builds it, e.g. ``{"slow": "ReaderTask('slow', sleep=0.2)"}``. Default: ``reader`` and a ``slow`` reader."""
    tasks = tasks or {"reader": "ReaderTask('reader')", "slow": "ReaderTask('slow', sleep=0.2)"}
    attrs = {t: "task_" + re.sub(r"\W", "_", t) for t in tasks}
    source = TASKS_MODULE + "\n" + "".join(f"{attrs[t]} = {expr}\n" for t, expr in tasks.items())
    return Dist(name, version, {module: source}, {t: f"{module}:{attrs[t]}" for t in tasks})


def broken_import_dist(name: str = "duet-test-broken", task: str = "broken") -> Dist:
    """An entry point whose module cannot be imported."""
    src = "import duet_test_no_such_module  # noqa: F401\n\nplugin = object()\n"
    return Dist(name, "0.0.1", {"duet_test_broken": src}, {task: "duet_test_broken:plugin"})


def raising_task_dist(name: str = "duet-test-raiser", task: str = "raiser") -> Dist:
    """A plugin that imports fine but whose ``duet_task`` raises."""
    src = textwrap.dedent('''
        from duet_core import hookimpl


        class Raiser:
            @hookimpl
            def duet_task(self):
                raise RuntimeError("raiser cannot declare itself")

            @hookimpl
            def duet_process(self, ctx):
                return None


        plugin = Raiser()
    ''')
    return Dist(name, "0.0.2", {"duet_test_raiser": src}, {task: "duet_test_raiser:plugin"})


def api_mismatch_dist(name: str = "duet-test-future", task: str = "future") -> Dist:
    """A reader built for plugin API 99."""
    src = TASKS_MODULE + f"\nplugin = ReaderTask({task!r}, api_version=99)\n"
    return Dist(name, "9.9.9", {"duet_test_future": src}, {task: "duet_test_future:plugin"})


def misspelled_hook_dist(name: str = "duet-test-typo", task: str = "typo") -> Dist:
    """A plugin that marks ``duet_proces`` (sic) as a hook implementation."""
    src = textwrap.dedent(f'''
        from duet_core import TaskSpec, hookimpl


        class Typo:
            @hookimpl
            def duet_task(self):
                return TaskSpec({task!r}, "misspells a hook")

            @hookimpl
            def duet_proces(self, ctx):
                return None


        plugin = Typo()
    ''')
    return Dist(name, "0.0.3", {"duet_test_typo": src}, {task: "duet_test_typo:plugin"})


def _dist_dir_name(dist: Dist) -> str:
    return f"{re.sub(r'[-_.]+', '_', dist.name)}-{dist.version}.dist-info"


def install(directory: str | os.PathLike, *dists: Dist, log: str | None = None) -> dict[str, str]:
    """Install ``dists`` under ``directory/site``; return ``os.environ`` plus PYTHONPATH (and $DUET_TEST_LOG)."""
    site = os.path.join(os.fspath(directory), "site")
    os.makedirs(site, exist_ok=True)
    for dist in dists:
        for module, source in dist.modules.items():
            with open(os.path.join(site, module + ".py"), "w") as fh:
                fh.write(source)
        info = os.path.join(site, _dist_dir_name(dist))
        os.makedirs(info, exist_ok=True)
        with open(os.path.join(info, "METADATA"), "w") as fh:
            fh.write(f"Metadata-Version: 2.1\nName: {dist.name}\nVersion: {dist.version}\nSummary: {dist.summary}\n")
        groups = {GROUP: dist.entry_points, **dist.extra_groups}
        with open(os.path.join(info, "entry_points.txt"), "w") as fh:
            for group, eps in groups.items():
                fh.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n")
        with open(os.path.join(info, "RECORD"), "w") as fh:
            fh.write("")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
    env.pop(LOG_ENV, None)
    if log:
        env[LOG_ENV] = log
    env.pop("DUET_TRACE_PLUGINS", None)
    return env


def site_dir(env: dict[str, str]) -> str:
    """The site directory :func:`install` put first on the environment's PYTHONPATH."""
    return env["PYTHONPATH"].split(os.pathsep)[0]


def load_source(source: str, name: str = "duet_test_inprocess") -> types.ModuleType:
    """Execute a plugin module's source in-process (a fresh module object, not put in sys.modules)."""
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)  # noqa: S102 - our own test source
    return module


def duet_argv(*args: str) -> list[str]:
    """The command line of ``duet ARGS`` run from this interpreter (the venv, where duet is installed)."""
    return [sys.executable, "-m", "duet_core.cli.main", *args]


# -- logs --------------------------------------------------------------------------------------------------------------
class CliRunner:
    """``duet`` as a subprocess for tests: its own state directory, an empty config (never /etc/duet/duet.toml),
    optional test plugins (``dists``), and the processes it started, killed by :meth:`cleanup`.

    ``config_for``: the commands given ``--config`` (None: every command), unless they name one themselves.
    ``log``: where the test plugins' ReaderTasks write (``$DUET_TEST_LOG``).
    """

    config_for: tuple[str, ...] | None = None

    def __init__(self, tmp_path, *dists: Dist, log: str | None = None):
        self.env = install(tmp_path / "plugins", *dists, log=log) if dists else dict(os.environ)
        self.state = tmp_path / "state"
        self.env["DUET_STATE_DIR"] = str(self.state)
        self.config = tmp_path / "empty.toml"
        self.config.write_text("")
        self.procs: list[subprocess.Popen] = []

    def argv(self, *args: str) -> list[str]:
        if "--config" not in args and (self.config_for is None or (args and args[0] in self.config_for)):
            args = (*args, "--config", str(self.config))
        return duet_argv(*args)

    def __call__(self, *args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                              env=env or self.env)

    def start(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)

    @classmethod
    def fixture(cls):
        """A ``duet`` pytest fixture: one runner of this class per test (BPF required), the processes it started
        killed afterwards. In a test module: ``duet = Duet.fixture()``."""
        import pytest

        @pytest.fixture(name="duet")
        def duet(tmp_path, bpf_required):
            runner = cls(tmp_path)
            try:
                yield runner
            finally:
                runner.cleanup()

        return duet


@dataclass(frozen=True)
class LogLine:
    task: str
    relpath: str
    cached: int      # pages of the item that were cached when it was handed over
    pages: int       # pages of the item


def read_log(path: str | os.PathLike) -> list[LogLine]:
    """Every line a ReaderTask appended to ``path`` (none if it does not exist yet)."""
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        task, relpath, frac = line.split(" ")
        cached, pages = frac.split("/")
        out.append(LogLine(task, relpath, int(cached), int(pages)))
    return out


def log_counts(path: str | os.PathLike) -> collections.Counter:
    """(task, relpath) -> how many times it was processed."""
    return collections.Counter((e.task, e.relpath) for e in read_log(path))


# -- data sets ---------------------------------------------------------------------------------------------------------
def make_dataset(root: str, n: int = 20, sizes: tuple[int, ...] = (64 << 10, 128 << 10, 256 << 10, 512 << 10),
                 subdir: str = "data") -> tuple[str, dict[str, int]]:
    """``n`` files of random data under ``root/subdir`` (in two directories), written, fsynced and evicted.

    Returns the scope path and {relpath: size}. File names sort in creation order (f00, f01, ...).
    """
    scope = os.path.join(root, subdir)
    files: dict[str, int] = {}
    for i in range(n):
        rel = f"{'ab'[i % 2]}/f{i:02d}"
        size = sizes[i % len(sizes)]
        path = os.path.join(scope, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(os.urandom(size))
            fh.flush()
            os.fsync(fh.fileno())
        files[rel] = size
    evict_tree(scope)
    return scope, files


evict = testing.evict_file          # write back and drop one file from the page cache
evict_tree = testing.evict_tree     # ... and every regular file under a directory
resident = testing.resident_pages   # how many pages of a file are in the page cache now


def pages(size: int) -> int:
    return (size + 4095) // 4096


# The kernel reclaims page cache on its own at moments no test controls (DAMON's pageout runs on these machines; full
# runs of the suite saw one page of 16 and one of 64 go). A check that pages the run must leave alone are still cached
# allows it this many; a run that evicted them would have dropped the whole file.
RECLAIM_SLACK = 4


def still_cached(path: str, size: int) -> bool:
    """Every page of the file is in the page cache, but for a few the kernel may have reclaimed (RECLAIM_SLACK)."""
    return resident(path) >= pages(size) - RECLAIM_SLACK


@contextlib.contextmanager
def pinned(*paths: str) -> Iterator[None]:
    """Keep every page of the files in the page cache while the block runs: each is mapped shared and locked in
    memory (``mlock``), which the kernel's own reclaim (DAMON's pageout) leaves alone, and unlocked after. For a test
    whose premise is a file wholly cached while another process rewrites it in place; pages added past the files'
    sizes now are not covered."""
    libc = ctypes.CDLL(None, use_errno=True)
    locked: list[tuple[mmap.mmap, int]] = []
    try:
        for path in paths:
            with open(path, "r+b") as fh:
                mm = mmap.mmap(fh.fileno(), 0)     # read-write and shared only because ctypes needs a writable buffer
            addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            locked.append((mm, addr))
            if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(mm))) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mlock {path}: {os.strerror(err)}")
        yield
    finally:
        for mm, addr in locked:
            libc.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(mm)))
            mm.close()


# -- other processes dropping the page cache ---------------------------------------------------------------------------
def cache_drops() -> int:
    """How often anyone wrote /proc/sys/vm/drop_caches since boot (``drop_pagecache`` in /proc/vmstat)."""
    with open("/proc/vmstat") as fh:
        for line in fh:
            if line.startswith("drop_pagecache "):
                return int(line.split()[1])
    return 0


def excused_by_cache_drops(test):
    """Decorator for a test whose checks rest on the page cache being left alone by everyone else: if it fails
    after another process dropped the caches (benchmarks on the same machine do), it is skipped, not failed.
    ``DUET_TEST_NO_EXCUSES=1`` turns this off, to see such failures."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        import pytest

        before = cache_drops()
        try:
            return test(*args, **kwargs)
        except (AssertionError, pytest.fail.Exception):
            if cache_drops() != before and not os.environ.get("DUET_TEST_NO_EXCUSES"):
                pytest.skip(f"{test.__name__}: another process dropped the page cache (drop_caches) meanwhile")
            raise

    return wrapper


def void_on_cache_drops(test):
    """Decorator for a test that means nothing if another process dropped the page cache meanwhile, pass or fail
    (an expected failure could pass because the caches were dropped): it is then skipped."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        import pytest

        before = cache_drops()
        try:
            result = test(*args, **kwargs)
        except BaseException:
            if cache_drops() != before:
                pytest.skip(f"{test.__name__}: another process dropped the page cache (drop_caches) meanwhile")
            raise
        if cache_drops() != before:
            pytest.skip(f"{test.__name__}: another process dropped the page cache (drop_caches) meanwhile")
        return result

    return wrapper
