"""Loading task plugins: entry points of the group ``duet.tasks``, one plugin manager per task.

Built-in tasks (``plugins/*``) are installed packages with entry points like any third-party task; this module never
imports one by name. A plugin that fails to import, to validate or to declare its task is reported by name (with
its package) and skipped: it never takes the others down.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

import pluggy

from duet_core import hookspecs
from duet_core.errors import DuetError
from duet_core.tasks import OPTION_TYPES, TaskSpec

GROUP = "duet.tasks"


@dataclass
class LoadedTask:
    """A task ready to run: its spec, the plugin object and the plugin manager that calls it."""

    spec: TaskSpec
    pm: pluggy.PluginManager
    package: str
    version: str
    source: str                     # "module:attr" of the entry point, or "(runtime)"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def hook(self):
        return self.pm.hook


@dataclass
class BrokenPlugin:
    name: str
    package: str
    error: str


@dataclass
class TaskRegistry:
    tasks: dict[str, LoadedTask] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)

    def add(self, plugin: object, package: str = "(runtime)", version: str = "", source: str = "(runtime)"
            ) -> LoadedTask:
        """Load one plugin object as a task (entry points go through here too; tests call it directly)."""
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(plugin)
        pm.check_pending()   # a misspelled duet_* hook is an error, not a silent no-op
        if os.environ.get("DUET_TRACE_PLUGINS"):
            pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"duet: trace: {msg}"))
            pm.enable_tracing()
        spec = pm.hook.duet_task()
        _validate(spec)
        if spec.name in self.tasks:
            other = self.tasks[spec.name]
            raise DuetError(f"task {spec.name!r} is already provided by {other.package}")
        task = LoadedTask(spec, pm, package, version, source)
        self.tasks[spec.name] = task
        return task

    def get(self, name: str) -> LoadedTask:
        if name in self.tasks:
            return self.tasks[name]
        broken = next((b for b in self.broken if b.name == name), None)
        if broken:
            raise DuetError(f"task {name!r} is installed but broken: {broken.error}")
        close = difflib.get_close_matches(name, list(self.tasks), n=1)
        known = ", ".join(sorted(self.tasks)) or "none installed"
        hint = f"did you mean {close[0]!r}?" if close else f"installed tasks: {known}"
        raise DuetError(f"unknown task {name!r}", hint=hint)


def _validate(spec: object) -> None:
    if not isinstance(spec, TaskSpec):
        raise DuetError(f"duet_task returned {type(spec).__name__}, not a TaskSpec")
    if not spec.name or not spec.name.replace("-", "_").isidentifier():
        raise DuetError(f"bad task name {spec.name!r}: use letters, digits, - and _")
    if spec.api_version != hookspecs.API_VERSION:
        raise DuetError(f"task {spec.name!r} was built for duet plugin API {spec.api_version}, "
                        f"this duet has API {hookspecs.API_VERSION}", hint="upgrade the plugin or duet")
    if spec.granularity not in ("file", "range"):
        raise DuetError(f"task {spec.name!r}: granularity must be 'file' or 'range'")
    if not isinstance(spec.reads_data, bool):
        raise DuetError(f"task {spec.name!r}: reads_data must be True or False, not {spec.reads_data!r}")
    for opt in spec.options:
        if opt.type not in OPTION_TYPES:
            raise DuetError(f"task {spec.name!r}: option {opt.name!r} has unknown type {opt.type!r}")


def _package(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "(unknown)", ""
    return dist.metadata["Name"], dist.version


def load_plugins(group: str = GROUP) -> TaskRegistry:
    """Every installed task, plus the broken ones with why. Idempotent: each call loads afresh."""
    reg = TaskRegistry()
    seen: set[tuple[str, str]] = set()
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        package, version = _package(ep)
        if (ep.name, ep.value) in seen:   # the same distribution on sys.path twice
            continue
        seen.add((ep.name, ep.value))
        try:
            plugin = ep.load()
            reg.add(plugin, package=package, version=version, source=ep.value)
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin is that plugin's, reported and skipped
            reg.broken.append(BrokenPlugin(ep.name, package, f"{type(exc).__name__}: {exc}"))
    return reg
