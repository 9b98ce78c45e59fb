"""Tensor parallelism: the same greedy tokens and logits at TP=1 and TP=N, and transformers + PEFT.

Real multi-process torch.distributed (gloo): slserve starts N-1 worker processes. A small
random-weight Llama (8 heads, 4 KV heads) at TP=2 and TP=4 (at 4 each rank holds one KV head),
and the embedded SmolLM2 (9 heads, 3 KV heads) at TP=3. A mixed batch of base-only and adapter
requests, real `peft` adapters of ranks 8-64 over different target sets that cover all seven.
"""

from __future__ import annotations

import pytest
import torch

from slserve import LLM, SamplingParams
from slserve.model.loader import resolve_model
from slserve.parallel import TPConfigError
from tests.peft_util import ALL_TARGETS, make_peft_adapter, peft_generate
from tests.tiny_llama import write_tiny_llama

ADAPTERS = [
    ("r8-all", 8, ALL_TARGETS),
    ("r16-attn", 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("r32-mlp", 32, ["gate_proj", "up_proj", "down_proj"]),
    ("r64-odown", 64, ["o_proj", "down_proj", "v_proj"]),
]
PROMPTS = ["The quick brown fox", "In a distant galaxy, the crew of the starship", "def fibonacci(n):",
           "My favourite recipe for bread starts with"]
TOP = 8  # logprobs compared across TP sizes


def _work():
    """Every adapter on two prompts, and base-only requests, interleaved."""
    work = [(PROMPTS[i % 4], name) for i, (name, _, _) in enumerate(ADAPTERS * 2)]
    return work + [(p, None) for p in PROMPTS]


def _serve(model_dir, tp: int, paths, work, max_tokens: int, tmp_path):
    llm = LLM(model=str(model_dir), dtype="float32", tp=tp, pool_bytes=96 << 20, threads=1,
              adapter_dir=str(tmp_path / f"store-tp{tp}"))
    try:
        for name, path in paths.items():
            llm.add_adapter(name, path)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=TOP)
        outs = llm.generate([p for p, _ in work], params, adapters=[a for _, a in work])
        assert llm.engine.stats()["failed_steps"] == 0
        return outs
    finally:
        llm.engine.close()


def _top_logprobs(out) -> torch.Tensor:
    """[tokens, TOP] logprob values of each generated token's top candidates."""
    return torch.tensor([[v for _, v in lp.top] for lp in out.logprobs])


def _check_tp(model_dir, sizes, tmp_path, max_tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    paths = {name: make_peft_adapter(base, tmp_path / name, r, targets, seed=i, std=0.05)
             for i, (name, r, targets) in enumerate(ADAPTERS)}
    work = _work()
    results = {tp: _serve(model_dir, tp, paths, work, max_tokens, tmp_path) for tp in (1, *sizes)}
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    for i, (prompt, adapter) in enumerate(work):
        ref = peft_generate(base, paths[adapter] if adapter else None, tok.encode(prompt), max_tokens)
        for tp, outs in results.items():
            assert outs[i].token_ids == ref, f"TP={tp}, adapter {adapter} on {prompt!r}"
        for tp in sizes:
            torch.testing.assert_close(_top_logprobs(results[tp][i]), _top_logprobs(results[1][i]),
                                       atol=2e-4, rtol=1e-4, msg=lambda m, tp=tp: f"TP={tp} vs TP=1: {m}")
    # The adapters change the output (otherwise the comparison could not fail).
    by_adapter = {a: o.token_ids for (p, a), o in zip(work, results[1], strict=True) if p == PROMPTS[0]}
    assert len({tuple(t) for t in by_adapter.values()}) == len(by_adapter)


def test_tiny_llama_tp2_tp4_equal_tp1_and_peft(tmp_path):
    model_dir = write_tiny_llama(tmp_path)
    _check_tp(model_dir, (2, 4), tmp_path, max_tokens=10)


def test_smollm2_tp3_equals_tp1_and_peft(tmp_path):
    _check_tp(resolve_model(None), (3,), tmp_path, max_tokens=8)


def test_sizes_that_do_not_divide_the_heads_are_refused(tmp_path):
    message = r"does not divide this model's 9 attention heads.*sizes that work: 1, 3$"
    with pytest.raises(TPConfigError, match=message):
        LLM(dtype="float32", tp=2, pool_bytes=32 << 20, adapter_dir=str(tmp_path))


def test_triton_path_tp2_equals_torch_path(tmp_path):
    """The GPU code path (Triton attention and LoRA kernels, here under TRITON_INTERPRET on the
    CPU) at TP=1 and TP=2, row-parallel shrink all-reduce included, against the torch path."""
    from transformers import AutoModelForCausalLM

    model_dir = write_tiny_llama(tmp_path, layers=1)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    paths = {name: make_peft_adapter(base, tmp_path / name, r, targets, seed=i, std=0.05)
             for i, (name, r, targets) in enumerate(ADAPTERS[:2])}
    work = [(PROMPTS[0], "r8-all"), (PROMPTS[1], None), (PROMPTS[2], "r16-attn"), (PROMPTS[0], "r16-attn")]
    outs = {}
    for backend, tp in (("torch", 1), ("triton", 1), ("triton", 2)):
        llm = LLM(model=str(model_dir), dtype="float32", tp=tp, kernel_backend=backend, pool_bytes=32 << 20,
                  threads=1, adapter_dir=str(tmp_path / f"store-{backend}-{tp}"))
        try:
            for name, path in paths.items():
                llm.add_adapter(name, path)
            params = SamplingParams(temperature=0, max_tokens=4, logprobs=TOP)
            outs[backend, tp] = llm.generate([p for p, _ in work], params, adapters=[a for _, a in work])
        finally:
            llm.engine.close()
    ref = outs["torch", 1]
    for key in (("triton", 1), ("triton", 2)):
        for i, (got, want) in enumerate(zip(outs[key], ref, strict=True)):
            assert got.token_ids == want.token_ids, f"{key}, request {i}"
            torch.testing.assert_close(_top_logprobs(got), _top_logprobs(want), atol=2e-4, rtol=1e-4)
