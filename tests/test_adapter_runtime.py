"""Kinds applied per token: nested ranks of LoRA (`name:rK`), DoRA and IA3 output scales.

Every adapter is made with the real peft library on a small random Llama (float32, nonzero
trained parameters, magnitudes and IA3 vectors scattered around their initial values); greedy
tokens are compared with transformers + peft serving the same adapter (for a nested rank: peft
serving a copy of the adapter truncated to rank K), alone and in one mixed batch with plain LoRA
and base requests, on the torch path, on the Triton path (under TRITON_INTERPRET on machines
without a GPU) and at TP=2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from slserve import LLM, SamplingParams
from slserve.adapters.dora import BaseWeights
from slserve.adapters.peft_format import AdapterError, parse_peft_adapter
from slserve.engine import RequestError
from slserve.model.loader import load_model_config
from tests.peft_util import make_peft_kind_adapter, peft_generate
from tests.tiny_llama import write_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

MAX_TOKENS = 8
PROMPTS = ["The quick brown fox", "My favourite recipe for bread starts with"]
NESTED = 4  # the lower rank asked of the rank-16 adapter

def randomize_vectors(model) -> None:
    """Magnitudes and IA3 vectors scattered around their initial values (1 and |W|), so that a
    scale applied to the wrong tokens or columns changes the tokens."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name or "ia3_l" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def truncated_copy(src: Path, dst: Path, rank: int) -> Path:
    """The adapter cut to its first `rank` ranks with peft's own layout: r=rank, lora_A rows
    [:rank], lora_B columns [:rank], alpha unchanged."""
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, "r": rank}))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    cut = {k: (v[:rank] if "lora_A" in k else v[:, :rank]).contiguous() for k, v in tensors.items()}
    save_file(cut, str(dst / "adapter_model.safetensors"))
    return dst


def generate(llm: LLM, work: list[tuple[str, str | None]], max_tokens: int = MAX_TOKENS):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs = llm.generate([p for p, _ in work], params, adapters=[a for _, a in work])
    assert llm.engine.stats()["failed_steps"] == 0
    return [o.token_ids for o in outs]


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "lora16": (lambda: LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS),
               {"lora_A": 0.1, "lora_B": 0.1}),
    "dora": (lambda: LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True, target_modules=TARGETS),
             {"lora_A": 0.1, "lora_B": 0.1}),
    "ia3": (lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                              feedforward_modules=["down_proj"]), {}),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(model dir, adapter paths, greedy references) on a 2-layer random Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("runtime-tiny")
    model_dir = write_tiny_llama(root, layers=2)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    paths = {name: make_peft_kind_adapter(base, root / name, config(), 30 + i, std, randomize_vectors)
             for i, (name, (config, std)) in enumerate(ADAPTERS.items())}
    paths[f"lora16:r{NESTED}"] = truncated_copy(paths["lora16"], root / "lora16-truncated", NESTED)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    work = [(p, a) for p in PROMPTS for a in [*paths, None]]
    refs = {(p, a): peft_generate(base, paths[a] if a else None, tok.encode(p), MAX_TOKENS) for p, a in work}
    for name in paths:  # each adapter changes the tokens: the comparison can fail
        assert any(refs[(p, name)] != refs[(p, None)] for p in PROMPTS), name
    return model_dir, paths, work, refs


@pytest.mark.parametrize(("backend", "tp"), [("triton", 1), ("torch", 2)])
def test_other_paths_match_peft(made, tmp_path, backend: str, tp: int) -> None:
    """Nested rank, DoRA, IA3, LoRA and base requests in one batch on the Triton kernels (under
    TRITON_INTERPRET without a GPU: one prompt each and fewer tokens, the interpreter is slow)
    and at TP=2, where each rank scales its own output columns (all hidden columns of its partial
    sums for o and down)."""
    model_dir, paths, work, refs = made
    n = MAX_TOKENS
    if backend == "triton":
        work, n = [(p, a) for p, a in work if p == PROMPTS[0]], 4
    llm = LLM(model=str(model_dir), dtype="float32", tp=tp, kernel_backend=backend, pool_bytes=32 << 20,
              threads=1, adapter_dir=str(tmp_path / "store"))
    try:
        for name in ADAPTERS:
            llm.add_adapter(name, paths[name])
        for (prompt, adapter), got in zip(work, generate(llm, work, n), strict=True):
            assert got == refs[(prompt, adapter)][:n], f"{adapter} on {prompt!r}"
    finally:
        llm.engine.close()


@pytest.fixture(scope="module")
def llm(made, tmp_path_factory):
    model_dir, paths, _, _ = made
    llm = LLM(model=str(model_dir), dtype="float32", pool_bytes=32 << 20, threads=1,
              adapter_dir=str(tmp_path_factory.mktemp("runtime-store")))
    for name in ADAPTERS:
        llm.add_adapter(name, paths[name])
    yield llm
    llm.engine.close()


def test_nested_rank_differs_from_full_rank(made) -> None:
    refs = made[3]
    assert any(refs[(p, f"lora16:r{NESTED}")] != refs[(p, "lora16")] for p in PROMPTS)


@pytest.mark.parametrize("adapter", [f"lora16:r{NESTED}", "dora", "ia3"])
def test_alone_matches_peft(llm, made, adapter: str) -> None:
    refs = made[3]
    for prompt in PROMPTS:
        assert generate(llm, [(prompt, adapter)])[0] == refs[(prompt, adapter)], prompt


def test_mixed_batch_matches_peft(llm, made) -> None:
    """Nested rank, full rank, DoRA, IA3 and base requests in one batch, each equal to peft alone,
    in two orders (segments of one adapter at both ranks next to each other, and apart)."""
    work = made[2]
    for order in (work, work[::-1]):
        for (prompt, adapter), got in zip(order, generate(llm, order), strict=True):
            assert got == made[3][(prompt, adapter)], f"{adapter} on {prompt!r}"


@pytest.mark.parametrize(("model", "words"), [
    ("lora16:r17", "`lora16:r17`: rank 17 is larger than the adapter's rank 16"),
    ("lora16:r0", "`lora16:r0`: a nested rank must be at least 1"),
    ("lora16:r-2", "a nested rank must be at least 1"),
    ("dora:r4", "nested ranks apply to LoRA adapters only; 'dora' is of kind DORA"),
    ("ia3:r1", "'ia3' is of kind IA3"),
])
def test_bad_nested_ranks_are_refused(llm, model: str, words: str) -> None:
    with pytest.raises(RequestError, match=words) as info:
        llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=1), adapter=model)
    assert info.value.status == 400 and info.value.param == "model"
    for missing in ("nothing:r4", "lora16:rx"):
        with pytest.raises(RequestError, match="does not exist") as info:
            llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=1), adapter=missing)
        assert info.value.status == 404




# -- DoRA's norm at load -------------------------------------------------------------------------------


def test_dora_scale_and_shift_reproduce_peft_with_bias(tmp_path) -> None:
    """On a model with attention biases: vector * (x W^T + b + lora(x)) + shift is peft's DoRA layer,
    whose bias is not scaled, for every module, with the norms taken from the checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = write_tiny_llama(tmp_path, layers=1, attention_bias=True)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    path = make_peft_kind_adapter(base, tmp_path / "dora", ADAPTERS["dora"][0](), seed=3,
                                  std=ADAPTERS["dora"][1], edit=randomize_vectors)
    cfg = load_model_config(model_dir)
    files = [(path / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")]
    adapter = parse_peft_adapter(*files, cfg, 64, "dora", BaseWeights(model_dir, cfg))
    peft_model = PeftModel.from_pretrained(base, str(path)).eval()
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    shifted = 0
    with torch.no_grad():
        for key, module in peft_model.named_modules():
            if not isinstance(module, BaseTunerLayer) or "layers.0" not in key:
                continue
            name = key.rsplit(".", 1)[1]
            w, s = adapter.modules[(0, name)], adapter.output_scales[(0, name)]
            xi = x[:, : module.base_layer.in_features]
            y = module.base_layer(xi) + w.scale * (xi @ w.a.T) @ w.b.T
            got = s.vector * y + (s.shift if s.shift is not None else 0)
            torch.testing.assert_close(got, module(xi), rtol=1e-5, atol=1e-5)
            shifted += s.shift is not None
    assert shifted == 4  # q, k, v and o have biases (attention_bias)


def test_dora_without_base_weights_is_refused(made) -> None:
    path = made[1]["dora"]
    files = [(path / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")]
    with pytest.raises(AdapterError, match="'dora': DoRA adapters need the base model's weights"):
        parse_peft_adapter(*files, load_model_config(made[0]), 64, "dora")
