"""What a task plugin declares and what it is handed: the types named in :mod:`duet_core.hookspecs`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from duet_core.errors import Stopped
from duet_core.events import PAGE_SIZE, Event, FileId
from duet_core.exclude import NOTHING, Exclusions

Granularity = Literal["file", "range"]
OPTION_TYPES = ("str", "int", "float", "bool", "size", "duration", "path")


@dataclass(frozen=True)
class TaskOption:
    """One option of a task, set in the config (``[task.NAME]``), with ``-o NAME.KEY=VALUE`` or ``--KEY VALUE``.

    ``type`` is one of ``str int float bool size duration path``: sizes ("50MB") and durations ("30d") are parsed
    by duet, so every task reads them the same way; a ``path`` must be absolute.
    """

    name: str
    type: str = "str"
    default: Any = None
    required: bool = False
    help: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """A task's declaration (returned by ``duet_task``).

    ``events``: what the task wants to hear while it runs (``Event.EXISTS`` to be scheduled cache-first; add
    ``Event.MODIFIED`` to have a file that is written during the run queued again; ``Event.ADDED`` with
    ``granularity="range"`` to be told of pages foreground programs read, through ``duet_observe``).
    ``granularity``: ``"file"`` — an item is a whole file; ``"range"`` — an item is a page range of a file, and
    progress is kept per page.
    ``reads_data``: whether the task reads the contents of the files it is handed (True: backup, scrub, hashing).
    False for a task that mostly looks at metadata and reads only some files itself (defrag: FIEMAP for every
    file, the data only of those it rewrites): the run then reads no file ahead for it alone, which would bring in
    data the task never looks at.
    """

    name: str
    description: str
    events: Event = Event.EXISTS
    granularity: Granularity = "file"
    options: tuple[TaskOption, ...] = ()
    reads_data: bool = True
    # The plugin API this task was built for. Left out, it means 1, the first: the default never follows
    # API_VERSION, so a plugin that omits it is refused, not silently accepted, once the API changes.
    api_version: int = 1


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A regular file of the scope as the last scan saw it. ``id`` is compact and stable within the scope."""

    id: int
    fid: FileId
    relpath: str
    size: int
    mtime_ns: int
    ctime_ns: int

    @property
    def pages(self) -> int:
        return (self.size + PAGE_SIZE - 1) // PAGE_SIZE


def _never() -> bool:
    return False


def _no_wait() -> None:
    return None


@dataclass
class RunInfo:
    """One run of duet over one scope, as a task sees it.

    ``files()`` iterates over every regular file of the scope as the last scan saw it — not only the batch
    ``duet_plan`` is handed — for tasks that relate files to each other (deduplication groups them by size), also on
    a resumed round, where ``duet_plan`` sees only the files new to the scope.

    ``release_cached(file_id)`` lets go of a file kept cached with ``ItemResult(keep_cached=True)`` before the end of
    the run: the pages the run brought in are evicted now (cache hygiene), not at the end.

    ``one_file_system`` and ``exclude`` say what of the tree below ``root`` is the scope: a task that walks the tree
    itself (backup's sync pass) must leave out what they leave out — directories on other filesystems than the
    root's (nested btrfs subvolumes are the same filesystem), and every entry ``exclude.excluded(relpath, name,
    is_dir)`` is true for, without entering an excluded directory — as the scan did.

    ``stopping()`` is True once the run was asked to stop (SIGTERM, SIGINT; SIGHUP for ``duet watch``) — not when
    a ``--for`` budget runs out, which only stops the run between items. ``checkpoint()`` raises
    :class:`~duet_core.errors.Stopped` then: call it in long loops of ``duet_plan`` and ``duet_finish`` (a sync
    pass over a large tree) so a stop is honoured within a second; a ``duet_finish`` of a stopped run should
    publish nothing that takes long (the next run resumes).
    """

    run_id: int
    root: str
    task: str
    options: dict[str, Any]
    mode: Literal["run", "watch"] = "run"
    round: int = 1
    state: "TaskState | None" = None
    shared: "SharedResults | None" = None
    files: "Callable[[], Iterator[FileInfo]] | None" = None
    release_cached: "Callable[[int], None] | None" = None
    stopping: Callable[[], bool] = _never
    one_file_system: bool = False
    exclude: Exclusions = NOTHING

    def checkpoint(self) -> None:
        """Raise :class:`~duet_core.errors.Stopped` if the run is stopping; return at once otherwise."""
        if self.stopping():
            raise Stopped("the run is stopping")


class TaskState:
    """A task's own persistent key-value store (values are bytes or JSON-able), kept in duet's state database.

    ``get(key, default=None)``, ``put(key, value)``, ``delete(key)``; ``get_many(keys)`` returns ``{key: value}`` for
    those of ``keys`` that are set, in a few queries instead of one per key (a plan over thousands of files)."""

    def __init__(self, get: Callable, put: Callable, delete: Callable, get_many: Callable | None = None):
        self.get, self.put, self.delete = get, put, delete
        self.get_many = get_many or (lambda keys: {k: v for k in keys if (v := get(k)) is not None})


class SharedResults:
    """Results tasks publish per file *version* (file id + size + mtime + ctime) for other tasks to reuse.

    ``get(file, name)`` returns a value only if it was computed for this very version of the file, so a task can
    trust a hash another task computed instead of reading the file again.
    """

    def __init__(self, get: Callable, put: Callable):
        self.get, self.put = get, put


@dataclass
class Progress:
    """What a task reports while it works on an item. Bytes it does not report are inferred by duet."""

    processed: int = 0
    from_device: int | None = None

    def advance(self, nbytes: int, from_device: int | None = None) -> None:
        """``nbytes`` more of the item processed; ``from_device`` of them read from the device, if the task knows
        (a task reading with O_DIRECT must say; otherwise duet measures the page cache before and after)."""
        self.processed += nbytes
        if from_device is not None:
            self.from_device = (self.from_device or 0) + from_device


@dataclass
class ItemContext:
    """One item handed to ``duet_process``: a file (or page ranges of it), already open, inside the scope."""

    run: RunInfo
    file: FileInfo
    path: str
    fd: int
    ranges: list[tuple[int, int]]        # (first page, count) to process now; for file tasks: the whole file
    cached: list[tuple[int, int]]        # page ranges resident in the page cache when the item was handed over
    state: TaskState
    shared: SharedResults
    progress: Progress = field(default_factory=Progress)
    # Of ``cached``, the ranges this run itself read into the cache for this item (the scheduler's prefetch, a task
    # handed the file before this one, or with --jobs 2 the run's leading process): read from the device moments
    # ago, so as good as a device read (a checksumming filesystem verified them) — unlike pages that were cached
    # before, perhaps long ago.
    fresh: list[tuple[int, int]] = field(default_factory=list)
    # True: read nothing from the device for this item now — `duet watch`, a run waiting while other programs read
    # the scope (idle I/O), or the second process of --jobs 2 while the first reads. ``ranges`` are then cached
    # pages only (range tasks), or a wholly cached file. A task that cannot do its work on them alone returns
    # ItemResult(done=False): not now, and the item stays pending.
    cached_only: bool = False
    # Set by the scheduler: waits while the run's device reads are ahead of --rate-limit (see checkpoint).
    pace: Callable[[], None] = field(default=_no_wait, repr=False)

    @property
    def options(self) -> dict[str, Any]:
        return self.run.options

    def stopping(self) -> bool:
        """True once the run was asked to stop (SIGTERM, SIGINT): an item that is not finished should give up."""
        return self.run.stopping()

    def checkpoint(self) -> None:
        """Call between the chunks of a long item (every MiB or so). It returns at once as a rule; it waits while
        the run is ahead of ``--rate-limit`` (so one large file is read at the rate too, not at full speed and then
        a long pause), and raises :class:`~duet_core.errors.Stopped` when the run is stopping: the item is then
        neither done nor failed, and the next run does it again. Clean up in ``finally`` (a temporary file)."""
        self.run.checkpoint()
        self.pace()
        self.run.checkpoint()

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)


@dataclass
class ItemResult:
    """What ``duet_process`` may return instead of ``None`` (None means: done)."""

    done: bool = True                    # False: not done, try again in a later round (e.g. changed meanwhile)
    damaged: bool = False                # the task found damage in the data (a scrub: corruption); `duet run` exits 6
    counters: dict[str, int] = field(default_factory=dict)   # added to the task's report
    message: str | None = None           # one line for the log
    # True: the task will need this file's data again later in the run (deduplication: the file is the one its
    # twins, still to come, are compared with). What the run read of it stays cached — within a bound, the rest is
    # evicted as usual — until RunInfo.release_cached(file id) or the end of the run.
    keep_cached: bool = False


@dataclass
class PassResult:
    """What ``duet_device_pass`` returns when it did the task's pending files its own way."""

    done: Iterable[int] = ()             # ids of the files now done, whole (others stay pending, item by item)
    from_device: int = 0                 # bytes the pass read from the device, also beyond the scope's files
    counters: dict[str, int] = field(default_factory=dict)   # added to the task's report
    message: str | None = None           # one line for the log


@dataclass
class TaskReport:
    """A task's totals for one run, handed to ``duet_finish``."""

    task: str
    items_total: int = 0
    items_done: int = 0
    items_failed: int = 0
    items_damaged: int = 0               # items whose data the task found damaged (ItemResult.damaged); exit code 6
    bytes_processed: int = 0
    bytes_from_cache: int = 0
    bytes_from_device: int = 0
    complete: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)   # what duet_finish returned

    def as_dict(self) -> dict[str, Any]:
        return {"items_total": self.items_total, "items_done": self.items_done, "items_failed": self.items_failed,
                "items_damaged": self.items_damaged,
                "bytes_processed": self.bytes_processed, "bytes_from_cache": self.bytes_from_cache,
                "bytes_from_device": self.bytes_from_device, "complete": self.complete,
                "counters": dict(self.counters), "errors": self.errors[:20], **self.extra}
