"""The contract between duet and a task plugin: every hook a task may implement, documented hook by hook.

A task plugin is one object (a module or a class instance) published under the entry-point group ``duet.tasks``::

    [project.entry-points."duet.tasks"]
    checksum = "duet_checksum:plugin"

It implements ``duet_task`` and ``duet_process``, and any of the others, each marked with :data:`hookimpl` (import
it from ``duet_core``). duet loads each task into its own plugin manager, so a hook call always goes to exactly one
task and no implementation needs to check which task it is. Call-sites pass keyword arguments only, and an
implementation may accept fewer arguments than the spec names, so hooks can grow without breaking plugins.

:data:`API_VERSION` changes when a hook changes incompatibly; a task declaring another ``api_version`` in its
:class:`~duet_core.tasks.TaskSpec` is refused with a clear line. Set ``DUET_TRACE_PLUGINS=1`` to log every hook call.

Order of calls in one run::

    duet_task            once, when the plugin is loaded
    duet_check           once per scope, before anything is opened or written (bad options refuse the run)
    duet_plan            at the start of a round, batch by batch over the scope's files
    duet_observe         whenever pages of a still-pending file saw the task's events (range tasks)
    duet_device_pass     at most once per run, once only this task still needs files read from the device
    duet_process         once per item, cache-first, shared with the other tasks of the run
    duet_finish          once, at the end of a run whose duet_plan was called (also when it stopped early)

A stop (SIGTERM, SIGINT) is honoured within a second: a task's long loops call ``ctx.checkpoint()`` (items) or
``run.checkpoint()`` (planning, finishing), which raise :class:`~duet_core.errors.Stopped` once the run is stopping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pluggy

from duet_core.tasks import FileInfo, ItemContext, ItemResult, PassResult, RunInfo, TaskReport, TaskSpec

PROJECT = "duet"
API_VERSION = 1
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------------------------- declaring
@hookspec(firstresult=True)
def duet_task() -> TaskSpec | None:
    """Declare the task this plugin provides.

    :returns: the task's :class:`~duet_core.tasks.TaskSpec`: name, one-line description, the events it wants,
        its granularity (``"file"`` or ``"range"``) and its options. Stops at the first non-None result.

    Called once when duet loads the plugin (``duet plugins``, ``duet run``). A plugin that raises here or returns
    None is reported by name and skipped.
    """


# ----------------------------------------------------------------------------------------------------- planning
@hookspec
def duet_check(root: str, options: dict[str, Any]) -> None:
    """Check this task's options for a scope before duet opens or writes anything (the state database included).

    :param root: the scope's real path.
    :param options: the task's options, already parsed by type (see :class:`~duet_core.tasks.TaskOption`).
    :returns: nothing (a return value is ignored).

    Raise :class:`~duet_core.errors.DuetError` for input no run could use — a target that is not a directory, or
    inside the scope; a count out of range — and the run is refused with one line and the error's exit code,
    leaving no trace. Checks that need the state or the scope's files belong in ``duet_plan``. Called by
    ``duet run`` and ``duet watch`` for every task of every scope before the first run starts.
    """


@hookspec(firstresult=True)
def duet_plan(run: RunInfo, files: Sequence[FileInfo]) -> Iterable[int] | None:
    """Choose which files of the scope need this task in the round that starts.

    :param run: the run: scope root, the task's options, its state store (``run.state``) and the shared results
        (``run.shared``).
    :param files: one batch of the scope's regular files (a few thousand at a time).
    :returns: the ``FileInfo.id`` of every file in ``files`` that needs work, or None for all of them. Stops at the
        first non-None result.

    Called at the start of a round — the first run, or a run after the previous round completed — over every file,
    and on a resumed round only for files new to the scope. A backup returns the files changed since its last
    snapshot; a scrub those not verified within its period. Every run calls it at least once, with an empty batch
    if no file is new: raising :class:`~duet_core.errors.DuetError` there refuses the whole run (bad options, an
    unusable target) with one line and the error's exit code, before any file is processed. A run stopped (SIGTERM,
    SIGINT) before or while it plans calls no further batch, and keeps nothing of this planning: the next run plans
    those files again.
    """


# ------------------------------------------------------------------------------------------------------ running
@hookspec(firstresult=True)
def duet_observe(run: RunInfo, file: FileInfo, added: Sequence[tuple[int, int]]) -> Iterable[tuple[int, int]] | None:
    """Pages of a file this task still needs were brought into the page cache by someone else (a foreground read).

    :param run: the run.
    :param file: the file.
    :param added: page ranges ``(first, count)`` ADDED to the cache by reads (not writes) since the last call.
    :returns: page ranges that are now done without processing — a btrfs scrub counts pages the kernel read (and
        so verified against their checksums) as scrubbed — or None. Stops at the first non-None result.

    Called only for tasks with ``granularity="range"`` whose spec asks for ``Event.ADDED``, during ``duet run`` and
    ``duet watch``.
    """


@hookspec(firstresult=True)
def duet_device_pass(run: RunInfo, pending: Callable[[], Iterator[FileInfo]], give_way: Callable[[], bool],
                     progress: Callable[[int], None]) -> PassResult | None:
    """Do the task's pending files in one pass of its own instead of file by file — or decline (return None).

    :param run: the run.
    :param pending: iterates over the files this task still needs (as scanned), each time it is called.
    :param give_way: True once the pass should end early: the ``--for`` budget ran out, or other programs began
        reading the scope (idle I/O: the run leaves them the device). Poll it, with ``run.checkpoint()`` (a stop),
        every tenth of a second or so.
    :param progress: bytes verified (or otherwise done) so far, for the progress display; call it as often as
        convenient.
    :returns: a :class:`~duet_core.tasks.PassResult`: the ids of the files now done (the others stay pending and
        are handed to ``duet_process`` as usual), the bytes the pass read from the device, counters, a message. Or
        None: the pass was declined and every file goes through ``duet_process``. Stops at the first non-None
        result.

    Called at most once per ``duet run`` (never in ``duet watch``), when the run is about to read an uncached file
    from the device and this task is the only one still needing any — from the start, or once the other tasks are
    done with theirs (a nightly backup of a few changed files, then a scrub whose period came round): no other
    task could share its reads. Not with ``--rate-limit`` (a pass of its own cannot be paced), and not while other
    programs read the scope. The files the run found cached were handed to ``duet_process`` before, and so were
    the uncached files the other tasks need (read once for all of them). A btrfs scrub uses it to let the kernel
    verify a cold filesystem in device order (``BTRFS_IOC_SCRUB``), which reads many times faster than a tree of
    small files is read one by one; a pass that found errors may return no file done, so that ``duet_process``
    names the damaged files. A pass ended by ``give_way`` returns what it finished; one ended by
    :class:`~duet_core.errors.Stopped` counts nothing done — save what the next run needs to resume in
    ``run.state`` before letting it propagate.
    """


@hookspec(firstresult=True)
def duet_process(ctx: ItemContext) -> ItemResult | None:
    """Process one item: a whole file, or (range tasks) the page ranges in ``ctx.ranges``.

    :param ctx: the item: ``ctx.file`` (id, FileId, size, times), ``ctx.path``, ``ctx.fd`` (open read-only, never
        through a symlink, inside the scope), ``ctx.ranges`` to process, ``ctx.cached`` (resident ranges),
        ``ctx.fresh`` (those of them this run read from the device for this item), ``ctx.cached_only`` (read
        nothing from the device now: ``duet watch``, a run waiting while other programs read the scope, or the
        second process of ``--jobs 2`` while the first reads),
        ``ctx.state`` (the task's own store), ``ctx.shared`` (results per file version), ``ctx.progress``
        (``advance(nbytes, from_device=None)``), and ``ctx.checkpoint()`` / ``ctx.stopping()`` for long items.
    :returns: None when the item is done, or an :class:`~duet_core.tasks.ItemResult` (``done=False`` to retry it in
        a later round — or, for a ``cached_only`` item, later in this run, when more is cached; counters for the
        report; ``damaged=True`` when the task found damage in the data, e.g. a scrub's corruption, which makes
        ``duet run`` exit 6; ``keep_cached=True`` when the task will read this file again later in the run — the
        pages the run brought in then stay cached, within a bound, until ``run.release_cached(file id)`` or the end
        of the run). Stops at the first non-None result.

    Called once per item. Items with the most cached pages come first; an item that must be read from the device
    is handed to every task that needs it, one after the other, while it is in the cache. An exception fails this
    item only: it is logged with the task's name and counted, and the run goes on.

    A long item (a large file) calls ``ctx.checkpoint()`` between its chunks, every MiB or so: it waits there while
    the run is ahead of ``--rate-limit``, and raises :class:`~duet_core.errors.Stopped` once the run is asked to
    stop (SIGTERM, SIGINT). Let it propagate (clean up in ``finally``): the item is then neither done nor failed,
    the next run hands it over again, and this run ends within a second of the signal. A task that never calls it
    delays the stop until its item is done.
    """


@hookspec(firstresult=True)
def duet_finish(run: RunInfo, report: TaskReport) -> dict[str, Any] | None:
    """Finish the run: publish what was built (a snapshot, a report of corrupt files) and add to the report.

    :param run: the run.
    :param report: the task's totals so far; ``report.complete`` says whether every planned item is done. A task
        that found damage outside ``duet_process`` (say, while planning) raises ``report.items_damaged``: any
        damaged item makes ``duet run`` exit 6.
    :returns: extra keys for this task's entry in the run summary (``duet run --json``), or None. Stops at the first
        non-None result.

    Called once per run in which ``duet_plan`` was called, also when the run stopped early (budget, SIGTERM);
    not after a crash. After a stop (``run.stopping()``: SIGTERM, SIGINT) it must be quick: publish nothing that
    takes long (a backup's sync pass), leave it to the next run, and call ``run.checkpoint()`` in any long loop
    (it raises :class:`~duet_core.errors.Stopped`, which ends this hook without counting as a failure).
    """
