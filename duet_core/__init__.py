"""duet: page-cache-aware storage maintenance for Linux, driven by eBPF page-cache events."""

__version__ = "0.1.0"
