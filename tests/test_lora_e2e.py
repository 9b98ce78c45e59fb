"""Mixed-adapter batches end to end, against transformers + peft serving each adapter alone."""

from __future__ import annotations

import pytest
import torch

from slserve import LLM, SamplingParams
from slserve.model.loader import resolve_model
from tests.peft_util import ALL_TARGETS, make_peft_adapter, peft_generate

MAX_TOKENS = 12

# (name, rank, target modules): ranks 8-64, different target sets, all seven modules covered.
ADAPTERS = [
    ("r8-all", 8, ALL_TARGETS),
    ("r16-attn", 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("r32-mlp", 32, ["gate_proj", "up_proj", "down_proj"]),
    ("r64-all", 64, ALL_TARGETS),
    ("r8-qv", 8, ["q_proj", "v_proj"]),
    ("r16-down", 16, ["down_proj", "o_proj"]),
    ("r32-kup", 32, ["k_proj", "up_proj"]),
    ("r64-gate", 64, ["gate_proj", "q_proj"]),
]
PROMPTS = [
    "The quick brown fox",
    "In a distant galaxy, the crew of the starship",
    "def fibonacci(n):",
    "My favourite recipe for bread starts with",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()
    src = tmp_path_factory.mktemp("peft")
    paths = {
        name: make_peft_adapter(base, src / name, r, targets, seed=i)
        for i, (name, r, targets) in enumerate(ADAPTERS)
    }
    llm = LLM(dtype="float32", pool_bytes=768 << 20, adapter_dir=str(tmp_path_factory.mktemp("store")))
    for name, path in paths.items():
        llm.add_adapter(name, path)
    tok = llm.tokenizer
    # 16 adapter requests (each adapter twice, with different prompts) and 4 base-only requests.
    work = [(PROMPTS[i % 4], name) for i, (name, _, _) in enumerate(ADAPTERS * 2)]
    work += [(p, None) for p in PROMPTS]
    expected = [peft_generate(base, paths[a] if a else None, tok.encode(p), MAX_TOKENS) for p, a in work]
    return llm, work, expected


def test_mixed_batch_matches_peft_per_adapter(setup):
    llm, work, expected = setup
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outs = llm.generate([p for p, _ in work], params, adapters=[a for _, a in work])
    for (prompt, adapter), out, ref in zip(work, outs, expected, strict=True):
        assert out.token_ids == ref, f"adapter {adapter} on {prompt!r}"
    # The adapters really change the output (otherwise this test could not fail).
    base_out = {p: ref for (p, a), ref in zip(work, expected, strict=True) if a is None}
    differing = sum(ref != base_out[p] for (p, a), ref in zip(work, expected, strict=True) if a)
    assert differing >= 12
    pool = llm.stats()["pool"]
    assert pool["pages_kv"] == 0 and pool["pages_adapter"] > 0


def test_same_request_alone_and_mixed(setup):
    llm, work, expected = setup
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    for i in (0, 3, 17):
        prompt, adapter = work[i]
        alone = llm.generate(prompt, params, adapters=[adapter])[0]
        assert alone.token_ids == expected[i]


def test_adapter_stats_and_removal(setup):
    llm, work, _ = setup
    stats = llm.stats()["adapters"]
    assert stats["store"]["disk_count"] == len(ADAPTERS)
    assert stats["device"]["loads"] >= len(ADAPTERS)
    llm.remove_adapter("r8-qv")
    assert "r8-qv" not in llm.adapters()
    from slserve.engine import RequestError

    with pytest.raises(RequestError):
        llm.generate("hi", SamplingParams(max_tokens=2), adapters=["r8-qv"])
