"""Benchmarks: ``duet bench engine`` (the event-engine stress test, :mod:`duet_core.bench.engine`).

:mod:`~duet_core.bench.stabilize` holds what every benchmark run does first so that timings on a ballooned VM are
comparable; :mod:`~duet_core.bench.reader` is the reader process the workloads run.
"""
