"""Kinds that change the sequence or the norms, served in the batched forward: prompt tuning and
P-tuning (virtual tokens before the prompt), LongLoRA's saved RMSNorm weights, prefix tuning
(per-layer prefix keys and values in the adapter's own KV pages, shared by its requests).

Every adapter is made with the real peft library on a small random Llama (float32, random
nonzero trained parameters); greedy tokens are compared with transformers + peft serving the
same adapter alone, for each kind alone and in mixed batches with every other served kind, plain
LoRA and base requests, on the torch path, on the Triton path and at TP=2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    VeraConfig,
)
from safetensors.torch import load_file, save_file

from slserve import LLM, SamplingParams
from slserve.engine import RequestError
from tests.peft_util import make_peft_kind_adapter, peft_forward_greedy, peft_generate
from tests.test_adapter_runtime import randomize_vectors, truncated_copy
from tests.tiny_llama import write_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

MAX_TOKENS = 8
PROMPTS = ["The quick brown fox", "My favourite recipe for bread starts with"]
PAGE_TOKENS = 8
MAX_MODEL_LEN = 64


def scatter_saved_norms(model) -> None:
    """Trained norm weights scattered around their initial 1, different in every copy."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.copy_(1 + 0.4 * torch.randn(p.shape, generator=g))


TARGETS = ["q_proj", "v_proj", "down_proj"]
# name -> (peft config, std of the parameters whose names hold each key, edit)
ADAPTERS = {
    "prompt": (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
               {"prompt_encoder": 0.5}, None),
    "ptuning": (lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=11,
                                            encoder_hidden_size=32),
                {"prompt_encoder": 0.3}, None),
    "longlora": (lambda: LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                    modules_to_save=["input_layernorm", "post_attention_layernorm", "norm"]),
                 {"lora_A": 0.1, "lora_B": 0.1}, scatter_saved_norms),
    "longlora_post": (lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["o_proj"],
                                         modules_to_save=["post_attention_layernorm"]),
                      {"lora_A": 0.1, "lora_B": 0.1}, scatter_saved_norms),
    # 11 slots: one page shared, 3 slots copied into each request's first page; 3: copied only; 8: shared only
    "prefix": (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=11),
               {"prompt_encoder": 0.5}, None),
    "prefix_small": (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                     {"prompt_encoder": 0.5}, None),
    "prefix_page": (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PAGE_TOKENS),
                    {"prompt_encoder": 0.5}, None),
    "lora": (lambda: LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS),
             {"lora_A": 0.1, "lora_B": 0.1}, None),
    # the kinds served before, for the batch of every kind
    "dora": (lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=TARGETS),
             {"lora_A": 0.1, "lora_B": 0.1}, randomize_vectors),
    "ia3": (lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                              feedforward_modules=["down_proj"]), {}, randomize_vectors),
    "vera": (lambda: VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
             {"vera_lambda_d": 1.0, "vera_lambda_b": 0.5}, None),
    "adalora": (lambda: AdaLoraConfig(init_r=4, total_step=10, lora_alpha=8,
                                      target_modules=["q_proj", "down_proj"]),
                {"lora_A": 0.3, "lora_E": 1.0, "lora_B": 0.3}, None),
}
NESTED = "lora:r2"  # a nested rank of the rank-8 LoRA


# Their reference is peft's forward over the whole sequence (tests/peft_util.py: peft_forward_greedy).
PROMPT_LEARNING = {"prompt", "ptuning", "prefix", "prefix_small", "prefix_page"}


def reference(base, path: Path | None, name: str | None, ids: list[int]) -> list[int]:
    if name in PROMPT_LEARNING:
        return peft_forward_greedy(base, path, ids, MAX_TOKENS)
    return peft_generate(base, path, ids, MAX_TOKENS)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(model dir, adapter paths, work, greedy references) on a 2-layer random Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("prompt-kinds-tiny")
    model_dir = write_tiny_llama(root, layers=2)

    def base():  # peft's unload keeps a trained copy of modules_to_save in the model: a fresh one each time
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    paths = {name: make_peft_kind_adapter(base(), root / name, config(), 50 + i, std, edit)
             for i, (name, (config, std, edit)) in enumerate(ADAPTERS.items())}
    paths[NESTED] = truncated_copy(paths["lora"], root / "lora-truncated", 2)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    work = [(p, a) for p in PROMPTS for a in [*paths, None]]
    refs = {(p, a): reference(base(), paths[a] if a else None, a, tok.encode(p)) for p, a in work}
    for name in paths:  # each adapter changes the tokens: the comparison can fail
        assert any(refs[(p, name)] != refs[(p, None)] for p in PROMPTS), name
    return model_dir, paths, work, refs


def generate(llm: LLM, work: list[tuple[str, str | None]], max_tokens: int = MAX_TOKENS):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs = llm.generate([p for p, _ in work], params, adapters=[a for _, a in work])
    assert llm.engine.stats()["failed_steps"] == 0
    return outs


def make_llm(made, store, **kwargs) -> LLM:
    kwargs = {"pool_bytes": 8 << 20, **kwargs}
    llm = LLM(model=str(made[0]), dtype="float32", threads=1, adapter_dir=str(store),
              page_tokens=PAGE_TOKENS, max_model_len=MAX_MODEL_LEN, **kwargs)
    for name in ADAPTERS:
        llm.add_adapter(name, made[1][name])
    return llm


@pytest.fixture(scope="module")
def llm(made, tmp_path_factory):
    llm = make_llm(made, tmp_path_factory.mktemp("prompt-kinds-store"))
    yield llm
    llm.engine.close()


@pytest.mark.parametrize("adapter", ["prompt", "ptuning", "longlora", "longlora_post", "prefix",
                                     "prefix_small", "prefix_page"])
def test_alone_matches_peft(llm, made, adapter: str) -> None:
    for prompt in PROMPTS:
        out = generate(llm, [(prompt, adapter)])[0]
        assert out.token_ids == made[3][(prompt, adapter)], prompt


def test_mixed_batch_matches_peft(llm, made) -> None:
    """Every served kind (a nested rank too) with plain LoRA and base requests in one batch, in two
    orders, each equal to peft alone; the virtual slots show in no output (prompt token counts are
    the prompt's)."""
    work = made[2]
    for order in (work, work[::-1]):
        for (prompt, adapter), out in zip(order, generate(llm, order), strict=True):
            assert out.token_ids == made[3][(prompt, adapter)], f"{adapter} on {prompt!r}"
            assert len(out.prompt_token_ids) == len(llm.tokenizer.encode(prompt))


def test_saved_norms_are_their_own(made, tmp_path) -> None:
    """The saved norms alone change the tokens: peft serving the same LoRA pairs without them
    gives other tokens (the norms are applied, not only parsed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dst = made[1]["longlora"], tmp_path / "pairs-only"
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "lora_" in k}, str(dst / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(str(made[0]), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(made[0])).encode(PROMPTS[0])
    assert peft_generate(base, dst, ids, MAX_TOKENS) != made[3][(PROMPTS[0], "longlora")]


def test_chunked_prefill_splits_the_virtual_tokens(made, tmp_path) -> None:
    """A token budget smaller than the virtual tokens: the prefill runs over several steps, the first
    of them of virtual tokens alone."""
    llm = make_llm(made, tmp_path / "store", max_num_batched_tokens=4)
    try:
        for adapter in ("ptuning", "prompt"):
            out = generate(llm, [(PROMPTS[1], adapter)])[0]
            assert out.token_ids == made[3][(PROMPTS[1], adapter)], adapter
    finally:
        llm.engine.close()


def test_prompt_logprobs_skip_the_virtual_tokens(llm, made) -> None:
    """echo + logprobs: one entry per prompt token (the first None), the virtual slots not shown,
    each the log-softmax of the peft model's logits at that prompt position."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = llm.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate([ids], params, adapters=["prompt"])[0]
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    base = AutoModelForCausalLM.from_pretrained(str(made[0]), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(made[1]["prompt"])).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # [n + len(ids), vocab]
    want = torch.log_softmax(logits[-len(ids):-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_max_model_len_counts_the_virtual_tokens(llm) -> None:
    ids = list(range(100, 100 + MAX_MODEL_LEN - 10))
    llm.engine.abort(llm.engine.add_request(ids, SamplingParams(max_tokens=10)).request_id)  # base: fits
    with pytest.raises(RequestError, match=r"requested 69 tokens \(5 virtual tokens of adapter 'prompt', 54 "
                                           r"in the prompt, 10 for the completion\)") as info:
        llm.engine.add_request(ids, SamplingParams(max_tokens=10), adapter="prompt")
    assert info.value.status == 400 and info.value.param == "max_tokens"
    assert llm.engine.stats()["running"] == llm.engine.stats()["waiting"] == 0


def test_max_model_len_counts_the_virtual_tokens_before_the_first_use(made, tmp_path) -> None:
    """An adapter that sat on disk from start-up, never parsed: its config's num_virtual_tokens count."""
    import shutil

    shutil.copytree(made[1]["prompt"], tmp_path / "store" / "prompt")
    llm = LLM(model=str(made[0]), dtype="float32", threads=1, adapter_dir=str(tmp_path / "store"),
              pool_bytes=8 << 20, page_tokens=PAGE_TOKENS, max_model_len=MAX_MODEL_LEN)
    try:
        assert llm.engine.store.info("prompt").ranks is None  # not parsed
        ids = list(range(100, 100 + MAX_MODEL_LEN - 10))
        with pytest.raises(RequestError, match=r"\(5 virtual tokens of adapter 'prompt', 54 in the prompt"):
            llm.engine.add_request(ids, SamplingParams(max_tokens=10), adapter="prompt")
    finally:
        llm.engine.close()


# -- prefix pages in the pool ---------------------------------------------------------------------------


def prefix_pages(llm: LLM) -> int:
    return llm.engine.stats()["pool"]["pages_adapter_prefix"]


def test_prefix_pages_are_held_once_and_freed_at_eviction(made, tmp_path) -> None:
    """Four running requests of one prefix adapter (11 slots: one page shared, three slots copied)
    hold its two prefix pages once; each holds only its own pages beside them; /metrics counts
    them; the adapter's eviction frees them, and nothing leaks."""
    from slserve.api.metrics import ServerMetrics

    llm = make_llm(made, tmp_path / "store")
    engine = llm.engine
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        reqs = [engine.add_request(PROMPTS[i % 2], params, adapter="prefix") for i in range(4)]
        engine.step()
        assert prefix_pages(llm) == 2 and engine.stats()["running"] == 4
        dev = reqs[0].device_adapter
        assert all(r.device_adapter is dev and r.shared_pages == [dev.prefix_pages[0]] for r in reqs)
        own = {p for r in reqs for p in r.block_table}
        assert len(own) == sum(len(r.block_table) for r in reqs) and not own & set(dev.prefix_pages)
        assert engine.stats()["pool"]["pages_kv"] == len(own)
        assert b"slserve_pool_prefix_pages 2.0" in ServerMetrics().render(engine.stats())
        while engine.has_unfinished():
            engine.step()
        for i, r in enumerate(reqs):
            assert r.output_token_ids == made[3][(PROMPTS[i % 2], "prefix")]
        engine.check_pool()
        assert engine.stats()["pool"]["pages_kv"] == 0 and prefix_pages(llm) == 2  # resident, idle
        engine.adapter_cache.evict_idle(engine.pool.num_pages)
        assert prefix_pages(llm) == 0 and engine.stats()["pool"]["pages_adapter"] == 0
        engine.check_pool()
        assert generate(llm, [(PROMPTS[0], "prefix")])[0].token_ids == made[3][(PROMPTS[0], "prefix")]
    finally:
        engine.close()


def test_preempted_requests_come_back_equal(made, tmp_path) -> None:
    """A pool too small for every request at once: requests of each kind are preempted and
    recomputed (virtual slots, shared prefix pages and the partial page copy set up again), each
    still equal to peft, and every page is back at the end."""
    kv_page = 2 * 2 * PAGE_TOKENS * 4 * 16 * 4  # layers, K and V, tokens, KV heads, head dim, float32
    llm = make_llm(made, tmp_path / "store", pool_bytes=24 * kv_page)
    try:
        work = made[2] * 2
        for (prompt, adapter), out in zip(work, generate(llm, work), strict=True):
            assert out.token_ids == made[3][(prompt, adapter)], f"{adapter} on {prompt!r}"
        assert llm.engine.stats()["preemptions"] > 0
        llm.engine.check_pool()
        assert llm.engine.stats()["pool"]["pages_kv"] == 0
    finally:
        llm.engine.close()


def test_malformed_upload_disturbs_nothing(made, tmp_path) -> None:
    """A prefix adapter for another model, uploaded while requests of every kind run: refused with
    its reason, the store and the running requests unchanged."""
    from safetensors.torch import save

    from slserve.adapters.peft_format import AdapterError

    llm = make_llm(made, tmp_path / "store")
    engine = llm.engine
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        reqs = [(engine.add_request(p, params, adapter=a), p, a) for p, a in made[2]]
        engine.step()
        src = made[1]["prefix"]
        config = json.loads((src / "adapter_config.json").read_text())
        tensors = load_file(str(src / "adapter_model.safetensors"))
        wide = {"prompt_embeddings": torch.randn(11, tensors["prompt_embeddings"].shape[1] * 2)}
        before = engine.adapters(), engine.stats()["pool"]
        for name, replace in (("new", False), ("prefix", True)):
            with pytest.raises(AdapterError, match=r"prompt_embeddings has shape \[11, 512\], but the base "
                                                   r"model needs \[11, 256\]"):
                engine.add_adapter_bytes(name, json.dumps(config).encode(), save(wide), replace=replace)
        assert (engine.adapters(), engine.stats()["pool"]) == before
        while engine.has_unfinished():
            engine.step()
        for req, prompt, adapter in reqs:
            assert req.output_token_ids == made[3][(prompt, adapter)], adapter
        assert engine.stats()["failed_steps"] == 0
    finally:
        engine.close()


def test_tensor_parallel_matches_peft(made, tmp_path) -> None:
    """TP=2 (gloo on CPUs): every kind with LoRA and base requests in one batch; each rank holds its
    KV heads of the prefix pages and whole virtual-token and norm rows. One prompt each."""
    work = [(p, a) for p, a in made[2] if p == PROMPTS[0]]
    llm = make_llm(made, tmp_path / "store", tp=2)
    try:
        for (prompt, adapter), out in zip(work, generate(llm, work), strict=True):
            assert out.token_ids == made[3][(prompt, adapter)], f"{adapter} on {prompt!r}"
    finally:
        llm.engine.close()


def test_triton_path_matches_peft(made, tmp_path) -> None:
    """The Triton kernels (under TRITON_INTERPRET without a GPU: one prompt, four tokens, the
    interpreter is slow): virtual tokens, saved norms and prefix pages beside LoRA and base."""
    n = 4
    work = [(PROMPTS[0], a) for a in ("prompt", "longlora", "prefix", "lora", None)]
    llm = make_llm(made, tmp_path / "store", kernel_backend="triton")
    try:
        for (prompt, adapter), out in zip(work, generate(llm, work, n), strict=True):
            assert out.token_ids == made[3][(prompt, adapter)][:n], f"{adapter} on {prompt!r}"
    finally:
        llm.engine.close()
