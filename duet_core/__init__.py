"""duet: page-cache-aware storage maintenance for Linux, driven by eBPF page-cache events."""

import os as _os

__version__ = "0.1.0"

# duet does no linear algebra, but numpy's OpenBLAS starts a thread per further CPU at import, which then spins
# (about 60 ms of CPU here) in every duet process: the run, its start-up snapshot's child, each bench child. One
# thread, unless the user says otherwise. Set before anything below imports numpy.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# What a plugin author imports: ``from duet_core import hookimpl, TaskSpec, TaskOption, ItemResult, Event``.
from duet_core.errors import Stopped  # noqa: E402
from duet_core.events import Event  # noqa: E402
from duet_core.hookspecs import API_VERSION, hookimpl  # noqa: E402
from duet_core.tasks import ItemResult, PassResult, TaskOption, TaskSpec  # noqa: E402

__all__ = ["API_VERSION", "Event", "ItemResult", "PassResult", "Stopped", "TaskOption", "TaskSpec", "__version__",
           "hookimpl"]
