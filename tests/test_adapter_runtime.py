"""Kinds applied per token: nested ranks of LoRA (`name:rK`), DoRA and IA3 output scales.

Every adapter is made with the real peft library on the embedded model (float32, nonzero trained
parameters); greedy tokens are compared with transformers + peft serving the same adapter (for a
nested rank: peft serving a copy of the adapter truncated to rank K), alone and in one mixed batch
with plain LoRA and base requests, on the torch path and on the Triton path (under
TRITON_INTERPRET on machines without a GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig
from safetensors.torch import load_file, save_file

from slserve import LLM, SamplingParams
from slserve.engine import RequestError
from slserve.model.loader import resolve_model
from tests.peft_util import make_peft_kind_adapter, peft_generate

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

MAX_TOKENS = 8
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "My favourite recipe for bread starts with"]
LAYERS = [0, 7, 14, 21, 28]
NESTED = 4  # the lower rank asked of the rank-16 adapter

ADAPTERS = {
    "lora16": (
        lambda: LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, layers_to_transform=LAYERS,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
        {"lora_A": 0.1, "lora_B": 0.08},
    ),
    "dora": (
        lambda: LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True, layers_to_transform=LAYERS,
                           target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
        {"lora_A": 0.1, "lora_B": 0.05},
    ),
    "ia3": (
        lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        {},
    ),
}


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


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()
    src = tmp_path_factory.mktemp("runtime-kinds")
    paths = {
        name: make_peft_kind_adapter(base, src / name, config(), seed=20 + i, std=std, edit=randomize_vectors)
        for i, (name, (config, std)) in enumerate(ADAPTERS.items())
    }
    paths[f"lora16:r{NESTED}"] = truncated_copy(paths["lora16"], src / "lora16-truncated", NESTED)
    return base, paths


@pytest.fixture(scope="module")
def refs(made):
    base, paths = made
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    work = [(p, a) for p in PROMPTS for a in (*paths, None)]
    return {(p, a): peft_generate(base, paths[a] if a else None, tok.encode(p), MAX_TOKENS) for p, a in work}


def serve(made, tmp_path_factory, backend: str) -> LLM:
    _, paths = made
    llm = LLM(dtype="float32", pool_bytes=128 << 20, kernel_backend=backend,
              adapter_dir=str(tmp_path_factory.mktemp(f"runtime-store-{backend}")))
    for name in ADAPTERS:
        llm.add_adapter(name, paths[name])
    return llm


@pytest.fixture(scope="module")
def llm(made, tmp_path_factory):
    llm = serve(made, tmp_path_factory, "torch")
    yield llm
    llm.engine.close()


def generate(llm: LLM, work: list[tuple[str, str | None]]):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outs = llm.generate([p for p, _ in work], params, adapters=[a for _, a in work])
    assert llm.engine.stats()["failed_steps"] == 0
    return [o.token_ids for o in outs]


def test_references_differ(refs) -> None:
    """Each adapter (and the nested rank) changes the reference tokens: the comparisons can fail."""
    for name in (*ADAPTERS, f"lora16:r{NESTED}"):
        assert any(refs[(p, name)] != refs[(p, None)] for p in PROMPTS), name
    assert any(refs[(p, f"lora16:r{NESTED}")] != refs[(p, "lora16")] for p in PROMPTS)


@pytest.mark.parametrize("adapter", [f"lora16:r{NESTED}", "dora", "ia3"])
def test_alone_matches_peft(llm, refs, adapter: str) -> None:
    for prompt in PROMPTS[:2]:
        assert generate(llm, [(prompt, adapter)])[0] == refs[(prompt, adapter)], prompt


def mixed_work(refs) -> list[tuple[str, str | None]]:
    names = sorted({a for _, a in refs}, key=str)
    return [(p, a) for i, p in enumerate(PROMPTS) for a in names[i % 2 :] + names[: i % 2]]


def test_mixed_batch_matches_peft(llm, refs) -> None:
    """Nested rank, full rank, DoRA, IA3 and base requests in one batch, each equal to peft alone."""
    work = mixed_work(refs)
    for (prompt, adapter), got in zip(work, generate(llm, work), strict=True):
        assert got == refs[(prompt, adapter)], f"{adapter} on {prompt!r}"


@pytest.mark.parametrize(("model", "words"), [
    ("lora16:r17", "`lora16:r17`: rank 17 is larger than the adapter's rank 16"),
    ("lora16:r0", "`lora16:r0`: a nested rank must be at least 1"),
    ("lora16:r-2", "a nested rank must be at least 1"),
    ("dora:r4", "nested ranks apply to LoRA adapters only; 'dora' is a DORA adapter"),
    ("ia3:r1", "'ia3' is a IA3 adapter"),
])
def test_bad_nested_ranks_are_refused(llm, model: str, words: str) -> None:
    with pytest.raises(RequestError, match=words) as info:
        llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=1), adapter=model)
    assert info.value.status == 400 and info.value.param == "model"
    for missing in ("nothing:r4", "lora16:rx"):
        with pytest.raises(RequestError, match="does not exist") as info:
            llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=1), adapter=missing)
        assert info.value.status == 404
