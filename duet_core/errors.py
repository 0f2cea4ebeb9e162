"""The one exception family for expected failures.

Raise :class:`DuetError` (or a subclass) with a message that says what went wrong and, where it helps, a hint of
what to do. Only the CLI turns it into a line on stderr and an exit code; everything else lets it propagate.
"""

from __future__ import annotations


class DuetError(Exception):
    """An expected failure: bad input, missing tool, unusable kernel feature."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg} ({self.hint})" if self.hint else msg


class BpfUnavailable(DuetError):
    """The BPF event source cannot be used here (not root, no BTF, object missing, load refused)."""

    exit_code = 3
