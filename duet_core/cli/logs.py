"""Log lines: one per notable event, on stderr, readable by people and by machines.

``-v`` shows INFO lines (one ``run finished: key=value ...`` line per run and scope, files skipped), ``-vv`` DEBUG.
Under systemd, stderr goes to the journal: when ``$JOURNAL_STREAM`` names our stderr, each line starts with its
syslog priority (``<4>`` ...; sd-daemon(3)), so ``journalctl -p warning -u duet`` filters by level. ``--log-format
json`` writes one JSON object per line instead (``ts``, ``level``, ``logger``, ``msg``), for log shippers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

# logging level -> syslog priority (sd-daemon(3) prefixes)
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
FORMATS = ("text", "json")


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd connected (``$JOURNAL_STREAM`` = ``dev:inode`` of it)."""
    dev_ino = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return dev_ino == f"{st.st_dev}:{st.st_ino}"


class TextFormatter(logging.Formatter):
    def __init__(self, journal: bool):
        super().__init__("duet: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record).replace("\n", " ")
        return f"<{_PRIORITY.get(record.levelno, 6)}>{line}" if self.journal else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": round(record.created, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"))


def setup(verbose: int, fmt: str = "text") -> None:
    """Configure the root logger once for the process: level from ``-v`` count, format ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(stderr_is_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING - 10 * min(verbose, 2))
    os.environ["DUET_LOG_FORMAT"] = fmt     # for duet's own second process (duet_core.jobs), which logs alike
