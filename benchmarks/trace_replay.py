"""The side-by-side trace's shape replayed offline through an engine (no HTTP, no load generator).

256 requests at Poisson arrivals of 32 per second, 64-token prompts of random tokens, exactly 64
tokens out each at temperature 0, adapters drawn uniformly or by power law (the i-th adapter
weighted 1 / (i + 1), as ../shared/peers/load.py draws them) or none.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from slserve import SamplingParams


def draw_adapters(names: list[str], dist: str, n: int, rng: random.Random) -> list[str]:
    """n requests' adapters: uniform, or zipf (the i-th adapter weighted 1 / (i + 1), as load.py)."""
    weights = [1 / (i + 1) for i in range(len(names))] if dist == "zipf" else [1] * len(names)
    return rng.choices(names, weights=weights, k=n)


@dataclass
class Trace:
    prompts: list[list[int]]
    arrivals: list[float]  # seconds from the start
    adapters: list[str | None]
    output_len: int = 64

    @classmethod
    def draw(cls, seed: int, requests: int = 256, rate: float = 32.0, names: list[str] | None = None,
             dist: str = "zipf") -> Trace:
        rng = random.Random(seed)
        adapters = draw_adapters(names, dist, requests, rng) if names else [None] * requests
        prompts = [[rng.randrange(100, 30000) for _ in range(64)] for _ in range(requests)]
        arrivals = list(itertools.accumulate(rng.expovariate(rate) for _ in range(requests)))
        return cls(prompts, arrivals, adapters)

    @property
    def output_tokens(self) -> int:
        return len(self.prompts) * self.output_len


def replay(engine, trace: Trace, on_step: Callable[[float], None] | None = None) -> float:
    """Run `trace` through `engine` in real time (each request added once its arrival time has
    passed, the prefix cache emptied first); seconds from the start until the last token.
    `on_step(seconds)` is called after every step with that step's duration."""
    params = SamplingParams(max_tokens=trace.output_len, ignore_eos=True, temperature=0)
    engine.reset_prefix_cache()  # repeated replays of the same prompts must not hit it
    n = len(trace.prompts)
    t0, sent = time.perf_counter(), 0
    while sent < n or engine.has_unfinished():
        now = time.perf_counter() - t0
        while sent < n and trace.arrivals[sent] <= now:
            engine.add_request(trace.prompts[sent], params, trace.adapters[sent])
            sent += 1
        if engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            if on_step is not None:
                on_step(time.perf_counter() - start)
        else:
            time.sleep(trace.arrivals[sent] - now)
    return time.perf_counter() - t0
