"""duet: page-cache-aware storage maintenance for Linux, driven by eBPF page-cache events."""

__version__ = "0.1.0"

# What a plugin author imports: ``from duet_core import hookimpl, TaskSpec, TaskOption, ItemResult, Event``.
from duet_core.errors import Stopped  # noqa: E402
from duet_core.events import Event  # noqa: E402
from duet_core.hookspecs import API_VERSION, hookimpl  # noqa: E402
from duet_core.tasks import ItemResult, PassResult, TaskOption, TaskSpec  # noqa: E402

__all__ = ["API_VERSION", "Event", "ItemResult", "PassResult", "Stopped", "TaskOption", "TaskSpec", "__version__",
           "hookimpl"]
