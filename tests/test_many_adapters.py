"""Two thousand adapters on one engine: disk and host tiers, and a device pool too small for them."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from slserve import LLM, SamplingParams
from slserve.model.loader import resolve_model
from tests.peft_util import peft_generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from make_adapters import AdapterSetConfig, make_adapters  # noqa: E402

NUM = 2000
HOST_BOUND = 3 << 20  # bytes: room for a few dozen of these adapters, not 2000


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    make_adapters(AdapterSetConfig(num=NUM, out=str(root), ranks=(1, 2), targets=("q_proj",),
                                   b_std=0.05, dtype="float32", seed=7, workers=2))
    (root / "manifest.json").unlink()
    return root


def test_two_thousand_adapters(adapter_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    # 2 adapter pages' worth of room beside the KV pages of a few requests: most of the 64
    # distinct adapters below must be evicted from the device to make room for the next ones.
    page_bytes = 30 * 2 * 16 * 3 * 64 * 4
    llm = LLM(dtype="float32", pool_bytes=12 * page_bytes, adapter_dir=str(adapter_dir),
              host_cache_bytes=HOST_BOUND, max_num_seqs=8)
    names = llm.adapters()
    assert len(names) == NUM
    store = llm.stats()["adapters"]["store"]
    assert store["disk_count"] == NUM and store["host_count"] == 0  # lazy: nothing parsed yet

    rng = random.Random(0)
    chosen = [names[0], names[-1], *rng.sample(names[1:-1], 62)]
    prompts = [f"Item {i}: the weather today is" for i in range(len(chosen))]
    params = SamplingParams(temperature=0, max_tokens=4)
    host_peak = 0
    engine = llm.engine
    reqs = [engine.add_request(p, params, a) for p, a in zip(prompts, chosen, strict=True)]
    while engine.has_unfinished():
        engine.step()
        host_peak = max(host_peak, engine.store.stats()["host_bytes"])
    assert all(r.finish_reason == "length" and r.error is None for r in reqs)  # none lost
    stats = llm.stats()
    assert host_peak <= HOST_BOUND
    assert stats["adapters"]["store"]["host_evictions"] > 0
    assert stats["adapters"]["device"]["evictions"] > 0
    assert stats["pool"]["pages_kv"] == 0

    # Served under eviction pressure == served alone == PEFT serving that adapter.
    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()
    for i in (0, 1, 33):
        alone = llm.generate(prompts[i], params, adapters=[chosen[i]])[0].token_ids
        assert reqs[i].output_token_ids == alone
        ids = llm.tokenizer.encode(prompts[i])
        assert alone == peft_generate(base, adapter_dir / chosen[i], ids, 4)


def test_preload_fills_host_ram_up_to_its_bound(adapter_dir):
    """--preload-adapters parses adapters at start-up, in name order, until the host tier is full;
    a request for a preloaded adapter is then served without touching the disk."""
    llm = LLM(dtype="float32", adapter_dir=str(adapter_dir), host_cache_bytes=HOST_BOUND,
              preload_adapters=True)
    store = llm.stats()["adapters"]["store"]
    assert 0 < store["host_count"] < NUM and store["host_bytes"] <= HOST_BOUND
    assert store["disk_loads"] == store["host_count"] + store["host_evictions"]
    assert store["host_evictions"] <= 1  # preloading stops at the first adapter that pushes one out
    names = llm.adapters()
    cached = [n for n in names[: store["host_count"] + 1] if llm.engine.store.is_cached(n)]
    params = SamplingParams(temperature=0, max_tokens=2)
    out = llm.generate("The weather today is", params, adapters=[cached[-1]])
    assert out[0].finish_reason == "length"
    after = llm.stats()["adapters"]["store"]
    assert after["disk_loads"] == store["disk_loads"] and after["host_hits"] > store["host_hits"]
