"""The one way the micro-benchmarks time a call."""

from __future__ import annotations

import time


def per_call(fn, arg, calls: int) -> float:
    """Seconds per call of fn(arg), over `calls` calls after one untimed warm-up call."""
    fn(arg)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(arg)
    return (time.perf_counter() - t0) / calls
