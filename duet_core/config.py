"""The TOML configuration file: which scopes to maintain with which tasks, and the defaults every run uses.

:func:`load_config` reads and validates the whole file up front, so a mistake is reported once, before any work
starts, as one :class:`ConfigError` line that names the file, the key path (``scope[1].budget``) and what was
expected. What can only be checked at run time (a scope path exists, a task name is installed) is left to the run.
The reference is docs/config.md.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from duet_core import units
from duet_core.errors import DuetError
from duet_core.exclude import check_pattern

DEFAULT_PATH = "/etc/duet/duet.toml"
DEFAULT_STATE_DIR = "/var/lib/duet"
NO_LIMIT = ("none", "unlimited")  # budget spellings for "no budget" (a rate also accepts "0")


class ConfigError(DuetError):
    """The configuration file is missing (when named explicitly), unreadable, not TOML, or not valid duet config."""

    exit_code = 2


@dataclass(frozen=True)
class Defaults:
    """``[defaults]``: what every run uses unless its scope or the command line says otherwise."""

    rate_limit: int | None = None   # bytes per second; None: no limit
    budget: float | None = None     # seconds a run may take, then it stops cleanly (resumes next run); None: no limit
    idle_io: bool = True            # run I/O in the idle ioprio class
    cache_hygiene: bool = True      # drop from the page cache what the run itself brought in
    one_file_system: bool = False   # stay on the scope root's filesystem (rsync -x)
    exclude: tuple[str, ...] = ()   # exclude patterns for every scope (duet_core.exclude)


@dataclass(frozen=True)
class ScopeConfig:
    """One ``[[scope]]``: a directory tree and the tasks that maintain it.

    ``one_file_system``, ``budget`` and ``rate_limit`` are the effective values: the scope's own if it sets them,
    else those of ``[defaults]``; ``exclude`` is the patterns of ``[defaults]`` followed by the scope's own.
    ``path`` is absolute and normalised, but not resolved: it need not exist yet.
    """

    path: str
    tasks: tuple[str, ...]
    one_file_system: bool = False
    exclude: tuple[str, ...] = ()
    budget: float | None = None
    rate_limit: int | None = None


@dataclass(frozen=True)
class Config:
    """A loaded configuration; ``source`` is the file it came from (None: no file, everything default).

    ``task_options`` maps a task name to its ``[task.NAME]`` table, passed to the task as it is.
    """

    source: str | None = None
    state_dir: str = DEFAULT_STATE_DIR
    metrics_dir: str | None = None   # node_exporter textfile directory for *.prom files (docs/operations.md)
    defaults: Defaults = field(default_factory=Defaults)
    scopes: tuple[ScopeConfig, ...] = ()
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)

    def scope_for(self, path: str | os.PathLike[str]) -> ScopeConfig | None:
        """The scope whose path is ``path``, both resolved (symlinks, ``..``) as they are now; None if none is."""
        want = os.path.realpath(path)
        for scope in self.scopes:
            if os.path.realpath(scope.path) == want:
                return scope
        return None

    def options_for(self, task: str) -> dict[str, Any]:
        """A copy of the ``[task.NAME]`` options of ``task`` (empty if it has none), for the task to keep."""
        return copy.deepcopy(self.task_options.get(task, {}))


# -- loading -----------------------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the config file at ``path``, or at :data:`DEFAULT_PATH` if None.

    A missing default file is an empty config (a run then needs its scope on the command line); a missing file that
    was named explicitly is an error.
    """
    explicit = path is not None
    name = os.fspath(path) if explicit else DEFAULT_PATH
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if not explicit:
            return Config()
        raise ConfigError(f"config file {name} does not exist", hint="check the --config path") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {name} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {name}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (bad byte at offset {exc.start})") from None
    return parse_config(text, source=name)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate TOML ``text`` as duet config; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return _Checker(source).config(data)


# -- validation --------------------------------------------------------------------------------------------------------
_TOP_KEYS = ("state_dir", "defaults", "scope", "task", "metrics_dir")
_DEFAULT_KEYS = ("rate_limit", "budget", "idle_io", "cache_hygiene", "one_file_system", "exclude")
_SCOPE_KEYS = ("path", "tasks", "one_file_system", "budget", "rate_limit", "exclude")
_SCALARS = (str, int, float, bool, datetime.datetime, datetime.date, datetime.time)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _type_name(value: object) -> str:
    """The TOML name of a parsed value's type, for "expected X, got Y"."""
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"), (list, "array"),
                       (dict, "table"), (datetime.datetime, "datetime"), (datetime.date, "date"),
                       (datetime.time, "time")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _join(parent: str, key: str) -> str:
    """``parent.key`` as TOML would write it, quoting a key that is not bare."""
    if not _BARE_KEY.fullmatch(key):
        key = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{parent}.{key}" if parent else key


class _Checker:
    """Turns parsed TOML into a :class:`Config`, raising a :class:`ConfigError` at the first problem."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str, hint: str | None = None) -> NoReturn:
        raise ConfigError(f"{self.source}: {key}: {problem}", hint=hint)

    def expect(self, key: str, value: object, kinds: type | tuple[type, ...], what: str) -> None:
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in _as_tuple(kinds))
        if not ok:
            shown = "" if isinstance(value, (dict, list)) else " " + _show(value)
            self.fail(key, f"expected {what}, got {_type_name(value)}{shown}")

    def known_keys(self, parent: str, table: dict[str, Any], valid: tuple[str, ...]) -> None:
        for key in table:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
                self.fail(_join(parent, key), "unknown key", hint=hint)

    # values
    def boolean(self, key: str, value: object) -> bool:
        self.expect(key, value, bool, "true or false")
        return bool(value)

    def rate(self, key: str, value: object) -> int | None:
        self.expect(key, value, (str, int), 'a rate like "50MB/s", or "unlimited"')
        try:
            return units.parse_rate(value)  # type: ignore[arg-type]
        except ValueError as exc:
            self.fail(key, str(exc))

    def budget(self, key: str, value: object) -> float | None:
        self.expect(key, value, (str, int, float), 'a duration like "2h" or "1h30m", or "none"')
        if isinstance(value, str) and value.strip().lower() in NO_LIMIT:
            return None
        try:
            seconds = units.parse_duration(value)  # type: ignore[arg-type]
        except ValueError as exc:
            self.fail(key, str(exc))
        if seconds <= 0:
            self.fail(key, f"a budget must be longer than 0, got {_show(value)}", hint='use "none" for no budget')
        return seconds

    def abs_path(self, key: str, value: object) -> str:
        self.expect(key, value, str, "an absolute path")
        assert isinstance(value, str)
        if not os.path.isabs(value):
            self.fail(key, f"expected an absolute path, got {_show(value)}", hint="paths must start with /")
        if "\0" in value:
            self.fail(key, f"a path cannot contain a NUL character, got {_show(value)}")
        return os.path.normpath(value)

    def patterns(self, key: str, value: object) -> tuple[str, ...]:
        self.expect(key, value, list, 'a list of exclude patterns like ["*.tmp", ".cache/", "/var/tmp"]')
        assert isinstance(value, list)
        for i, pattern in enumerate(value):
            self.expect(f"{key}[{i}]", pattern, str, "an exclude pattern (a string)")
            try:
                check_pattern(pattern)
            except DuetError as exc:
                self.fail(f"{key}[{i}]", str(exc))
        return tuple(value)

    def option(self, key: str, value: object) -> object:
        if isinstance(value, list):
            return [self.option(f"{key}[{i}]", item) for i, item in enumerate(value)]
        if not isinstance(value, _SCALARS):
            self.fail(key, f"expected a string, number, boolean, date or array of them, got {_type_name(value)}",
                      hint="task options are flat: no nested tables")
        return value

    # sections
    def config(self, data: dict[str, Any]) -> Config:
        self.known_keys("", data, _TOP_KEYS)
        state_dir = self.abs_path("state_dir", data["state_dir"]) if "state_dir" in data else DEFAULT_STATE_DIR
        metrics_dir = self.abs_path("metrics_dir", data["metrics_dir"]) if "metrics_dir" in data else None
        defaults = self.defaults(data.get("defaults", {}))
        scopes = self.scopes(data.get("scope", []), defaults)
        task_options = self.tasks(data.get("task", {}))
        return Config(source=self.source, state_dir=state_dir, metrics_dir=metrics_dir, defaults=defaults,
                      scopes=scopes, task_options=task_options)

    def defaults(self, table: object) -> Defaults:
        self.expect("defaults", table, dict, "a table ([defaults])")
        assert isinstance(table, dict)
        self.known_keys("defaults", table, _DEFAULT_KEYS)
        base = Defaults()

        def get(name: str, parse: Callable[[str, object], Any]) -> Any:
            return parse(f"defaults.{name}", table[name]) if name in table else getattr(base, name)

        return Defaults(rate_limit=get("rate_limit", self.rate), budget=get("budget", self.budget),
                        idle_io=get("idle_io", self.boolean), cache_hygiene=get("cache_hygiene", self.boolean),
                        one_file_system=get("one_file_system", self.boolean), exclude=get("exclude", self.patterns))

    def scopes(self, items: object, defaults: Defaults) -> tuple[ScopeConfig, ...]:
        if isinstance(items, dict):
            self.fail("scope", "expected an array of tables, got a single table", hint="write [[scope]], not [scope]")
        self.expect("scope", items, list, "an array of tables ([[scope]])")
        assert isinstance(items, list)
        seen: dict[str, str] = {}
        scopes = []
        for i, table in enumerate(items):
            key = f"scope[{i}]"
            self.expect(key, table, dict, "a table ([[scope]])")
            self.known_keys(key, table, _SCOPE_KEYS)
            for required in ("path", "tasks"):
                if required not in table:
                    example = 'path = "/home"' if required == "path" else 'tasks = ["backup"]'
                    self.fail(f"{key}.{required}", "missing", hint=f"every [[scope]] needs one, e.g. {example}")
            path = self.abs_path(f"{key}.path", table["path"])
            if path in seen:
                self.fail(f"{key}.path", f"{path} is already {seen[path]}", hint="list each scope once")
            seen[path] = key

            def get(name: str, parse: Callable[[str, object], Any], table: dict = table, key: str = key) -> Any:
                return parse(f"{key}.{name}", table[name]) if name in table else getattr(defaults, name)

            scopes.append(ScopeConfig(path=path, tasks=self.task_list(f"{key}.tasks", table["tasks"]),
                                      one_file_system=get("one_file_system", self.boolean),
                                      exclude=defaults.exclude + (self.patterns(f"{key}.exclude", table["exclude"])
                                                                  if "exclude" in table else ()),
                                      budget=get("budget", self.budget), rate_limit=get("rate_limit", self.rate)))
        return tuple(scopes)

    def task_list(self, key: str, value: object) -> tuple[str, ...]:
        self.expect(key, value, list, 'a list of task names like ["backup", "scrub"]')
        assert isinstance(value, list)
        if not value:
            self.fail(key, "empty: a scope needs at least one task", hint='e.g. tasks = ["backup"]')
        names: list[str] = []
        for i, name in enumerate(value):
            self.expect(f"{key}[{i}]", name, str, "a task name (a string)")
            if not name.strip():
                self.fail(f"{key}[{i}]", "empty task name")
            if name in names:
                self.fail(f"{key}[{i}]", f"task {name!r} is listed twice")
            names.append(name)
        return tuple(names)

    def tasks(self, table: object) -> dict[str, dict[str, Any]]:
        self.expect("task", table, dict, "tables of task options ([task.NAME])")
        assert isinstance(table, dict)
        options: dict[str, dict[str, Any]] = {}
        for name, opts in table.items():
            key = _join("task", name)
            self.expect(key, opts, dict, f"a table of options ([{key}])")
            options[name] = {opt: self.option(_join(key, opt), value) for opt, value in opts.items()}
        return options


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _show(value: object) -> str:
    """A value as it would be written in TOML (control characters escaped), shortened, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
