"""Terminal output, configured in one place: rich on a terminal, plain lines otherwise."""

from __future__ import annotations

import json
import sys

from rich.console import Console

from duet_core.errors import printable

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def is_tty() -> bool:
    return sys.stdout.isatty()


def emit_json(obj) -> None:
    """One JSON object on one line, flushed at once (for pipes and `jq`)."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def note(msg: str) -> None:
    """A one-line notice on stderr (source in use, warnings), never mixed into JSON on stdout; file names in it
    are escaped (:func:`~duet_core.errors.printable`), so a newline or a terminal escape in one cannot forge lines."""
    err_console.print(f"duet: {printable(msg)}", markup=False, soft_wrap=True)
