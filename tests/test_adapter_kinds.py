"""PEFT adapter kinds: conversion checked against the real peft library, greedy tokens against
transformers + peft, and every refusal, in the store and through the HTTP server.

Adapters are made with peft (nonzero trained parameters from a fixed seed). The conversion tests
run on a tiny Llama; the end-to-end tests serve AdaLoRA (with a pruned rank pattern) and VeRA
adapters of the embedded model beside plain LoRA and base requests.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    VeraConfig,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load as load_bytes
from safetensors.torch import save

from slserve import LLM, SamplingParams
from slserve.adapters.peft_format import AdapterError, convert_peft_adapter, parse_peft_adapter
from slserve.memory.adapter_store import AdapterStore
from slserve.model.loader import resolve_model
from tests.peft_util import make_peft_kind_adapter, peft_generate
from tests.test_adapter_format import _tree, model_config, tiny_llama
from tests.test_server import ServerProcess, assert_error, openai_client, upload

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    # An AdaLoRA module pruned to rank 0 is saved as zero-sized tensors, which peft warns about.
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape"),
    # peft checks AdaLoRA's rank_pattern (masks) as if it were LoRA's (ranks), and warns.
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match"),
    pytest.mark.filterwarnings("ignore:Specified to not save vera_A and vera_B"),
]

_MODULE_KEY = re.compile(r"layers\.(\d+)\.\w+\.(\w+)$")
SERVED = "served kinds: LORA, ADALORA, VERA, DORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING"

# -- adapters of every kind on the tiny Llama --------------------------------------------------------

ADALORA_STD = {"lora_A": 0.3, "lora_E": 1.0, "lora_B": 0.3}
EMBEDDING = {"embedding": 1.0}  # a prompt encoder's embedding


def adalora_pruning(masks: dict[str, list[bool]], zero_unmasked: tuple[str, int] | None = None):
    """An edit that prunes AdaLoRA triplets as the rank allocator does: masked lora_E entries are
    zeroed and the masks saved as rank_pattern. zero_unmasked = (module key, i) also zeroes a kept
    entry, which leaves it in the file."""

    def edit(model) -> None:
        for name, p in model.named_parameters():
            key = name.removeprefix("base_model.model.").removesuffix(".default")
            if key in masks:
                p.masked_fill_(~torch.tensor(masks[key])[:, None], 0.0)
            if zero_unmasked is not None and key == zero_unmasked[0]:
                p[zero_unmasked[1]] = 0.0
        model.peft_config["default"].rank_pattern = {f"{k}.default": v for k, v in masks.items()}

    return edit


TINY_MASKS = {
    "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True],
    "model.layers.1.mlp.down_proj.lora_E": [False, False, False, False],
    "model.layers.1.self_attn.q_proj.lora_E": [True, True, False, False],
}

# name -> (peft config, std of the trained parameters, edit)
TINY_KINDS: dict[str, tuple[Callable[[], object], dict[str, float], Callable | None]] = {
    "adalora": (
        lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=6,
                              target_modules=["q_proj", "down_proj"]),
        ADALORA_STD,
        adalora_pruning(TINY_MASKS, zero_unmasked=("model.layers.0.mlp.down_proj.lora_E", 1)),
    ),
    "vera": (
        lambda: VeraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        {"vera_lambda_d": 1.0, "vera_lambda_b": 0.5},
        None,
    ),
    "dora": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
             {"lora_A": 0.3, "lora_B": 0.3, "lora_magnitude_vector": 1.0}, None),
    "ia3": (lambda: IA3Config(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                              feedforward_modules=["down_proj"]), {"ia3_l": 1.0}, None),
    "prompt": (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), EMBEDDING, None),
    "ptuning": (
        lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
        EMBEDDING,
        None,
    ),
    "prefix": (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), EMBEDDING, None),
    "longlora": (
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"]),
        {"lora_A": 0.3, "lora_B": 0.3, "modules_to_save": 1.0},
        None,
    ),
    # Refused: other kinds, and trained copies of the embedding or the output head.
    "loha": (lambda: LoHaConfig(r=4, target_modules=["q_proj"]), {}, None),
    "lokr": (lambda: LoKrConfig(r=4, target_modules=["q_proj"]), {}, None),
    "oft": (lambda: OFTConfig(oft_block_size=4, r=0, target_modules=["q_proj"]), {}, None),
    "boft": (lambda: BOFTConfig(boft_block_size=4, target_modules=["q_proj"]), {}, None),
    "vera_unsaved": (lambda: VeraConfig(r=4, target_modules=["q_proj"], save_projection=False), {}, None),
    "lora_embed": (lambda: LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]), {},
                   None),
    "lora_lm_head": (lambda: LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), {},
                     None),
    "adalora_embed": (
        lambda: AdaLoraConfig(init_r=4, total_step=10, target_modules=["q_proj"],
                              modules_to_save=["embed_tokens"]),
        ADALORA_STD,
        None,
    ),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """name -> a folder saved by peft on tiny_llama() built with seed 0 (see tiny_base)."""
    root = tmp_path_factory.mktemp("tiny-kinds")
    out = {}
    for i, (name, (config, std, edit)) in enumerate(TINY_KINDS.items()):
        out[name] = make_peft_kind_adapter(tiny_base(), root / name, config(), seed=i, std=std, edit=edit)
    return out


def tiny_base():
    torch.manual_seed(0)
    return tiny_llama()


def files(path: Path) -> tuple[bytes, bytes]:
    return (path / "adapter_config.json").read_bytes(), (path / "adapter_model.safetensors").read_bytes()


def convert(path: Path, max_rank: int = 64):
    return convert_peft_adapter(*files(path), model_config(), max_rank, path.name)


def loaded(path: Path) -> PeftModel:
    return PeftModel.from_pretrained(tiny_base(), str(path)).eval()


def tuner_layers(peft_model) -> dict[tuple[int, str], torch.nn.Module]:
    out = {}
    for key, module in peft_model.named_modules():
        match = _MODULE_KEY.search(key)
        if isinstance(module, BaseTunerLayer) and match:
            out[(int(match.group(1)), match.group(2))] = module
    return out


# -- conversion against peft ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adalora", "vera"])
def test_folded_pairs_reproduce_peft_layers(tiny, kind: str) -> None:
    """y = x W^T + scale (x a^T) b^T with the folded pairs equals each peft layer's output."""
    adapter = convert(tiny[kind])
    peft_model = loaded(tiny[kind])
    layers = tuner_layers(peft_model)
    assert layers, "peft adapted nothing: the test case is broken"
    assert set(adapter.modules) <= set(layers)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    changed = 0
    with torch.no_grad():
        for key, layer in layers.items():
            xi = x[:, : layer.base_layer.in_features]
            got = layer.base_layer(xi)
            if key in adapter.modules:
                w = adapter.modules[key]
                got = got + w.scale * (xi @ w.a.T) @ w.b.T
                changed += 1
            torch.testing.assert_close(got, layer(xi), rtol=1e-5, atol=1e-5)
    assert changed >= 3
    assert all(w.a.dtype == w.b.dtype == torch.float32 for w in adapter.modules.values())


def test_adalora_serves_the_rank_left_after_pruning(tiny) -> None:
    adapter = convert(tiny["adalora"])
    assert adapter.kind == "ADALORA"
    ranks = {key: w.rank for key, w in adapter.modules.items()}
    # masks keep 3 and 2 triplets; the unmasked down_proj of layer 0 had one lora_E zeroed (4 - 1);
    # layer 1's down_proj is pruned to rank 0 and adds nothing.
    assert ranks == {(0, "q_proj"): 3, (1, "q_proj"): 2, (0, "down_proj"): 3}
    assert adapter.ranks == {"q_proj": 3, "down_proj": 3}
    assert adapter.target_modules == ("q_proj", "down_proj")
    config = json.loads((tiny["adalora"] / "adapter_config.json").read_text())
    # PEFT's scale: lora_alpha / (ranknum + 1e-5), ranknum = init_r
    assert all(w.scale == pytest.approx(6 / (4 + 1e-5)) for w in adapter.modules.values())
    assert set(config["rank_pattern"]) == set(TINY_MASKS)


def test_vera_pairs_are_the_projections_scaled_by_the_vectors(tiny) -> None:
    adapter = convert(tiny["vera"])
    tensors = load_bytes(files(tiny["vera"])[1])
    vera_a, vera_b = tensors["base_model.vera_A"], tensors["base_model.vera_B"]
    w = adapter.modules[(1, "v_proj")]
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    lambda_d, lambda_b = tensors[f"{prefix}.vera_lambda_d"], tensors[f"{prefix}.vera_lambda_b"]
    torch.testing.assert_close(w.a, torch.diag(lambda_d) @ vera_a[:, :32])
    torch.testing.assert_close(w.b, torch.diag(lambda_b) @ vera_b[:16, :])
    assert w.scale == 1.0 and adapter.ranks == {"q_proj": 4, "v_proj": 4, "down_proj": 4}


def test_dora_parts_reproduce_peft(tiny) -> None:
    """The magnitude kept as an output scale m / |W + scale B A|_row reproduces peft's DoRA layer."""
    adapter = convert(tiny["dora"])
    assert adapter.kind == "DORA" and adapter.parts() == ["modules", "output_scales"]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for key, layer in tuner_layers(loaded(tiny["dora"])).items():
            w, s = adapter.modules[key], adapter.output_scales[key]
            assert s.weight_norm and not s.scales_bias
            weight = layer.base_layer.weight
            scale = s.vector / (weight + w.scale * w.b @ w.a).norm(dim=1)
            got = scale * (x @ weight.T + w.scale * (x @ w.a.T) @ w.b.T)
            torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)


def test_ia3_parts_reproduce_peft(tiny) -> None:
    """k/v/up output scales, with down_proj's feed-forward input scale folded into up_proj's."""
    adapter = convert(tiny["ia3"])
    assert adapter.kind == "IA3" and adapter.parts() == ["output_scales"] and not adapter.modules
    assert adapter.target_modules == ("k_proj", "v_proj", "up_proj", "down_proj")
    peft_model = loaded(tiny["ia3"])
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for layer_idx, block in enumerate(peft_model.base_model.model.model.layers):
            for module in ("k_proj", "v_proj"):
                layer = getattr(block.self_attn, module)
                s = adapter.output_scales[(layer_idx, module)]
                assert s.scales_bias and not s.weight_norm
                torch.testing.assert_close(s.vector * layer.base_layer(x), layer(x))
            mlp = block.mlp
            up = adapter.output_scales[(layer_idx, "up_proj")].vector * mlp.up_proj.base_layer(x)
            got = mlp.down_proj.base_layer(mlp.act_fn(mlp.gate_proj(x)) * up)  # gate_proj is not adapted
            torch.testing.assert_close(got, mlp(x), rtol=1e-5, atol=1e-6)
    assert set(adapter.output_scales) == {(i, m) for i in range(2) for m in ("k_proj", "v_proj", "up_proj")}


@pytest.mark.parametrize("kind", ["prompt", "ptuning"])
def test_virtual_tokens_are_peft_prompt(tiny, kind: str) -> None:
    adapter = convert(tiny[kind])
    assert adapter.parts() == ["virtual_tokens"] and adapter.virtual_tokens.shape == (3, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapter.virtual_tokens, loaded(tiny[kind]).get_prompt(batch_size=1)[0])


def test_prefix_kv_is_peft_past_key_values(tiny) -> None:
    adapter = convert(tiny["prefix"])
    assert adapter.parts() == ["prefix_kv"]
    kv = adapter.prefix_kv  # [layers, 2, n, kv_heads, head_dim]
    assert kv.shape == (2, 2, 3, 2, 8)
    with torch.no_grad():
        cache = loaded(tiny["prefix"]).get_prompt(batch_size=1)
    for layer in range(2):
        # peft's cache holds [batch, kv_heads, n, head_dim]
        torch.testing.assert_close(kv[layer, 0], cache.layers[layer].keys[0].transpose(0, 1))
        torch.testing.assert_close(kv[layer, 1], cache.layers[layer].values[0].transpose(0, 1))


def test_longlora_norms_are_peft_modules_to_save(tiny) -> None:
    adapter = convert(tiny["longlora"])
    assert adapter.kind == "LORA" and adapter.parts() == ["modules", "norms"]
    peft_model = loaded(tiny["longlora"])
    inner = peft_model.base_model.model.model
    for i, block in enumerate(inner.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            trained = getattr(block, norm).modules_to_save["default"].weight
            assert torch.equal(adapter.norms[(i, norm)], trained)
            assert not torch.equal(trained, getattr(block, norm).original_module.weight)
    assert torch.equal(adapter.final_norm, inner.norm.modules_to_save["default"].weight)


def test_lora_with_own_norms_is_served(tiny) -> None:
    adapter = parse_peft_adapter(*files(tiny["longlora"]), model_config(), 64, "x")
    assert adapter.parts() == ["modules", "norms"] and adapter.final_norm is not None


# -- refusals ------------------------------------------------------------------------------------------


def _edit(kind: str, fn: Callable[[dict, dict], None]) -> Callable[[dict[str, Path]], tuple[bytes, bytes]]:
    """The files of tiny[kind] after fn(config, tensors) edits them."""

    def make(tiny: dict[str, Path]) -> tuple[bytes, bytes]:
        config_bytes, weights_bytes = files(tiny[kind])
        config, tensors = json.loads(config_bytes), dict(load_bytes(weights_bytes))
        fn(config, tensors)
        return json.dumps(config).encode(), save(tensors)

    return make


def _as_is(kind: str):
    return lambda tiny: files(tiny[kind])


def _drop(suffix: str) -> Callable[[dict, dict], None]:
    def fn(config: dict, tensors: dict) -> None:
        (key,) = [k for k in tensors if k.endswith(suffix)]
        del tensors[key]

    return fn


def _replace(suffix: str, shape: tuple[int, ...]) -> Callable[[dict, dict], None]:
    def fn(config: dict, tensors: dict) -> None:
        (key,) = [k for k in tensors if k.endswith(suffix)]
        tensors[key] = torch.randn(shape)

    return fn


def _narrow_vera_a(config: dict, tensors: dict) -> None:
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :32].contiguous()  # down_proj needs 64


def _rank_pattern(key: str, mask) -> Callable[[dict, dict], None]:
    return lambda config, tensors: config["rank_pattern"].update({key: mask})


UNKNOWN = r"is not supported \(" + SERVED
# id -> (files, words the message must match); each a served kind, so the store sees the real reason
STORE_REFUSALS: dict[str, tuple[Callable[[dict[str, Path]], tuple[bytes, bytes]], str]] = {
    "loha": (_as_is("loha"), "peft_type 'LOHA' " + UNKNOWN),
    "lokr": (_as_is("lokr"), "peft_type 'LOKR' " + UNKNOWN),
    "oft": (_as_is("oft"), "peft_type 'OFT' " + UNKNOWN),
    "boft": (_as_is("boft"), "peft_type 'BOFT' " + UNKNOWN),
    "vera_projection_not_saved": (_as_is("vera_unsaved"), "save_projection is false"),
    "vera_projection_missing": (
        _edit("vera", _drop("vera_B")), r"no base_model.vera_B tensor: the shared VeRA projection is missing"
    ),
    "vera_projection_too_narrow": (_edit("vera", _narrow_vera_a), r"need at least \[4, 64\].*wrong shape"),
    "vera_lambda_b_wrong_shape": (
        _edit("vera", _replace("layers.0.self_attn.q_proj.vera_lambda_b", (31,))),
        r"layers.0.self_attn.q_proj.vera_lambda_b has shape \[31\], .* \[32\] \(wrong shape\)",
    ),
    "vera_lambda_d_missing": (
        _edit("vera", _drop("layers.1.mlp.down_proj.vera_lambda_d")),
        re.escape("layers.1.mlp.down_proj has vera_lambda_b but no vera_lambda_d tensor (missing tensor)"),
    ),
    "adalora_lora_E_missing": (
        _edit("adalora", _drop("layers.0.self_attn.q_proj.lora_E")),
        re.escape("layers.0.self_attn.q_proj has lora_A and lora_B but no lora_E tensor (missing tensor)"),
    ),
    "adalora_lora_E_wrong_shape": (
        _edit("adalora", _replace("layers.0.self_attn.q_proj.lora_E", (3, 2))),
        r"lora_E \[3, 2\] / .* do not fit",
    ),
    "adalora_mask_against_tensors": (
        _edit("adalora", _rank_pattern("model.layers.1.self_attn.q_proj.lora_E", [True] * 4)),
        r"layers.1.self_attn.q_proj: shapes .* do not fit \(expected \[4, 32\]",
    ),
    "adalora_mask_length": (
        _edit("adalora", _rank_pattern("model.layers.0.self_attn.q_proj.lora_E", [True] * 3)),
        "must be a list of init_r=4 booleans",
    ),
    "adalora_mask_untargeted": (
        _edit("adalora", _rank_pattern("model.layers.0.self_attn.k_proj.lora_E", [True] * 4)),
        "is not the lora_E of a module this adapter targets",
    ),
    "lora_embed_tokens_saved": (
        _as_is("lora_embed"),
        re.escape("modules_to_save entry 'embed_tokens' names 'model.embed_tokens' (a trained copy of the "
                  "token embedding), which the server does not serve"),
    ),
    "lora_lm_head_saved": (_as_is("lora_lm_head"), r"names 'lm_head' \(a trained copy of the output head\)"),
    "adalora_embed_tokens_saved": (_as_is("adalora_embed"), "names 'model.embed_tokens'"),
    "dora_magnitude_missing": (
        _edit("dora", _drop("layers.0.self_attn.v_proj.lora_magnitude_vector")),
        re.escape("layers.0.self_attn.v_proj (DoRA) has no lora_magnitude_vector tensor (missing tensor)"),
    ),
    "dora_magnitude_wrong_shape": (
        _edit("dora", _replace("layers.1.self_attn.q_proj.lora_magnitude_vector", (16,))),
        r"lora_magnitude_vector \(DoRA\) has shape \[16\].*\[32\] \(wrong shape\)",
    ),
    "ia3_wrong_shape": (
        _edit("ia3", _replace("layers.0.self_attn.k_proj.ia3_l", (1, 16))),
        r"layers.0.self_attn.k_proj.ia3_l has shape \[1, 16\].*\[16, 1\]",
    ),
    "ia3_feedforward_on_k_proj": (
        _edit("ia3", lambda c, t: c.update(feedforward_modules=["down_proj", "k_proj"])),
        re.escape("an IA3 feed-forward (input) scale on 'k_proj' is not supported"),
    ),
    "prompt_embedding_width": (
        _edit("prompt", _replace("prompt_embeddings", (3, 31))),
        r"prompt_embeddings has shape \[3, 31\], but the base model needs \[3, 32\]",
    ),
    "prompt_other_base": (
        _edit("prompt", lambda c, t: c.update(num_layers=3)),
        "num_layers is 3, but the base model's layer count is 2",
    ),
    "ptuning_virtual_token_count": (
        _edit("ptuning", lambda c, t: c.update(num_virtual_tokens=4)),
        r"prompt_embeddings has shape \[3, 32\], but the base model needs \[4, 32\]",
    ),
    "ptuning_token_dim": (
        _edit("ptuning", lambda c, t: c.update(token_dim=64)),
        "token_dim is 64, but the base model's hidden size is 32",
    ),
    "prompt_extra_tensor": (
        _edit("prompt", lambda c, t: t.update(extra=torch.zeros(2))),
        r"unexpected tensor key 'extra' \(only prompt_embeddings is expected\)",
    ),
    "prompt_not_finite": (
        _edit("prompt", lambda c, t: t["prompt_embeddings"].__setitem__((0, 0), float("nan"))),
        re.escape("prompt_embeddings contains non-finite values (nan or inf)"),
    ),
    "prefix_width": (
        _edit("prefix", _replace("prompt_embeddings", (3, 2 * 2 * 32))),
        r"prompt_embeddings has shape \[3, 128\].*\[3, 64\]",
    ),
    "prefix_missing": (
        _edit("prefix", _drop("prompt_embeddings")), re.escape("no prompt_embeddings tensor (missing tensor)")
    ),
    "prefix_other_kv_heads": (
        _edit("prefix", lambda c, t: c.update(num_attention_heads=4)),
        "num_attention_heads is 4, but the base model's key/value head count is 2",
    ),
    "prefix_with_saved_norm": (
        _edit("prefix", lambda c, t: c.update(modules_to_save=["norm"])),
        "modules_to_save is not supported with prompt-learning adapters",
    ),
    "longlora_norm_wrong_shape": (
        _edit("longlora", _replace("layers.1.input_layernorm.weight", (31,))),
        r"input_layernorm.weight has shape \[31\].*\[32\] \(wrong shape\)",
    ),
    "longlora_norm_missing": (
        _edit("longlora", _drop("model.norm.weight")),
        re.escape("modules_to_save names 'model.norm' but adapter_model.safetensors has no "
                  "model.norm.weight"),
    ),
}
@pytest.mark.parametrize("case", list(STORE_REFUSALS))
def test_refused_upload_names_reason_and_leaves_store_unchanged(tmp_path: Path, tiny, case: str) -> None:
    make, expected = STORE_REFUSALS[case]
    config_bytes, weights_bytes = make(tiny)
    store = AdapterStore(tmp_path / "store", model_config(), max_rank=64, host_cache_bytes=1 << 20)
    store.add_from_path("keep", tiny["vera"])
    before = store.names(), _tree(tmp_path / "store"), store.stats()
    for name, replace in [("new", False), ("keep", True)]:
        with pytest.raises(AdapterError, match=expected) as info:
            store.add_from_bytes(name, config_bytes, weights_bytes, replace=replace)
        assert str(info.value).startswith(f"adapter {name!r}: ")
    assert (store.names(), _tree(tmp_path / "store"), store.stats()) == before
    assert store.get("keep").kind == "VERA" and store.info("keep").kind == "VERA"


def test_edited_files_are_valid_before_the_edit(tiny) -> None:
    """The refusal cases mean something only if the untouched adapters are accepted."""
    for kind in ("adalora", "vera", "dora", "ia3", "prompt", "ptuning", "prefix", "longlora"):
        convert(tiny[kind])
    kinds = {"adalora": "ADALORA", "vera": "VERA", "ia3": "IA3", "prompt": "PROMPT_TUNING",
             "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING", "longlora": "LORA"}
    for kind, name in kinds.items():
        assert parse_peft_adapter(*files(tiny[kind]), model_config(), 64, kind).kind == name


# -- end to end on the embedded model -------------------------------------------------------------------

MAX_TOKENS = 8
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "My favourite recipe for bread starts with"]
LAYERS = [0, 9, 18, 27]
E2E_MASK_SEED = 5


def e2e_adalora_masks() -> dict[str, list[bool]]:
    """Random masks keeping 2 to 8 of init_r=8 triplets, and one module pruned to rank 0."""
    g = torch.Generator().manual_seed(E2E_MASK_SEED)
    masks = {}
    for layer in LAYERS:
        for block, module in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")):
            keep = int(torch.randint(2, 9, (1,), generator=g))
            mask = torch.zeros(8, dtype=torch.bool)
            mask[torch.randperm(8, generator=g)[:keep]] = True
            masks[f"model.layers.{layer}.{block}.{module}.lora_E"] = mask.tolist()
    masks[f"model.layers.{LAYERS[1]}.self_attn.v_proj.lora_E"] = [False] * 8
    return masks


E2E_KINDS = {
    "ada": (
        lambda: AdaLoraConfig(init_r=8, target_r=4, total_step=10, lora_alpha=16, lora_dropout=0.0,
                              target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=LAYERS),
        {"lora_A": 0.1, "lora_E": 1.0, "lora_B": 0.05},
        adalora_pruning(e2e_adalora_masks()),
    ),
    "vera": (
        lambda: VeraConfig(r=16, vera_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                           layers_to_transform=LAYERS),
        {"vera_lambda_d": 1.0, "vera_lambda_b": 0.5},
        None,
    ),
    "lora": (
        lambda: LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           layers_to_transform=LAYERS),
        {"lora_A": 0.1, "lora_B": 0.05},
        None,
    ),
}


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """A real server, started first so that it loads while the references are computed."""
    root = tmp_path_factory.mktemp("kinds-server")
    proc = ServerProcess(root / "adapters", root / "server.log")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, server_process):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()
    src = tmp_path_factory.mktemp("e2e-kinds")
    paths = {
        name: make_peft_kind_adapter(base, src / name, config(), seed=10 + i, std=std, edit=edit)
        for i, (name, (config, std, edit)) in enumerate(E2E_KINDS.items())
    }
    llm = LLM(dtype="float32", pool_bytes=256 << 20, adapter_dir=str(tmp_path_factory.mktemp("kinds-store")))
    for name, path in paths.items():
        llm.add_adapter(name, path)
    work = [(p, a) for p in PROMPTS for a in (*E2E_KINDS, None)]
    refs = {
        (p, a): peft_generate(base, paths[a] if a else None, llm.tokenizer.encode(p), MAX_TOKENS)
        for p, a in work
    }
    return llm, paths, work, refs, base


@pytest.mark.slow
def test_kinds_mixed_batch_match_peft(e2e) -> None:
    """AdaLoRA, VeRA, LoRA and base requests in one batch, each equal to transformers + peft alone."""
    llm, _, work, refs, _ = e2e
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outs = llm.generate([p for p, _ in work], params, adapters=[a for _, a in work])
    for (prompt, adapter), out in zip(work, outs, strict=True):
        assert out.token_ids == refs[(prompt, adapter)], f"{adapter} on {prompt!r}"
    # Each kind changes the output (otherwise the comparison could not fail).
    for kind in ("ada", "vera"):
        assert any(refs[(p, kind)] != refs[(p, None)] for p in PROMPTS), kind


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["ada", "vera"])
def test_kind_alone_matches_peft(e2e, adapter: str) -> None:
    llm, _, _, refs, _ = e2e
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    out = llm.generate(PROMPTS[2], params, adapters=[adapter])[0]
    assert out.token_ids == refs[(PROMPTS[2], adapter)]


@pytest.mark.slow
def test_kind_ranks_and_targets_in_info(e2e) -> None:
    llm, _, _, _, _ = e2e
    store = llm.engine.store
    masks = e2e_adalora_masks()
    expected: dict[str, int] = {}
    for key, mask in masks.items():
        module = key.split(".")[-2]
        if any(mask):
            expected[module] = max(expected.get(module, 0), sum(mask))
    ada = store.info("ada", parse=True)
    assert (ada.kind, ada.ranks) == ("ADALORA", expected)
    assert ada.target_modules == ("q_proj", "v_proj", "down_proj")
    vera = store.info("vera", parse=True)
    assert (vera.kind, vera.ranks) == ("VERA", {"q_proj": 16, "v_proj": 16, "down_proj": 16})
    assert store.info("lora", parse=True).kind == "LORA"


# -- through the HTTP server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(server_process, e2e) -> ServerProcess:
    server_process.wait_ready()
    for name in ("ada", "vera"):
        r = upload(server_process.url, name, e2e[1][name])
        assert r.status_code == 201, r.text
    return server_process


@pytest.mark.slow
def test_models_show_kind_ranks_and_targets(server, e2e) -> None:
    llm = e2e[0]
    models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    for name in ("ada", "vera"):
        info = llm.engine.store.info(name, parse=True)
        card = models[name]
        assert (card["kind"], card["ranks"], card["target_modules"]) == (
            info.kind, info.ranks, list(info.target_modules))
        assert httpx.get(f"{server.url}/v1/adapters/{name}").json()["kind"] == info.kind
    assert models["vera"]["kind"] == "VERA" and models["vera"]["virtual_tokens"] is None
    text = openai_client(server.url).completions.create(model="ada", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                                         temperature=0).choices[0].text
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    offline = llm.generate(PROMPTS[0], params, adapters=["ada"])[0]
    assert text == offline.text


@pytest.mark.slow
def test_models_show_virtual_tokens(server, tmp_path) -> None:
    """A prompt-tuning adapter made with peft (on the meta device: no base weights) for the embedded
    model: its card names the kind and the virtual tokens it puts before every prompt."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(resolve_model(None))))
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "prompt_encoder" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(str(tmp_path / "pt"))
    r = upload(server.url, "virtual", tmp_path / "pt")
    assert r.status_code == 201, r.text
    models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert (models["virtual"]["kind"], models["virtual"]["virtual_tokens"]) == ("PROMPT_TUNING", 7)
    assert httpx.get(f"{server.url}/v1/adapters/virtual").json()["virtual_tokens"] == 7


def _e2e_bad_uploads(e2e, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a refused folder for the embedded model, words of the message)."""
    _, paths, _, _, base = e2e
    made = {
        "loha": (LoHaConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0]), {}, "peft_type 'LOHA' "
                 + UNKNOWN),
        "vera-unsaved": (
            VeraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0], save_projection=False),
            {},
            "save_projection is false",
        ),
        "prefix-other-base": (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_layers=3),
                              {},
                              "num_layers is 3, but the base model's layer count is 30"),
    }
    out = {name: (make_peft_kind_adapter(base, root / name, config, seed=0, std=std), words)
           for name, (config, std, words) in made.items()}
    broken = root / "ada-no-E"
    broken.mkdir()
    config_bytes, weights_bytes = files(paths["ada"])
    dropped = "layers.0.self_attn.q_proj.lora_E"
    tensors = {k: v for k, v in load_bytes(weights_bytes).items() if dropped not in k}
    (broken / "adapter_config.json").write_bytes(config_bytes)
    (broken / "adapter_model.safetensors").write_bytes(save(tensors))
    out["ada-no-E"] = (broken, "layers.0.self_attn.q_proj has lora_A and lora_B but no lora_E tensor")
    for entry in ("embed_tokens", "lm_head"):  # the config names them; the check needs no copy's tensor
        folder = root / f"lora-saves-{entry}"
        folder.mkdir()
        config = json.loads((paths["lora"] / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": [entry]}))
        shutil.copy(paths["lora"] / "adapter_model.safetensors", folder)
        words = rf"modules_to_save entry '{entry}' names '[a-z_.]*{entry}' \(a trained copy"
        out[folder.name] = (folder, words)
    return out


@pytest.mark.slow
def test_bad_uploads_are_400_and_change_nothing(server, e2e, tmp_path: Path) -> None:
    url = server.url
    bad = _e2e_bad_uploads(e2e, tmp_path)
    before = httpx.get(f"{url}/v1/adapters").json(), _tree(server.adapter_dir)
    for name, (src, words) in bad.items():
        for target, replace in [(name, False), ("ada", True)]:
            err = assert_error(upload(url, target, src, replace=replace), 400)
            assert err["message"].startswith(f"adapter {target!r}: ")
            assert re.search(words, err["message"]), err["message"]
        load = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(src)})
        assert re.search(words, assert_error(load, 400)["message"])
    assert (httpx.get(f"{url}/v1/adapters").json(), _tree(server.adapter_dir)) == before
    r = openai_client(url).completions.create(model="ada", prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


@pytest.mark.slow
def test_nested_ranks_over_http(server, e2e) -> None:
    """`name:rK` through the OpenAI client: served as the engine serves it offline; a rank too
    large, below 1, or of a kind that does not nest is 400 naming the problem; disturbs nothing."""
    llm, paths = e2e[0], e2e[1]
    url = server.url
    assert upload(url, "lora", paths["lora"]).status_code == 201
    client = openai_client(url)
    text = client.completions.create(model="lora:r4", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                     temperature=0).choices[0].text
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    assert text == llm.generate(PROMPTS[0], params, adapters=["lora:r4"])[0].text
    assert text != llm.generate(PROMPTS[0], params, adapters=["lora"])[0].text
    bad = {
        "lora:r9": "`lora:r9`: rank 9 is larger than the adapter's rank 8",
        "lora:r0": "`lora:r0`: a nested rank must be at least 1",
        "ada:r2": "`ada:r2`: nested ranks apply to LoRA adapters only; 'ada' is of kind ADALORA",
    }
    for model, words in bad.items():
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
        assert assert_error(r, 400, param="model")["message"] == words
    r = httpx.post(f"{url}/v1/completions", json={"model": "nothing:r2", "prompt": "x", "max_tokens": 1})
    assert_error(r, 404)
    assert client.completions.create(model="lora", prompt="x", max_tokens=2).usage.completion_tokens == 2
