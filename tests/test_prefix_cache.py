"""Automatic prefix caching per adapter (memory/prefix_cache.py), end to end on the real model.

32 requests share a 512-token system prompt over four real PEFT adapters and the base model: the
prompt's pages are computed once per adapter and reused by the others, greedy tokens equal those
with caching off and those of transformers + peft; a prompt cached under one adapter is never
reused under another, nor under a replaced version of the same name; prompt logprobs skip the
cache; n > 1 siblings share their prompt's pages (and /metrics shows the hit rate); once the
requests finish and the cache is cleared, the pool is back to its start.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from slserve import LLM, SamplingParams
from slserve.model.loader import resolve_model
from tests.peft_util import ALL_TARGETS, make_peft_adapter, peft_generate

PAGE = 16
SYSTEM_TOKENS = 512  # 32 pages
ADAPTERS = ["a0", "a1", "a2", "a3"]
IDENTITIES = [*ADAPTERS, None]  # four adapters and the base model
PER_IDENTITY = [7, 7, 7, 7, 4]  # 32 requests
MAX_TOKENS = 4
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made and read across Europe. ")
POOL = 256 << 20


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    """Rank-8 adapters a0..a3 on all modules, and `a0-new`, the replacement of a0."""
    root = tmp_path_factory.mktemp("peft")
    names = [*ADAPTERS, "a0-new"]
    return {name: make_peft_adapter(base, root / name, 8, ALL_TARGETS, seed=i, std=0.05)
            for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def workload(base):
    """(prompt ids, adapter) of the 32 requests: the system prompt, then a short distinct question
    (short enough that no request fills a page past the system prompt)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    system = tok.encode(TEXT * 30)[:SYSTEM_TOKENS]
    assert len(system) == SYSTEM_TOKENS
    work = []
    for adapter, count in zip(IDENTITIES, PER_IDENTITY, strict=True):
        for i in range(count):
            question = tok.encode(f" Q{len(work)}: color {i}?")
            assert len(question) + MAX_TOKENS - 1 < PAGE  # K/V computed for all but the last token
            work.append((system + question, adapter))
    return work


def _llm(tmp_path: Path, adapters: dict[str, Path], **kwargs) -> LLM:
    llm = LLM(dtype="float32", pool_bytes=POOL, adapter_dir=str(tmp_path), **kwargs)
    for name in ADAPTERS:
        llm.add_adapter(name, adapters[name])
    return llm


def _generate(llm: LLM, work, params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([ids for ids, _ in work], params, [a for _, a in work])
    assert all(o.finish_reason in ("stop", "length") for o in outs), [o.finish_reason for o in outs]
    return [o.token_ids for o in outs]


def _hits(llm: LLM) -> int:
    return llm.stats()["prefix_cache"]["hit_tokens"]


def _assert_no_leak(llm: LLM) -> None:
    """Every request done: nothing but unreferenced cached pages and idle adapters is held, and
    clearing both gives the whole pool back."""
    engine = llm.engine
    engine.check_pool()
    stats = llm.stats()
    assert stats["pool"]["pages_kv"] == 0
    if stats["prefix_cache"] is not None:
        assert stats["prefix_cache"]["idle_pages"] == stats["pool"]["pages_prefix"]
    assert engine.reset_prefix_cache() == stats["pool"]["pages_prefix"]
    engine.adapter_cache.evict_idle(engine.pool.num_pages)
    assert engine.pool.num_free == engine.pool.num_pages
    engine.check_pool()


def test_shared_system_prompt_over_adapters(base, adapters, workload, tmp_path):
    llm = _llm(tmp_path / "on", adapters)
    outs = _generate(llm, workload)
    stats = llm.stats()
    cache = stats["prefix_cache"]
    # The system prompt's 32 pages were computed once per adapter (and once for the base model);
    # every other request reused exactly them.
    assert stats["preemptions"] == 0
    assert cache["pages_added"] == stats["pool"]["pages_prefix"] == len(IDENTITIES) * SYSTEM_TOKENS // PAGE
    assert cache["hit_tokens"] == (len(workload) - len(IDENTITIES)) * SYSTEM_TOKENS
    assert cache["query_tokens"] == sum(len(ids) for ids, _ in workload)
    assert cache["hit_rate"] > 0.8

    # The same greedy tokens as with caching off (a request of each adapter and two of the base
    # model, the first of a group computing the prompt and later ones reusing it) ...
    picks = [0, 6, 7, 14, 21, 28, 31]
    off = _llm(tmp_path / "off", adapters, prefix_caching=False)
    assert off.stats()["prefix_cache"] is None
    assert _generate(off, [workload[i] for i in picks]) == [outs[i] for i in picks]
    assert off.stats()["pool"]["pages_prefix"] == 0
    _assert_no_leak(off)
    # ... and as transformers + peft.
    for i in (6, 31):
        ids, adapter = workload[i]
        assert outs[i] == peft_generate(base, adapters[adapter] if adapter else None, ids, MAX_TOKENS)

    # A prompt cached under one adapter is not reused under another one, nor by the base model.
    question = workload[0][0][::-1][: 6 * PAGE + 3]  # tokens no request has had
    _generate(llm, [(question, "a1")])
    before = _hits(llm)
    _generate(llm, [(question, "a2"), (question, None)])
    assert _hits(llm) == before
    _generate(llm, [(question, "a1")])
    assert _hits(llm) == before + 6 * PAGE

    # Nor under a replaced version of the same name: the new weights compute their own pages.
    before = _hits(llm)
    llm.add_adapter("a0", adapters["a0-new"], replace=True)
    new = _generate(llm, [workload[0]])
    assert _hits(llm) == before
    assert new[0] == peft_generate(base, adapters["a0-new"], workload[0][0], MAX_TOKENS)

    # Prompt logprobs need every prompt position's logits: such a request skips the cache.
    before = _hits(llm)
    out = llm.generate(workload[1][0], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                       "a0")[0]
    assert _hits(llm) == before
    assert len(out.prompt_logprobs) == len(workload[1][0]) and out.prompt_logprobs[0] is None
    _assert_no_leak(llm)


def test_siblings_share_the_prompt_pages(adapters, workload, tmp_path):
    """n > 1: the API queues the same prompt n times; the first sibling computes the prompt's
    pages, the others (admitted in the same step) read them."""
    llm = _llm(tmp_path, adapters)
    ids, _ = workload[0]
    n = 4
    full = len(ids) // PAGE  # 32: the last prompt token is always computed, in a page of its own
    reqs = [llm.engine.add_request(ids, GREEDY, "a3") for _ in range(n)]
    llm.engine.step()  # one prefill step for all four
    pool = llm.stats()["pool"]
    assert all(r.num_output_tokens == 1 for r in reqs)
    assert pool["pages_prefix"] == full and pool["pages_kv"] == n  # shared prompt, a last page each
    assert all(r.block_table[:full] == reqs[0].block_table[:full] for r in reqs)
    while llm.engine.has_unfinished():
        llm.engine.step()
    outs = [r.output_token_ids for r in reqs]
    assert all(o == outs[0] for o in outs)
    cache = llm.stats()["prefix_cache"]
    assert cache["pages_added"] == full
    assert cache["hit_tokens"] == (n - 1) * full * PAGE
    _assert_no_leak(llm)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " ") or ln.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


def test_metrics_show_the_hit_rate_of_n_siblings(tmp_path):
    """A real server: a completion with n = 3 reuses its prompt's pages; /metrics says so."""
    import uvicorn

    from slserve.api.server import create_app
    from slserve.async_engine import AsyncEngine
    from slserve.config import EngineConfig

    engine = AsyncEngine(EngineConfig(dtype="float32", pool_bytes=64 << 20, adapter_dir=str(tmp_path)))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started or httpx.get(f"http://127.0.0.1:{port}/health").status_code != 200:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        prompt = TEXT * 3  # ~80 tokens: 5 full pages
        resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, n=3, max_tokens=2,
                                         temperature=0)
        assert len(resp.choices) == 3 and len({c.text for c in resp.choices}) == 1
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        prompt_tokens = resp.usage.prompt_tokens
        # Each later sibling reuses the full pages before its last prompt token; the first one
        # cached every page its prompt and first output token filled.
        hits = _metric(text, "slserve_prefix_cache_hit_tokens_total")
        assert hits == 2 * ((prompt_tokens - 1) // PAGE) * PAGE
        pages = (prompt_tokens + 1) // PAGE
        assert _metric(text, "slserve_prefix_cache_query_tokens_total") == 3 * prompt_tokens
        assert _metric(text, "slserve_prefix_cache_hit_rate") == pytest.approx(hits / (3 * prompt_tokens))
        assert _metric(text, "slserve_prefix_cache_pages") == pages
        assert 'slserve_pool_pages{owner="prefix"} ' + f"{float(pages)}" in text
    finally:
        server.should_exit = True
        thread.join(60)
