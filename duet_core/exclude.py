"""What a scope leaves out of its tree: ``--exclude`` patterns, and the paths duet keeps for itself.

Every walk of a scope applies the same :class:`Exclusions` — the scan (:class:`~duet_core.scope.Scope`), the
start-up snapshot's child, and a task that walks the tree itself (backup's sync pass, through
``RunInfo.exclude``) — so an excluded entry is in no task's work and in no snapshot of a backup.

Patterns follow rsync and ``.gitignore``:

- A pattern without a ``/`` matches the *name* of a file or directory at any depth: ``*.tmp``, ``.cache``,
  ``node_modules``.
- A pattern with a ``/`` matches the path relative to the scope's root: ``/var/tmp`` (a leading ``/`` anchors at the
  root, it does not mean the filesystem's root), ``home/*/.cache``.
- ``*`` and ``?`` match within one name, ``[abc]`` / ``[!abc]`` one character of a set; ``**`` matches across
  directories (``**/build``, ``logs/**/*.gz``); ``\\`` makes the next character literal.
- A trailing ``/`` matches directories only (``cache/``).
- An excluded directory is not entered: nothing below it is in the scope.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from duet_core.errors import DuetError


def _translate(pattern: str) -> str:
    """A pattern (without its trailing ``/`` and leading anchor) as a regular expression over a name or a path."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):     # "**/": any number of directories, none included
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j < 0:                              # no closing bracket: a literal "[", as fnmatch has it
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
                out.append(f"[^/{body}]" if negate else f"[{body}]")
                i = j + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def check_pattern(pattern: object) -> str:
    """``pattern`` if it is a usable exclude pattern; a :class:`DuetError` (one line) otherwise."""
    if not isinstance(pattern, str):
        raise DuetError(f"an exclude pattern must be a string, got {pattern!r}")
    if "\0" in pattern or "\n" in pattern:
        raise DuetError(f"exclude pattern {pattern!r} contains a NUL or newline character")
    if not pattern.strip("/"):
        raise DuetError(f"exclude pattern {pattern!r} names nothing",
                        hint="patterns are relative to the scope, e.g. '*.tmp', '.cache/' or '/var/tmp'")
    return pattern


class Exclusions:
    """A scope's exclude ``patterns`` (see the module docstring) and ``own`` paths (relative to the scope's root,
    taken literally: duet's state directory when it lies inside the scope). Immutable; empty is false."""

    def __init__(self, patterns: Iterable[str] = (), own: Iterable[str] = ()):
        self.patterns = tuple(check_pattern(p) for p in patterns)
        self.own = frozenset(p.strip("/") for p in own if p.strip("/"))
        parts: dict[tuple[bool, bool], list[str]] = {}
        for p in self.patterns:
            dir_only = p.endswith("/")
            body = p.rstrip("/")
            anchored = "/" in body
            parts.setdefault((anchored, dir_only), []).append(_translate(body.lstrip("/")))
        # One regex per kind: (anchored: matched against the relative path, else the name; directories only)
        self._res = {kind: re.compile("|".join(f"(?:{r})" for r in rs), re.DOTALL) for kind, rs in parts.items()}
        self._any = bool(self._res or self.own)

    def __bool__(self) -> bool:
        return self._any

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Exclusions) and (self.patterns, self.own) == (other.patterns, other.own)

    def __hash__(self) -> int:
        return hash((self.patterns, self.own))

    def __repr__(self) -> str:
        return f"Exclusions({list(self.patterns)!r}, own={sorted(self.own)!r})"

    def excluded(self, relpath: str, name: str, is_dir: bool) -> bool:
        """Whether the entry ``relpath`` (relative to the scope's root; its last component is ``name``) is left out.
        Call it for every entry of a walk, and do not enter an excluded directory."""
        if not self._any:
            return False
        if relpath in self.own:
            return True
        for (anchored, dir_only), rx in self._res.items():
            if dir_only and not is_dir:
                continue
            if rx.fullmatch(relpath if anchored else name):
                return True
        return False

    def excluded_path(self, relpath: str, is_dir: bool) -> bool:
        """Whether ``relpath`` is out of the scope looked at alone, not met in a walk: it, or a directory above it,
        is excluded."""
        if not self._any:
            return False
        parts = relpath.split("/")
        return any(self.excluded("/".join(parts[:i]), parts[i - 1], True) for i in range(1, len(parts))) or \
            self.excluded(relpath, parts[-1], is_dir)

    def record(self) -> dict[str, list[str]]:
        """What a record of the scope keeps of them (a backup's manifest), to tell later whether they changed."""
        return {"patterns": list(self.patterns), "own": sorted(self.own)}

    @classmethod
    def from_record(cls, record: dict[str, list[str]]) -> Exclusions:
        """The exclusions :meth:`record` described (the start-up snapshot's child gets them this way)."""
        return cls(record["patterns"], record["own"])


NOTHING = Exclusions()
