"""Prometheus metrics for node_exporter's textfile collector: one ``*.prom`` file per scope and mode.

A fleet runs duet from timers and watches it from one place: node_exporter (``--collector.textfile.directory``)
exports every ``*.prom`` file of a directory with the machine's other metrics. ``duet run`` and ``duet watch`` with
``--metrics-dir DIR`` (or ``metrics_dir`` in the config) write ``DIR/duet-<mode>-<scope>.prom`` while they work (at
most every :data:`WRITE_EVERY_S`) and when they end. Each file is replaced atomically — temp file, fsync, rename,
fsync of the directory — so the collector never reads half a file, and a crash leaves the previous one.

Every series carries ``scope`` and ``mode`` labels, so the files of several scopes, and of ``run`` next to
``watch`` on one scope, never collide (node_exporter refuses duplicate series). The reference is
docs/operations.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from duet_core.atomicfile import write_atomically
from duet_core.errors import DuetError

WRITE_EVERY_S = 15.0
log = logging.getLogger("duet.metrics")
LOST_PREFIX = "kernel_lost_"


def file_name(root: str, mode: str) -> str:
    """``duet-<mode>-<readable scope>-<hash>.prom``: readable, and unique even where two paths slug alike."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", root).strip("_")[:60] or "root"
    digest = hashlib.blake2b(root.encode(), digest_size=4).hexdigest()
    return f"duet-{mode}-{slug}-{digest}.prom"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


class _Text:
    """Prometheus text exposition format, metric family by family (HELP and TYPE once each)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        samples = list(samples)
        if not samples:
            return
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


def render(summary: Mapping[str, Any], mode: str, engine: Mapping[str, int] | None = None,
           last_success: Mapping[str, float] | None = None, exit_code: int | None = None,
           now: float | None = None) -> str:
    """The metrics of one run (finished, or so far) as Prometheus text.

    :param summary: the run summary (``duet run --json``), or one built from the reports so far.
    :param mode: ``"run"`` or ``"watch"``.
    :param engine: engine counters (``Engine.stats()``); summary["engine"] is used for what it lacks.
    :param last_success: task -> when it last finished a run complete without failed items (Unix time).
    :param exit_code: the run's exit code, once it has ended.
    """
    now = time.time() if now is None else now
    base = {"scope": summary["scope"], "mode": mode}
    stats = {**(engine or {}), **summary.get("engine", {})}
    tasks: Mapping[str, Mapping[str, Any]] = summary["tasks"]
    out = _Text()
    out.family("duet_run_info", "gauge", "The run: result (complete, running, watching, budget, SIGTERM, ...) and "
               "event source.", [({**base, "result": summary["result"], "source": summary.get("source", "")}, 1)])
    out.family("duet_run_updated_timestamp_seconds", "gauge", "When this file was written (Unix time).",
               [(base, round(now, 3))])
    out.family("duet_run_duration_seconds", "gauge", "How long the run has been going, or went.",
               [(base, summary.get("wall_s", 0.0))])
    if exit_code is not None:
        out.family("duet_run_exit_code", "gauge", "Exit code of the finished run (0 ok, 1 items failed "
                   "or parts of the scope unreadable, 5 stopped early, 6 damage found; docs/cli.md).",
                   [(base, exit_code)])
    out.family("duet_run_dataset_bytes", "gauge", "Bytes in the scope's regular files.",
               [(base, summary.get("dataset_bytes", 0))])
    out.family("duet_run_scan_skipped", "gauge", "Directories or entries of the scope the scan could not read "
               "(unreadable, deeper than PATH_MAX, gone meanwhile): left out of this run, which exits 1.",
               [(base, summary.get("scan_skipped", 0))])
    if "device_read_bytes" in summary:
        out.family("duet_run_device_read_bytes", "gauge", "Bytes the run read from storage (/proc/self/io).",
                   [(base, summary["device_read_bytes"])])
    out.family("duet_task_items", "gauge", "Items (files) of the task's round in this run, by state.",
               [({**base, "task": t, "state": state}, rep[f"items_{state}"])
                for t, rep in tasks.items() for state in ("total", "done", "failed")])
    out.family("duet_task_bytes", "gauge", "Bytes the task processed in this run, by where they came from.",
               [({**base, "task": t, "from": src}, rep[f"bytes_from_{src}"])
                for t, rep in tasks.items() for src in ("cache", "device")])
    out.family("duet_task_round_complete", "gauge", "1 when the task's current round is complete.",
               [({**base, "task": t}, int(bool(rep["complete"]))) for t, rep in tasks.items()])
    out.family("duet_task_last_success_timestamp_seconds", "gauge",
               "When a run of the task last finished complete with no failed item (Unix time).",
               [({**base, "task": t}, when) for t, when in sorted((last_success or {}).items()) if t in tasks])
    events = stats.get("kernel_events", stats.get("records"))
    if events is not None:
        out.family("duet_engine_events_total", "counter", "Page-cache events the engine absorbed in this run "
                   "(kernel events with BPF, records with the poll source).", [(base, events)])
    if "kernel_pages" in stats:
        out.family("duet_engine_pages_total", "counter", "Pages named by the events absorbed in this run.",
                   [(base, stats["kernel_pages"])])
    lost = {k[len(LOST_PREFIX):]: v for k, v in stats.items() if k.startswith(LOST_PREFIX)}
    out.family("duet_engine_events_lost_total", "counter", "Page-cache events lost in this run, by where (the "
               "engine then resyncs residency, so nothing is missed, at a cost).",
               [({**base, "where": where}, n) for where, n in sorted(lost.items())])
    if "resyncs" in stats:
        out.family("duet_engine_resyncs_total", "counter", "Times the engine re-read residency after a loss.",
                   [(base, stats["resyncs"])])
    return out.text()


def last_success(store, root: str) -> dict[str, float]:
    """task -> end time of its latest run on ``root`` that finished complete with no failed item."""
    row = store.db.execute("SELECT id FROM scopes WHERE root=?", (root,)).fetchone()
    if row is None:
        return {}
    out: dict[str, float] = {}
    for ended, result, summary in store.db.execute(
            "SELECT ended, result, summary FROM runs WHERE scope_id=? AND ended IS NOT NULL ORDER BY id DESC",
            (row[0],)):
        if result != "complete":
            continue
        for task, rep in json.loads(summary or "{}").get("tasks", {}).items():
            if task not in out and not rep.get("items_failed"):
                out[task] = ended
    return out


def check_dir(directory: str) -> str:
    """The metrics directory, absolute; a clear error now rather than a failed write after hours of work."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise DuetError(f"metrics directory {directory} does not exist",
                        hint="create it, e.g. /var/lib/prometheus/node-exporter (node_exporter's textfile directory)")
    if not os.access(directory, os.W_OK):
        raise DuetError(f"metrics directory {directory} is not writable")
    return directory


class MetricsWriter:
    """Writes one scope's metrics file while a run works (throttled) and when it ends.

    A file that cannot be written (disk full, directory removed) is logged as a warning once per run and never
    stops the run: the maintenance matters more than its report.
    """

    def __init__(self, directory: str, root: str, mode: str, store):
        self.path = os.path.join(directory, file_name(root, mode))
        self.root, self.mode, self.store = root, mode, store
        self._last = 0.0
        self._warned = False
        self._success = last_success(store, root)

    def update(self, summary: Mapping[str, Any], engine: Mapping[str, int] | None, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < WRITE_EVERY_S:
            return
        self._last = time.monotonic()
        self._write(render(summary, self.mode, engine, self._success))

    def finished(self, summary: Mapping[str, Any], engine: Mapping[str, int] | None, exit_code: int) -> None:
        self._success = last_success(self.store, self.root)
        self._write(render(summary, self.mode, engine, self._success, exit_code))

    def _write(self, text: str) -> None:
        try:
            write_atomically(self.path, text)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write metrics to %s: %s", self.path, exc.strerror or exc)
                self._warned = True
