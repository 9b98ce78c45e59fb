"""Open-loop load test of an OpenAI-compatible completions server: the S-LoRA synthetic workload.

Requests arrive by a gamma process (--rate requests/s, --cv coefficient of variation of the gaps;
cv=1 is Poisson), pick an adapter by a power law over N adapters, and carry a prompt of an exact
token length and a fixed output length (`max_tokens` plus `ignore_eos`). Every request streams
from POST /v1/completions, so the client sees its time to first token (TTFT) and the arrival of
every later chunk. The trace is a pure function of the workload config and the seed
(`make_trace`); peft_baseline.py replays the same trace in-process.

    python benchmarks/load_test.py --base-url http://127.0.0.1:8000 --adapters lora-/100 \\
        --rate 4 --cv 1 --alpha 0.5 --input-len 32:256 --output-len 16:128 --duration 60 \\
        --out load.json --plot load.png

Definitions. TTFT: first streamed chunk minus the moment the request was sent. TPOT: (last token
- first token) / (output tokens - 1). ITL: gaps between streamed chunks. E2E: end of the stream
minus send time. SLO attainment: the fraction of all requests (failed ones count as misses) whose
TTFT is at most --slo-ttft. Throughputs divide by the wall time from the first arrival to the
last completion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

log = logging.getLogger("load_test")

# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------


def adapter_names(prefix: str, n: int) -> list[str]:
    """The names make_adapters.py gives its adapters: prefix + zero-padded index (lora-0007)."""
    width = max(4, len(str(n - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def parse_adapters(spec: str) -> tuple[str, ...]:
    """'none' -> () (the base model); 'PREFIX/N' -> N generated names; 'a,b,c' -> that list."""
    spec = spec.strip()
    if spec.lower() in ("", "none"):
        return ()
    m = re.fullmatch(r"(.*)/(\d+)", spec)
    if m:
        return tuple(adapter_names(m.group(1), int(m.group(2))))
    return tuple(s.strip() for s in spec.split(",") if s.strip())


def parse_range(spec: str | int | Sequence[int]) -> tuple[int, int]:
    """'64' -> (64, 64); '32:128' -> (32, 128), both ends inclusive."""
    if isinstance(spec, int):
        return spec, spec
    if not isinstance(spec, str):
        lo, hi = spec
        return int(lo), int(hi)
    parts = spec.split(":")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise ValueError(f"expected N or LO:HI, got {spec!r}")


def _power(rng: np.random.Generator, n: int, size: int, alpha: float) -> np.ndarray:
    # S-LoRA's definition: index = floor(n * X), X ~ Power(alpha) with density alpha * x^(alpha-1)
    # on [0, 1]. alpha = 1 is uniform; smaller alpha piles the traffic onto the first adapters.
    return np.minimum((rng.power(alpha, size) * n).astype(np.int64), n - 1)


def _zipf(rng: np.random.Generator, n: int, size: int, alpha: float) -> np.ndarray:
    # P(adapter i) proportional to (i + 1)^-alpha; alpha = 0 is uniform, larger is more skewed.
    p = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    return rng.choice(n, size=size, p=p / p.sum())


def _uniform(rng: np.random.Generator, n: int, size: int, alpha: float) -> np.ndarray:
    return rng.integers(0, n, size=size)


POPULARITY: dict[str, Callable[[np.random.Generator, int, int, float], np.ndarray]] = {
    "power": _power,
    "zipf": _zipf,
    "uniform": _uniform,
}


@dataclass(frozen=True)
class WorkloadConfig:
    """Everything that determines the trace; two runs with equal configs replay equal traces."""

    model: str | None = None  # base model directory, for its tokenizer; None: resolve_model(None)
    adapters: tuple[str, ...] = ()  # empty: every request goes to the base model
    popularity: str = "power"
    alpha: float = 1.0
    rate: float = 1.0  # requests per second; inf: everything arrives at t=0
    cv: float = 1.0
    input_len: tuple[int, int] = (64, 64)
    output_len: tuple[int, int] = (64, 64)
    num_requests: int | None = None
    duration: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.popularity not in POPULARITY:
            raise ValueError(f"popularity must be one of {sorted(POPULARITY)}, got {self.popularity!r}")
        if self.popularity == "power" and self.alpha <= 0:
            raise ValueError("the power popularity needs alpha > 0")
        if self.popularity == "zipf" and self.alpha < 0:
            raise ValueError("the zipf popularity needs alpha >= 0")
        if not self.rate > 0:
            raise ValueError("rate must be positive (inf for a burst at t=0)")
        if self.cv < 0:
            raise ValueError("cv must be >= 0")
        for name in ("input_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 1 <= lo <= hi, got {(lo, hi)}")
        if self.num_requests is None and self.duration is None:
            raise ValueError("give num_requests or duration (or both)")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be positive")
        if self.duration is not None and math.isinf(self.rate) and self.num_requests is None:
            raise ValueError("rate=inf needs num_requests")


@dataclass(frozen=True)
class TraceItem:
    arrival_s: float  # seconds after the start of the run
    adapter: str | None  # None: the base model
    prompt_token_ids: tuple[int, ...]  # exactly input_len ids, as the tokenizer produces them
    output_len: int
    prompt: str = ""  # text that the tokenizer turns into exactly prompt_token_ids


def resolve_model_path(model: str | None) -> Path:
    """--model, or the project's default base model when --model is omitted."""
    if model:
        return Path(model)
    try:
        from slserve.model.loader import resolve_model
    except ImportError as e:
        raise SystemExit(
            "no --model given and slserve.model.loader.resolve_model is not available; "
            "pass --model PATH (a Hugging Face model directory)"
        ) from e
    return Path(resolve_model(None))


def load_tokenizer(model: str | None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(model)))


def sample_arrivals(
    rng: np.random.Generator, rate: float, cv: float, num: int | None, duration: float | None
) -> np.ndarray:
    """Arrival times of a renewal process with gamma gaps: mean 1/rate, coefficient of variation cv."""
    if math.isinf(rate):
        assert num is not None
        return np.zeros(num)

    def gaps(size: int) -> np.ndarray:
        if cv == 0:
            return np.full(size, 1.0 / rate)
        shape = 1.0 / (cv * cv)
        return rng.gamma(shape, 1.0 / (rate * shape), size)

    if num is not None:
        t = np.cumsum(gaps(num))
    else:
        assert duration is not None
        chunks, last = [], 0.0
        while last <= duration:
            c = last + np.cumsum(gaps(max(16, int(rate * duration))))
            chunks.append(c)
            last = float(c[-1])
        t = np.concatenate(chunks)
    return t[t < duration] if duration is not None else t


class PromptBuilder:
    """Random prompts whose text tokenizes to exactly the requested number of ids.

    Words are vocabulary entries of the form ' lowercase' that round-trip on their own; a
    byte-level BPE pre-tokenizer splits text at those spaces, so a string of such words tokenizes
    to one id per word. Every prompt is re-encoded and checked anyway.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        vocab = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(vocab)])
        cand = [
            (i, s)
            for i, s in enumerate(texts)
            if len(s) >= 3 and s[0] == " " and s[1:].isascii() and s[1:].isalpha() and s[1:].islower()
        ]
        enc = tokenizer([s for _, s in cand], add_special_tokens=False).input_ids
        self.words = [s for (i, s), ids in zip(cand, enc, strict=True) if ids == [i]]
        if not self.words:
            raise ValueError("found no round-tripping ' word' tokens in this tokenizer's vocabulary")
        # Ids the tokenizer adds by itself (a BOS for Llama-style tokenizers, none for SmolLM2).
        self.num_special = len(tokenizer(self.words[0]).input_ids) - 1

    def build(self, rng: np.random.Generator, length: int, tries: int = 8) -> tuple[str, list[int]]:
        n = length - self.num_special
        if n < 1:
            raise ValueError(f"prompt length {length} leaves no room after {self.num_special} special ids")
        for _ in range(tries):
            pick = rng.integers(0, len(self.words), size=n)
            text = "".join(self.words[j] for j in pick)
            ids = self.tokenizer(text).input_ids
            if len(ids) == length:
                return text, list(ids)
        raise ValueError(f"could not build a prompt of exactly {length} tokens")


def make_trace(cfg: WorkloadConfig, tokenizer: Any | None = None) -> list[TraceItem]:
    """The request trace of a workload: same config and seed, same trace.

    Arrivals, adapters, lengths and prompt words draw from independent child streams of the seed,
    so changing (say) the length range leaves the arrival times and adapter choices unchanged.
    """
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    r_arrival, r_adapter, r_len, r_prompt = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(4)
    )
    arrivals = sample_arrivals(r_arrival, cfg.rate, cfg.cv, cfg.num_requests, cfg.duration)
    n = len(arrivals)
    if cfg.adapters:
        idx = POPULARITY[cfg.popularity](r_adapter, len(cfg.adapters), n, cfg.alpha)
        adapters: list[str | None] = [cfg.adapters[i] for i in idx]
    else:
        adapters = [None] * n
    in_lens = r_len.integers(cfg.input_len[0], cfg.input_len[1] + 1, size=n)
    out_lens = r_len.integers(cfg.output_len[0], cfg.output_len[1] + 1, size=n)
    builder = PromptBuilder(tokenizer)
    trace = []
    for i in range(n):
        text, ids = builder.build(r_prompt, int(in_lens[i]))
        trace.append(TraceItem(float(arrivals[i]), adapters[i], tuple(ids), int(out_lens[i]), text))
    return trace


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What one request did. Times are seconds since the start of the run."""

    index: int
    adapter: str | None
    arrival_s: float  # scheduled arrival
    start_s: float  # when the request was sent (HTTP) or arrived (in-process): latencies count from here
    prompt_len: int
    requested_tokens: int
    token_times: list[float] = field(default_factory=list)  # one entry per streamed chunk
    end_s: float | None = None
    output_tokens: int = 0  # usage.completion_tokens when the server reports it, else chunks
    status: str = "ok"  # "ok", an HTTP status code, or an exception name
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start_s if self.ok and self.token_times else None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or not self.token_times:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return self.end_s - self.start_s if self.ok and self.end_s is not None else None

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)] if self.ok else []


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation, as numpy.percentile computes it."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(values: Sequence[float]) -> dict[str, float | None]:
    vals = list(values)
    return {
        "mean": sum(vals) / len(vals) if vals else None,
        "p50": percentile(vals, 50),
        "p90": percentile(vals, 90),
        "p99": percentile(vals, 99),
        "max": max(vals) if vals else None,
    }


def summarize(records: Sequence[RequestRecord], slo_ttft: float) -> dict[str, Any]:
    """Aggregate metrics of a finished run (see the module docstring for the definitions)."""
    done = [r for r in records if r.ok]
    t_begin = min((r.start_s for r in records), default=0.0)
    t_end = max((r.end_s for r in records if r.end_s is not None), default=t_begin)
    wall = max(t_end - t_begin, 1e-9)
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    ttfts = [r.ttft for r in done if r.ttft is not None]
    errors = Counter(r.status for r in records if not r.ok)
    return {
        "num_requests": len(records),
        "completed": len(done),
        "errors": dict(sorted(errors.items())),
        "short_outputs": sum(1 for r in done if r.output_tokens < r.requested_tokens),
        "duration_s": wall,
        "request_throughput": len(done) / wall,
        "input_token_throughput": in_tokens / wall,
        "output_token_throughput": out_tokens / wall,
        "total_token_throughput": (in_tokens + out_tokens) / wall,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "slo_ttft_s": slo_ttft,
        "slo_attainment": sum(1 for t in ttfts if t <= slo_ttft) / len(records) if records else None,
        "ttft_s": describe(ttfts),
        "tpot_s": describe([r.tpot for r in done if r.tpot is not None]),
        "itl_s": describe([x for r in done for x in r.itls]),
        "e2e_s": describe([r.e2e for r in done if r.e2e is not None]),
        "client_lag_s": describe([r.start_s - r.arrival_s for r in records]),
    }


def timeline(records: Sequence[RequestRecord], bin_s: float = 1.0) -> dict[str, list[float]]:
    """Output tokens/s and completed requests/s in bins of bin_s seconds."""
    ends = [r.end_s for r in records if r.ok and r.end_s is not None]
    toks = [t for r in records if r.ok for t in r.token_times]
    horizon = max(ends + toks, default=0.0)
    nbins = max(1, math.ceil(horizon / bin_s))
    tok_hist = np.histogram(toks, bins=nbins, range=(0, nbins * bin_s))[0] / bin_s
    req_hist = np.histogram(ends, bins=nbins, range=(0, nbins * bin_s))[0] / bin_s
    return {
        "t_s": [(i + 0.5) * bin_s for i in range(nbins)],
        "chunks_per_s": tok_hist.tolist(),
        "requests_per_s": req_hist.tolist(),
    }


def _fmt(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def format_markdown(summary: dict[str, Any], title: str = "load test") -> str:
    s = summary
    errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "none"
    lines = [
        f"### {title}",
        "",
        "| requests | completed | errors | duration (s) | req/s | output tok/s | total tok/s "
        f"| SLO TTFT<={s['slo_ttft_s']:g}s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
        f"| {s['num_requests']} | {s['completed']} | {errors} | {s['duration_s']:.1f} "
        f"| {s['request_throughput']:.2f} | {s['output_token_throughput']:.1f} "
        f"| {s['total_token_throughput']:.1f} | {_fmt(s['slo_attainment'], 100)}% |",
        "",
        "| latency | mean | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label, scale in (
        ("ttft_s", "TTFT (ms)", 1e3),
        ("tpot_s", "TPOT (ms)", 1e3),
        ("itl_s", "ITL (ms)", 1e3),
        ("e2e_s", "E2E (s)", 1.0),
    ):
        d = s[key]
        cells = " | ".join(
            _fmt(d[k], scale, 1 if scale > 1 else 3) for k in ("mean", "p50", "p90", "p99", "max")
        )
        lines.append(f"| {label} | {cells} |")
    if s["short_outputs"]:
        lines.append(f"\n{s['short_outputs']} requests returned fewer tokens than requested.")
    lag = s["client_lag_s"]["p99"]
    if lag is not None and lag > 0.05:
        lines.append(
            f"\nclient lag p99 {lag * 1e3:.0f} ms: the client sent requests late; latencies are suspect."
        )
    return "\n".join(lines)


def plot_results(result: dict[str, Any], path: str | Path) -> None:
    """Latency CDFs and throughput over time, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [RequestRecord(**r) for r in result["requests"]]
    series = {
        "TTFT (s)": [r.ttft for r in recs if r.ttft is not None],
        "TPOT (s)": [r.tpot for r in recs if r.tpot is not None],
        "E2E (s)": [r.e2e for r in recs if r.e2e is not None],
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (label, vals) in zip(axes.flat, series.items(), strict=False):
        xs = np.sort(vals)
        ax.plot(xs, np.arange(1, len(xs) + 1) / max(len(xs), 1), drawstyle="steps-post")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    tl = result["timeline"]
    ax = axes.flat[3]
    ax.plot(tl["t_s"], tl["chunks_per_s"], label="output chunks/s")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("chunks/s")
    ax2 = ax.twinx()
    ax2.plot(tl["t_s"], tl["requests_per_s"], color="tab:orange", label="completed req/s")
    ax2.set_ylabel("requests/s")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.suptitle(result.get("title", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_result(
    title: str, config: dict[str, Any], records: Sequence[RequestRecord], slo_ttft: float
) -> dict:
    return {
        "title": title,
        "config": config,
        "summary": summarize(records, slo_ttft),
        "timeline": timeline(records),
        "requests": [asdict(r) for r in records],
    }


def report(result: dict[str, Any], out: str | None, plot: str | None) -> None:
    """Print the markdown table; write the JSON and the plot when asked."""
    print(format_markdown(result["summary"], result.get("title", "load test")))
    if out:
        Path(out).write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwrote {out}")
    if plot:
        plot_results(result, plot)
        print(f"wrote {plot}")


# ---------------------------------------------------------------------------------------------
# HTTP client
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadTestConfig:
    workload: WorkloadConfig
    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model_name: str | None = None  # the `model` sent for base-model requests; None: GET /v1/models
    prompt_format: str = "text"  # text | ids (a list of token ids as `prompt`)
    ignore_eos: bool = True
    slo_ttft: float = 1.0
    timeout: float = 600.0
    max_connections: int = 1024
    progress: bool = True
    # Closed loop: this many streams, each sending the trace's next request when its last one ends
    # (arrival times are ignored). None: open loop, every request sent at its arrival time.
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.prompt_format not in ("text", "ids"):
            raise ValueError("prompt_format must be text or ids")
        if self.slo_ttft <= 0 or self.timeout <= 0 or self.max_connections < 1:
            raise ValueError("slo_ttft, timeout and max_connections must be positive")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")


async def base_model_id(client: httpx.AsyncClient) -> str:
    """The base model's id from GET /v1/models: the first entry that is not an adapter of another."""
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError("GET /v1/models listed no models")
    for m in data:
        if not m.get("parent"):
            return m["id"]
    return data[0]["id"]


def request_body(item: TraceItem, model: str, cfg: LoadTestConfig) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        # A hand-made trace may carry ids only; those go out as ids whatever the format.
        "prompt": item.prompt if cfg.prompt_format == "text" and item.prompt else list(item.prompt_token_ids),
        "max_tokens": item.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send_request(
    client: httpx.AsyncClient, index: int, item: TraceItem, model: str, cfg: LoadTestConfig, t0: float
) -> RequestRecord:
    """Send one streaming completion and time every chunk that carries a token."""
    rec = RequestRecord(
        index=index,
        adapter=item.adapter,
        arrival_s=item.arrival_s,
        start_s=time.perf_counter() - t0,
        prompt_len=len(item.prompt_token_ids),
        requested_tokens=item.output_len,
    )
    usage_tokens = None
    try:
        async with client.stream("POST", "/v1/completions", json=request_body(item, model, cfg)) as resp:
            if resp.status_code != 200:
                rec.status = str(resp.status_code)
                rec.error = (await resp.aread()).decode(errors="replace")[:500]
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        rec.status, rec.error = "stream_error", json.dumps(chunk["error"])[:500]
                        break
                    choices = chunk.get("choices") or []
                    # A chunk with empty text that only reports finish_reason carries no token.
                    if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None):
                        rec.token_times.append(time.perf_counter() - t0)
                    if chunk.get("usage"):
                        usage_tokens = chunk["usage"].get("completion_tokens")
    except httpx.TimeoutException as e:
        rec.status, rec.error = "timeout", repr(e)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.status, rec.error = type(e).__name__, repr(e)
    rec.end_s = time.perf_counter() - t0
    if rec.ok and not rec.token_times:
        rec.status, rec.error = "no_tokens", "the stream ended without a token"
    rec.output_tokens = usage_tokens if usage_tokens is not None else len(rec.token_times)
    return rec


async def run_load_test(
    cfg: LoadTestConfig,
    trace: list[TraceItem] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """Replay the trace against the server and return the result dict (config, summary, timeline,
    per-request records): in real time, or in a closed loop of `cfg.concurrency` streams."""
    if trace is None:
        trace = make_trace(cfg.workload)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections)
    async with httpx.AsyncClient(
        base_url=cfg.base_url,
        headers=headers,
        timeout=httpx.Timeout(cfg.timeout, connect=30.0),
        limits=limits,
        transport=transport,
    ) as client:
        base_model = None
        if any(item.adapter is None for item in trace):
            base_model = cfg.model_name or await base_model_id(client)
        bar = tqdm(total=len(trace), desc="requests", unit="req", disable=not cfg.progress)

        async def one(i: int, item: TraceItem) -> RequestRecord:
            rec = await send_request(client, i, item, item.adapter or base_model, cfg, t0)
            bar.update(1)
            return rec

        t0 = time.perf_counter()
        if cfg.concurrency:
            records: list[RequestRecord] = [None] * len(trace)  # type: ignore[list-item]
            pending = iter(enumerate(trace))  # shared by the streams: each takes the next request

            async def stream() -> None:
                for i, item in pending:
                    item = replace(item, arrival_s=time.perf_counter() - t0)  # it arrives now
                    records[i] = await one(i, item)

            await asyncio.gather(*(stream() for _ in range(min(cfg.concurrency, len(trace)))))
        else:
            tasks = []
            for i, item in enumerate(trace):
                delay = item.arrival_s - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, item)))
            records = await asyncio.gather(*tasks)
        bar.close()
    config = {"kind": "http", **asdict(cfg), "api_key": "***" if cfg.api_key else None}
    return build_result("slserve load test", config, records, cfg.slo_ttft)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload (shared with peft_baseline.py)")
    g.add_argument(
        "--model", default=None, help="base model directory (tokenizer); default resolve_model(None)"
    )
    g.add_argument(
        "--adapters", default="none", help="'none' (base model), 'PREFIX/N' (PREFIX0000..), or 'a,b,c'"
    )
    g.add_argument("--popularity", choices=sorted(POPULARITY), default="power")
    g.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="power: S-LoRA's exponent (1 = uniform, smaller = skewed); zipf: P(i) ~ (i+1)^-alpha",
    )
    g.add_argument("--rate", type=float, default=1.0, help="requests per second ('inf': all at t=0)")
    g.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the gaps (1 = Poisson)")
    g.add_argument("--input-len", default="64", help="prompt tokens: N or LO:HI (inclusive)")
    g.add_argument("--output-len", default="64", help="output tokens: N or LO:HI (inclusive)")
    g.add_argument("--num-requests", type=int, default=None)
    g.add_argument("--duration", type=float, default=None, help="seconds of arrivals")
    g.add_argument("--seed", type=int, default=0)


def workload_from_args(a: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        model=a.model,
        adapters=parse_adapters(a.adapters),
        popularity=a.popularity,
        alpha=a.alpha,
        rate=a.rate,
        cv=a.cv,
        input_len=parse_range(a.input_len),
        output_len=parse_range(a.output_len),
        num_requests=a.num_requests if (a.num_requests or a.duration) else 100,
        duration=a.duration,
        seed=a.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model-name", default=None, help="`model` for base-model requests (default: /v1/models)")
    p.add_argument("--prompt-format", choices=("text", "ids"), default="text")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT SLO in seconds")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--max-connections", type=int, default=1024)
    p.add_argument(
        "--concurrency", type=int, default=None, help="closed loop: N streams, arrival times ignored"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", default="load_test.json", help="JSON result path ('' for none)")
    p.add_argument("--plot", default=None, help="PNG with latency CDFs and throughput over time")
    return p


def config_from_args(a: argparse.Namespace) -> LoadTestConfig:
    return LoadTestConfig(
        workload=workload_from_args(a),
        base_url=a.base_url,
        api_key=a.api_key,
        model_name=a.model_name,
        prompt_format=a.prompt_format,
        ignore_eos=a.ignore_eos,
        slo_ttft=a.slo_ttft,
        timeout=a.timeout,
        max_connections=a.max_connections,
        progress=a.progress,
        concurrency=a.concurrency,
    )


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    cfg = config_from_args(a)
    trace = make_trace(cfg.workload)
    log.info("trace: %d requests over %.1f s", len(trace), trace[-1].arrival_s if trace else 0.0)
    result = asyncio.run(run_load_test(cfg, trace))
    report(result, a.out or None, a.plot)
    sys.exit(0 if result["summary"]["completed"] else 1)


if __name__ == "__main__":
    main()
