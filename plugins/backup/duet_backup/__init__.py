"""duet's backup task: a complete, browsable snapshot of the scope at the target on every run.

``duet run backup --path /home --target /mnt/backup``: changed files are copied cached files first (sharing each
device read with the other tasks of the run), hashed with blake3, made durable in batches and renamed into place;
``duet_finish`` brings the rest of the tree up to date and publishes the snapshot atomically. How:
:mod:`duet_backup.task`; the target's layout: :mod:`duet_backup.target`; ``duet snapshots`` and ``duet restore``:
:mod:`duet_backup.commands`.

This module is imported at every ``duet`` start (through the ``duet.tasks`` entry point), also by commands that
never run a backup (``duet status``, ``duet plugins``): it declares the task and nothing else, and the hooks import
the machinery (blake3, threads, the copy and tree code) on their first call.
"""

from __future__ import annotations

from duet_core import TaskOption, TaskSpec, hookimpl

__version__ = "0.1.0"


class Backup:
    """The backup task's hooks; each forwards to :class:`duet_backup.task.BackupTask`, created on first use."""

    def __init__(self) -> None:
        self._impl = None

    @property
    def impl(self):
        if self._impl is None:
            from duet_backup.task import BackupTask

            self._impl = BackupTask()
        return self._impl

    @hookimpl
    def duet_task(self) -> TaskSpec:
        return TaskSpec("backup", "complete snapshots of the scope at --target (btrfs snapshots or hard-link trees)",
                        options=(TaskOption("target", "path", required=True,
                                            help="where snapshots go: TARGET/snapshots/<UTC time>/"),),
                        api_version=1)

    @hookimpl
    def duet_check(self, root, options):
        from duet_backup.target import check_target

        check_target(options["target"], scope=root)   # bad input refuses the run before anything is written

    @hookimpl
    def duet_plan(self, run, files):
        return self.impl.plan(run, files)

    @hookimpl
    def duet_process(self, ctx):
        return self.impl.process(ctx)

    @hookimpl
    def duet_finish(self, run, report):
        return self.impl.finish(run, report)


plugin = Backup()
