"""Soak: thousands of requests over hundreds of adapters against a real `slserve serve` process,
with streams cut mid-way, non-streaming requests, and adapter uploads, replaces and deletes
interleaved with requests that use those adapters.

Asserted at the end: the process is alive and /health is 200; no valid request got a 5xx; every
request got exactly one answer (a response, or a stream with exactly one finish per choice and
exactly one [DONE], last); the only errors are 404s (or clean in-stream errors) for requests whose
adapter was deleted while they were in flight; the pool holds no KV page; and resident memory is
flat after warm-up (RSS_BOUND_MIB, see test_soak).

Adapters are real PEFT directories: a few are made with peft, the rest derived from them by
perturbing their safetensors weights and saving them in the same layout.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from tests.test_server import ServerProcess, metric, scrape

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

SEED = 15
NUM_ADAPTERS = 200  # resident on disk from the start
NUM_CHURN = 12  # uploaded, replaced and deleted while requests use them
NUM_REQUESTS = 2000
CONCURRENCY = 64
CANCEL_FRACTION = 0.25  # of streams: the client closes the connection mid-stream
# Resident memory after the second half may exceed that after the first half by at most this much.
RSS_BOUND_MIB = 48
FLAGS = ("--pool-mib", "96", "--host-cache-mib", "24", "--max-num-seqs", "64")
BASE = "SmolLM2-135M-Instruct"
WORDS = "the a cat dog sat ran on under blue green river stone light quiet".split()


# -- adapters ---------------------------------------------------------------------------------------


def _templates(root: Path) -> list[Path]:
    """Three small PEFT adapters made with the peft library (on the meta device: no base weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from slserve.model.loader import resolve_model

    hf_config = AutoConfig.from_pretrained(str(resolve_model(None)))
    out = []
    shapes = [(2, ["q_proj", "v_proj"]), (4, ["q_proj"]), (2, ["o_proj", "down_proj"])]
    for i, (r, targets) in enumerate(shapes):
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(hf_config)
        lcfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0)
        model = get_peft_model(base, lcfg)
        model.to_empty(device="cpu")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "lora_B" in name else 0.1))
        model.save_pretrained(str(root / f"template{i}"))
        out.append(root / f"template{i}")
    return out


def _derive(template: Path, dest: Path, seed: int) -> Path:
    """The template's PEFT directory with its weights perturbed by `seed`, same names and layout."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(template / "adapter_model.safetensors"))
    tensors = {k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in tensors.items()}
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(template / "adapter_config.json", dest / "adapter_config.json")
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The server's adapter directory with NUM_ADAPTERS adapters, and NUM_CHURN * 2 upload sources."""
    root = tmp_path_factory.mktemp("soak")
    templates = _templates(root / "templates")
    served = root / "served"
    for i in range(NUM_ADAPTERS):
        _derive(templates[i % len(templates)], served / f"soak-{i:03d}", 1000 + i)
    uploads = [_derive(templates[i % len(templates)], root / "uploads" / f"u{i}", 5000 + i)
               for i in range(2 * NUM_CHURN)]
    return served, uploads


# -- the load ---------------------------------------------------------------------------------------


@dataclass
class Churn:
    """Per churn adapter, the intervals during which it was absent (deleted, not yet re-uploaded)."""

    absent: dict[str, list[list[float]]] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)  # on the server now (none before its first upload)
    ops: Counter = field(default_factory=Counter)

    def overlaps_absence(self, name: str, t0: float, t1: float) -> bool:
        return any(a <= t1 and (b is None or b >= t0) for a, b in self.absent.get(name, []))


@dataclass
class Result:
    kind: str  # ok | cancelled | deleted (a 404 or clean stream error on a deleted adapter) | bad
    detail: str = ""


def _body(rng: random.Random, adapter: str | None, stream: bool) -> tuple[str, dict]:
    n = 2 if rng.random() < 0.1 else 1
    common = {"model": adapter or BASE, "max_tokens": rng.randint(2, 8), "stream": stream, "n": n}
    if rng.random() < 0.5:
        common.update(temperature=0.8, seed=rng.randrange(1 << 30))
    else:
        common["temperature"] = 0.0
    # Short prompts: the soak is about many requests, and their prefill is nearly all of its compute.
    # One in ten is longer, so prompts still span several KV pages.
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40 if rng.random() < 0.1 else 8)))
    if rng.random() < 0.5:
        return "/v1/completions", {**common, "prompt": text}
    # A short system message replaces the chat template's default one (about 20 tokens).
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    return "/v1/chat/completions", {**common, "messages": messages}


def _check_error(payload: dict) -> str:
    err = payload.get("error")
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"not an OpenAI error: {payload}"
    return ""


async def _stream(client: httpx.AsyncClient, path: str, body: dict, cancel_after: int | None) -> Result:
    """Read SSE events; check exactly one finish per choice and exactly one [DONE], last."""
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return _status_result(r)
        finishes, errors, done, events = Counter(), [], 0, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if done:
                return Result("bad", f"event after [DONE]: {data}")
            if data == "[DONE]":
                done += 1
                continue
            events += 1
            if cancel_after is not None and events >= cancel_after:
                return Result("cancelled")  # leaving the block closes the connection mid-stream
            payload = json.loads(data)
            if "error" in payload:
                errors.append(payload)
                continue
            for c in payload["choices"]:
                if c.get("finish_reason") is not None:
                    finishes[c["index"]] += 1
    if done != 1:
        return Result("bad", f"[DONE] x{done}")
    if errors:
        bad = [_check_error(e) for e in errors if _check_error(e)]
        if bad or any(e["error"]["type"] != "not_found_error" for e in errors):
            return Result("bad", f"stream errors {errors}")
        return Result("deleted", "stream")
    if any(v != 1 for v in finishes.values()) or sorted(finishes) != list(range(body["n"])):
        return Result("bad", f"finishes per choice {dict(finishes)} for n={body['n']}")
    return Result("ok")


def _status_result(r: httpx.Response) -> Result:
    try:
        payload = r.json()
    except ValueError:
        return Result("bad", f"{r.status_code} not JSON: {r.text[:200]}")
    if problem := _check_error(payload):
        return Result("bad", problem)
    if r.status_code == 404:
        return Result("deleted", "404")
    return Result("bad", f"{r.status_code}: {r.text[:300]}")


async def _plain(client: httpx.AsyncClient, path: str, body: dict) -> Result:
    r = await client.post(path, json=body)
    if r.status_code != 200:
        return _status_result(r)
    choices = r.json()["choices"]
    if sorted(c["index"] for c in choices) != list(range(body["n"])) or any(
            c["finish_reason"] not in ("stop", "length") for c in choices):
        return Result("bad", f"choices {choices}")
    return Result("ok")


async def _request(client, rng: random.Random, adapters: list[str], churn: Churn, results: list):
    adapter = rng.choice(adapters) if rng.random() < 0.9 else None
    stream = rng.random() < 0.7
    path, body = _body(rng, adapter, stream)
    cancel_after = rng.randint(1, 3) if stream and rng.random() < CANCEL_FRACTION else None
    t0 = time.monotonic()
    res = await (_stream(client, path, body, cancel_after) if stream else _plain(client, path, body))
    t1 = time.monotonic()
    if res.kind == "deleted" and not (adapter and churn.overlaps_absence(adapter, t0, t1)):
        res = Result("bad", f"{res.detail} for {adapter!r}, which was not deleted meanwhile")
    results.append((adapter, stream, res))


async def _upload(client: httpx.AsyncClient, name: str, src: Path, replace: bool) -> httpx.Response:
    files = {name: (file, (src / file).read_bytes(), "application/octet-stream")
             for name, file in (("config", "adapter_config.json"), ("weights", "adapter_model.safetensors"))}
    return await client.post("/v1/adapters", data={"name": name}, files=files,
                             params={"replace": "true"} if replace else None)


async def _churn(client, rng: random.Random, names: list[str], uploads: list[Path], churn: Churn,
                 stop: asyncio.Event, failures: list[str]) -> None:
    """Upload, replace and delete the churn adapters until the load ends."""
    present = churn.present
    while not stop.is_set():
        name = rng.choice(names)
        if name in present:
            op = rng.choice(["replace", "delete"])
            if op == "delete":
                churn.absent[name].append([time.monotonic(), None])
                r = await client.delete(f"/v1/adapters/{name}")
                present.discard(name)
            else:
                r = await _upload(client, name, rng.choice(uploads), replace=True)
        else:
            op = "upload"
            r = await _upload(client, name, rng.choice(uploads), replace=False)
            churn.absent[name][-1][1] = time.monotonic()
            present.add(name)
        churn.ops[op] += 1
        if r.status_code not in (200, 201):
            failures.append(f"{op} {name}: {r.status_code} {r.text[:200]}")
        await asyncio.sleep(rng.uniform(0.02, 0.2))


async def _load(url: str, seed: int, count: int, adapters: list[str], churn_names: list[str],
                uploads: list[Path], churn: Churn) -> tuple[list, list[str]]:
    rng = random.Random(seed)
    results: list = []
    failures: list[str] = []
    limits = httpx.Limits(max_connections=CONCURRENCY + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        stop = asyncio.Event()
        churner = asyncio.create_task(_churn(client, random.Random(seed + 1), churn_names, uploads, churn,
                                             stop, failures))
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(r: random.Random) -> None:
            async with sem:
                await _request(client, r, adapters, churn, results)

        await asyncio.gather(*(one(random.Random(rng.random())) for _ in range(count)))
        stop.set()
        await churner
    return results, failures


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _kv_pages(url: str) -> float:
    return metric(scrape(url), "slserve_pool_pages", owner="kv")


def test_soak(adapters, tmp_path):
    served, uploads = adapters
    # Both cores for the server: the client here is light, and the engine's steps are the soak's time.
    server = ServerProcess(served, tmp_path / "server.log", *FLAGS, threads=2)
    server.start()
    try:
        server.wait_ready()
        stable = [f"soak-{i:03d}" for i in range(NUM_ADAPTERS)]
        churn_names = [f"churn-{i:02d}" for i in range(NUM_CHURN)]
        churn = Churn(absent={n: [[0.0, None]] for n in churn_names})  # absent until first uploaded
        names = stable + churn_names

        def run(seed: int, count: int) -> tuple[list, list[str]]:
            return asyncio.run(_load(server.url, seed, count, names, churn_names, uploads, churn))

        t0 = time.monotonic()
        # Warm-up: as many requests as adapters, enough to fill the host cache (--host-cache-mib 24 <
        # the adapters' parsed size) and to touch the pool and the steps' buffers at every shape.
        warm, warm_failures = run(SEED, NUM_ADAPTERS)
        half = (NUM_REQUESTS - len(warm)) // 2
        first, first_failures = run(SEED + 2, half)
        rss_first = _rss_mib(server.proc.pid)
        second, second_failures = run(SEED + 4, NUM_REQUESTS - len(warm) - half)
        rss_second = _rss_mib(server.proc.pid)
        elapsed = time.monotonic() - t0

        assert server.proc.poll() is None, server.log_tail()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        # Aborts of cut streams reach the engine asynchronously: allow them a moment to land.
        deadline = time.monotonic() + 10
        while (kv_pages := _kv_pages(server.url)) and time.monotonic() < deadline:
            time.sleep(0.2)
        results = warm + first + second
        kinds = Counter(r.kind for _, _, r in results)
        print(f"soak: {len(results)} requests in {elapsed:.0f}s: {dict(kinds)}; adapter ops "
              f"{dict(churn.ops)}; RSS {rss_first:.0f} -> {rss_second:.0f} MiB; KV pages {kv_pages}")
        # Every check at once: a soak that fails should say everything it saw.
        problems = [f"bad {a!r} stream={s}: {r.detail}" for a, s, r in results if r.kind == "bad"][:20]
        problems += warm_failures + first_failures + second_failures
        if len(results) != NUM_REQUESTS:
            problems.append(f"{len(results)} answers for {NUM_REQUESTS} requests")
        if not (kinds["cancelled"] and churn.ops["delete"] and churn.ops["replace"]):
            problems.append("the load did not cancel streams or delete and replace adapters")
        if kv_pages:
            problems.append(f"{kv_pages} KV pages still in use when idle")
        if rss_second > rss_first + RSS_BOUND_MIB:
            problems.append(f"RSS grew {rss_first:.0f} -> {rss_second:.0f} MiB (bound +{RSS_BOUND_MIB})")
        assert not problems, "\n".join(problems)
    finally:
        server.stop()
