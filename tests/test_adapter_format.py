"""PEFT adapter parsing, checked against the real peft library, and every refusal reason."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save
from transformers import LlamaConfig, LlamaForCausalLM

from slserve.adapters.peft_format import (
    AdapterError,
    LoRAAdapter,
    load_peft_adapter,
    parse_peft_adapter,
)
from slserve.config import ModelConfig
from slserve.memory.adapter_store import AdapterStore

# peft calls a transformers method that transformers 5 deprecates; not this project's concern.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

NUM_LAYERS = 2
_MODULE_KEY = re.compile(r"layers\.(\d+)\.\w+\.(\w+)$")


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).to(dtype)


def model_config() -> ModelConfig:
    """The ModelConfig of tiny_llama(), written out by hand."""
    return ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=NUM_LAYERS,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        qkv_bias=False,
        eos_token_ids=(0,),
        bos_token_id=None,
    )


def save_peft_adapter(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **lora_kwargs):
    """A peft model with random nonzero lora_A and lora_B, saved to `path`; returns the peft model."""
    torch.manual_seed(seed)
    # Without autocast_adapter_dtype=False peft upcasts bf16 adapters to float32.
    peft_model = get_peft_model(tiny_llama(dtype), LoraConfig(**lora_kwargs), autocast_adapter_dtype=False)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                for lin in (*module.lora_A.values(), *module.lora_B.values()):
                    lin.weight.normal_()
    peft_model.save_pretrained(str(path))
    return peft_model


def peft_reference(peft_model) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """(layer, module) -> (A, B, scaling) as held by the live peft model."""
    ref = {}
    for key, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            layer, name = _MODULE_KEY.search(key).groups()
            ref[(int(layer), name)] = (
                module.lora_A["default"].weight.detach().float(),
                module.lora_B["default"].weight.detach().float(),
                module.scaling["default"],
            )
    return ref


def assert_matches_peft(adapter: LoRAAdapter, peft_model) -> None:
    ref = peft_reference(peft_model)
    assert ref, "peft adapted nothing: the test case is broken"
    assert set(adapter.modules) == set(ref)
    for key, (a, b, scaling) in ref.items():
        got = adapter.modules[key]
        assert got.a.dtype == got.b.dtype == torch.float32
        torch.testing.assert_close(got.a, a, rtol=0, atol=0)
        torch.testing.assert_close(got.b, b, rtol=0, atol=0)
        assert got.scale == pytest.approx(scaling, rel=1e-12), key
    expected_ranks: dict[str, int] = {}
    for (_, name), (a, _, _) in ref.items():
        expected_ranks[name] = max(expected_ranks.get(name, 0), a.shape[0])
    assert adapter.ranks == expected_ranks
    assert adapter.max_rank == max(expected_ranks.values())
    assert set(adapter.target_modules) == set(expected_ranks)
    assert adapter.nbytes == sum(4 * (a.numel() + b.numel()) for a, b, _ in ref.values())


PEFT_CASES = {
    "all_modules": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "subset_rank_alpha_patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.1.mlp.down_proj": 2, "v_proj": 6},
        alpha_pattern={"q_proj": 3, "model.layers.0.self_attn.v_proj": 5},
    ),
    "rslora_with_rank_pattern": dict(
        r=16,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
        rank_pattern={"^model.layers.0.mlp.up_proj": 1},
    ),
    "regex_targets": dict(r=3, lora_alpha=7, target_modules=r".*\.(q|v|down)_proj"),
    "layers_to_transform": dict(
        r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]
    ),
    "exclude_modules": dict(
        r=5, lora_alpha=10, target_modules=["q_proj", "o_proj"], exclude_modules=["layers.0.self_attn.q_proj"]
    ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_parsed_weights_equal_peft(tmp_path: Path, case: str) -> None:
    peft_model = save_peft_adapter(tmp_path, **PEFT_CASES[case])
    adapter = load_peft_adapter(tmp_path, model_config(), max_rank=64, name=case)
    assert adapter.name == case
    assert adapter.config["peft_type"] == "LORA"
    assert_matches_peft(adapter, peft_model)


def test_forward_equals_peft(tmp_path: Path) -> None:
    """y = x W^T + scale (x A^T) B^T with the parsed weights reproduces peft's layer output."""
    peft_model = save_peft_adapter(tmp_path, **PEFT_CASES["subset_rank_alpha_patterns"])
    adapter = load_peft_adapter(tmp_path, model_config(), max_rank=64, name="fw")
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(5, 64)
    lora = adapter.modules[(1, "down_proj")]
    with torch.no_grad():
        expected = layer(x)
        got = layer.base_layer(x) + lora.scale * (x @ lora.a.T) @ lora.b.T
    torch.testing.assert_close(got, expected)


def test_bf16_adapter_is_parsed_to_float32(tmp_path: Path) -> None:
    peft_model = save_peft_adapter(
        tmp_path, dtype=torch.bfloat16, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    assert next(iter(load_file(tmp_path / "adapter_model.safetensors").values())).dtype == torch.bfloat16
    adapter = load_peft_adapter(tmp_path, model_config(), max_rank=64, name="bf16")
    assert_matches_peft(adapter, peft_model)


def test_key_variants_are_accepted(tmp_path: Path) -> None:
    """Keys with an adapter-name segment or without the base_model.model. prefix mean the same."""
    peft_model = save_peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config_bytes = (tmp_path / "adapter_config.json").read_bytes()
    renamed = {
        k.replace(".weight", ".default.weight") if "q_proj" in k else k.removeprefix("base_model.model."): v
        for k, v in tensors.items()
    }
    adapter = parse_peft_adapter(config_bytes, save(renamed), model_config(), 64, "variants")
    assert_matches_peft(adapter, peft_model)


def test_parse_bytes_equals_load_dir(tmp_path: Path) -> None:
    save_peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["v_proj"])
    a = load_peft_adapter(tmp_path, model_config(), 64, "x")
    b = parse_peft_adapter(
        (tmp_path / "adapter_config.json").read_bytes(),
        (tmp_path / "adapter_model.safetensors").read_bytes(),
        model_config(),
        64,
        "x",
    )
    assert a.modules.keys() == b.modules.keys()
    for k in a.modules:
        assert torch.equal(a.modules[k].a, b.modules[k].a) and torch.equal(a.modules[k].b, b.modules[k].b)


# -- refusals ----------------------------------------------------------------------------------

# The valid adapter every refusal case starts from: rank 4 on q_proj, v_proj and down_proj.
BASE_LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def base_adapter(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("base_adapter")
    save_peft_adapter(path, **BASE_LORA)
    config = json.loads((path / "adapter_config.json").read_text())
    return config, load_file(path / "adapter_model.safetensors")


def _key(layer: int, block: str, module: str, ab: str) -> str:
    return f"{PREFIX}.{layer}.{block}.{module}.lora_{ab}.weight"


def _set(**fields) -> Callable[[dict, dict], None]:
    return lambda config, tensors: config.update(fields)


def _edit_tensor(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict, dict], None]:
    def edit(config: dict, tensors: dict) -> None:
        tensors[key] = fn(tensors[key].clone())

    return edit


def _poke(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t[0, 0] = value
        return t

    return fn


def _drop(key: str) -> Callable[[dict, dict], None]:
    return lambda config, tensors: tensors.pop(key)


def _add(key: str, shape: tuple[int, ...], **config_fields) -> Callable[[dict, dict], None]:
    def edit(config: dict, tensors: dict) -> None:
        config.update(config_fields)
        tensors[key] = torch.randn(shape)

    return edit


def _move_layer(src: int, dst: int) -> Callable[[dict, dict], None]:
    def edit(config: dict, tensors: dict) -> None:
        for key in [k for k in tensors if f"layers.{src}." in k]:
            tensors[key.replace(f"layers.{src}.", f"layers.{dst}.")] = tensors.pop(key)

    return edit


def _targets_plus(*extra: str) -> Callable[[dict, dict], None]:
    return lambda config, tensors: config.update(target_modules=[*config["target_modules"], *extra])


def _lm_head_lora(config: dict, tensors: dict) -> None:
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, 32)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.randn(64, 4)


def _duplicate(config: dict, tensors: dict) -> None:
    key = _key(0, "self_attn", "q_proj", "A")
    tensors[key.replace(".weight", ".other.weight")] = tensors[key].clone()


# id -> (edit of (config, tensors), words the message must contain, max_rank)
REFUSALS: dict[str, tuple[Callable[[dict, dict], None], str, int]] = {
    "non_lora_peft_type": (_set(peft_type="LOHA"), "peft_type 'LOHA' is not supported", 64),
    "dora": (_set(use_dora=True), "DoRA", 64),
    "modules_to_save": (_set(modules_to_save=["lm_head"]), "modules_to_save", 64),
    "lora_bias_config": (_set(lora_bias=True), "lora_bias", 64),
    "alora": (_set(alora_invocation_tokens=[1, 2]), "activated LoRA", 64),
    "pissa_residual_base": (
        _set(init_lora_weights="pissa_niter_4"),
        "only work on a modified base model",
        64,
    ),
    "target_embed_tokens": (
        _targets_plus("embed_tokens"),
        "'embed_tokens', which the server does not support",
        64,
    ),
    "target_lm_head": (_targets_plus("lm_head"), "'lm_head', which the server does not support", 64),
    "target_regex_lm_head": (_set(target_modules=r".*(q_proj|lm_head)"), "'lm_head'", 64),
    "target_unknown_module": (_targets_plus("c_attn"), "'c_attn' is not a module the server supports", 64),
    "tensor_lm_head": (_lm_head_lora, "targets 'lm_head', which the server does not support", 64),
    "tensor_embedding": (
        _add("base_model.model.model.embed_tokens.lora_embedding_A", (4, 64)),
        "'embed_tokens', which the server does not support",
        64,
    ),
    "rank_above_max": (
        lambda c, t: None,
        "rank 4 of layers.0.mlp.down_proj exceeds the server's max_lora_rank 2",
        2,
    ),
    "in_features_mismatch": (
        _edit_tensor(_key(0, "self_attn", "q_proj", "A"), lambda t: t[:, :31].contiguous()),
        "do not fit the base model",
        64,
    ),
    "out_features_mismatch": (
        _edit_tensor(_key(1, "mlp", "down_proj", "B"), lambda t: torch.randn(33, 4)),
        "do not fit the base model",
        64,
    ),
    "layer_out_of_range": (_move_layer(1, 7), "layer index 7 is out of range", 64),
    "ab_rank_mismatch": (
        _edit_tensor(_key(0, "self_attn", "v_proj", "B"), lambda t: t[:, :3].contiguous()),
        "A/B rank mismatch",
        64,
    ),
    "config_rank_mismatch": (_set(r=8), "rank mismatch", 64),
    "nan": (_edit_tensor(_key(0, "self_attn", "q_proj", "A"), _poke(math.nan)), "non-finite", 64),
    "inf": (_edit_tensor(_key(1, "mlp", "down_proj", "B"), _poke(math.inf)), "non-finite", 64),
    "integer_dtype": (
        _edit_tensor(_key(0, "self_attn", "q_proj", "A"), lambda t: t.to(torch.int32)),
        "floating-point",
        64,
    ),
    "lora_A_without_B": (_drop(_key(0, "self_attn", "q_proj", "B")), "has lora_A but no lora_B", 64),
    "lora_B_without_A": (_drop(_key(1, "mlp", "down_proj", "A")), "has lora_B but no lora_A", 64),
    "declared_module_without_tensors": (_targets_plus("k_proj"), "'k_proj' is declared", 64),
    "tensor_for_untargeted_layer": (_set(layers_to_transform=[0]), "does not target", 64),
    "extra_tensor_key": (_add("base_model.model.model.foo.bar", (2, 2)), "unexpected tensor key", 64),
    "duplicate_tensor": (_duplicate, "duplicate tensors", 64),
    "bias_tensors": (
        _add(f"{PREFIX}.0.self_attn.q_proj.bias", (32,), bias="all"),
        "bias='all' trains bias tensors",
        64,
    ),
    "lora_B_bias_tensor": (_add(f"{PREFIX}.0.self_attn.q_proj.lora_B.bias", (32,)), "lora_B bias", 64),
    "invalid_r": (_set(r="4"), "r must be a positive integer", 64),
    "huge_alpha": (_set(lora_alpha=10**400), "lora_alpha must be a finite number", 64),
    # Issue 15, defect 3: finite values that overflow once applied.
    "overflowing_alpha": (_set(lora_alpha=1e30), "the scale (lora_alpha / r) is 2.5e+29, beyond", 64),
    "overflowing_alpha_rslora": (
        _set(lora_alpha=1e30, use_rslora=True), "the scale (lora_alpha / r) is 5e+29", 64
    ),
    "overflowing_weights": (
        _edit_tensor(_key(0, "self_attn", "q_proj", "B"), lambda t: t.fill_(3e38)),
        "layers.0.self_attn.q_proj: the lora_B gain (scale * lora_B) is",
        64,
    ),
    "overflowing_gain": (
        # each factor within the bound on its own, their product not
        lambda c, t: (_edit_tensor(_key(1, "mlp", "down_proj", "A"), lambda a: a * 30)(c, t),
                      _edit_tensor(_key(1, "mlp", "down_proj", "B"), lambda b: b * 3e3)(c, t)),
        "layers.1.mlp.down_proj: the gain (scale * lora_B @ lora_A) is",
        64,
    ),
    "overflowing_lora_A_with_zero_lora_B": (
        lambda c, t: (_edit_tensor(_key(0, "self_attn", "v_proj", "A"), lambda a: a.fill_(3e38))(c, t),
                      _edit_tensor(_key(0, "self_attn", "v_proj", "B"), lambda b: b.zero_())(c, t)),
        "layers.0.self_attn.v_proj: the lora_A gain is",
        64,
    ),
    "invalid_rank_pattern_regex": (_set(rank_pattern={"(": 2}), "invalid regular expression", 64),
    "no_tensors": (lambda c, t: t.clear(), "no LoRA tensors", 64),
}

# Byte-level damage that cannot be expressed as an edit of a valid (config, tensors) pair.
RAW_REFUSALS: dict[str, tuple[bytes | None, bytes | None, str]] = {
    "malformed_json": (b'{"peft_type": "LORA",', None, "is not valid JSON"),
    "json_not_utf8": (b"\xff\xfe{}", None, "is not valid JSON"),
    "json_nan_alpha": (b'{"peft_type": "LORA", "lora_alpha": NaN}', None, "is not valid JSON"),
    "json_not_object": (b"[1, 2, 3]", None, "must hold a JSON object"),
    "json_too_deep": (b"[" * 100_000 + b"]" * 100_000, None, "is not valid JSON"),
    "corrupt_safetensors": (
        None,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}",
        "not a valid safetensors",
    ),
    "empty_safetensors": (None, b"", "not a valid safetensors"),
}


def refusal_bytes(base_adapter, case: str) -> tuple[bytes, bytes, str, int]:
    """(config bytes, weights bytes, expected message part, max_rank) of a refusal case."""
    config, tensors = json.loads(json.dumps(base_adapter[0])), dict(base_adapter[1])
    if case in REFUSALS:
        edit, expected, max_rank = REFUSALS[case]
        edit(config, tensors)
        return json.dumps(config).encode(), save(tensors), expected, max_rank
    raw_config, raw_weights, expected = RAW_REFUSALS[case]
    config_bytes = raw_config if raw_config is not None else json.dumps(config).encode()
    weights_bytes = raw_weights if raw_weights is not None else save(tensors)
    return config_bytes, weights_bytes, expected, 64


ALL_REFUSALS = [*REFUSALS, *RAW_REFUSALS]


def test_base_adapter_is_valid(base_adapter) -> None:
    """The refusal cases mean something only if the untouched adapter is accepted."""
    config, tensors = base_adapter
    adapter = parse_peft_adapter(json.dumps(config).encode(), save(tensors), model_config(), 64, "ok")
    assert adapter.target_modules == ("q_proj", "v_proj", "down_proj")


@pytest.mark.parametrize("case", ALL_REFUSALS)
def test_refusal_names_reason(base_adapter, case: str) -> None:
    config_bytes, weights_bytes, expected, max_rank = refusal_bytes(base_adapter, case)
    with pytest.raises(AdapterError) as info:
        parse_peft_adapter(config_bytes, weights_bytes, model_config(), max_rank, "bad")
    message = str(info.value)
    assert message.startswith("adapter 'bad': ")
    assert expected in message, message


@pytest.mark.parametrize("case", ALL_REFUSALS)
def test_refused_upload_leaves_store_unchanged(tmp_path: Path, base_adapter, case: str) -> None:
    config_bytes, weights_bytes, expected, max_rank = refusal_bytes(base_adapter, case)
    store = AdapterStore(tmp_path / "store", model_config(), max_rank=max_rank, host_cache_bytes=1 << 20)
    # A small valid adapter so the "keep" entry is acceptable under every case's max_rank.
    keep = tmp_path / "keep"
    save_peft_adapter(keep, r=1, lora_alpha=2, target_modules=["o_proj"])
    store.add_from_path("keep", keep)
    before_names, before_files, before_stats = store.names(), _tree(tmp_path / "store"), store.stats()

    for name, replace in [("new", False), ("keep", True)]:
        with pytest.raises(AdapterError, match=re.escape(expected)):
            store.add_from_bytes(name, config_bytes, weights_bytes, replace=replace)

    assert store.names() == before_names
    assert _tree(tmp_path / "store") == before_files
    assert store.stats() == before_stats
    assert store.get("keep").target_modules == ("o_proj",)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in root.rglob("*")}


def test_pickle_weights_refused(tmp_path: Path) -> None:
    save_peft_adapter(tmp_path, **BASE_LORA)
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterError, match=r"pickle weights \(adapter_model.bin\) are refused"):
        load_peft_adapter(tmp_path, model_config(), 64, "pkl")


def test_missing_safetensors_refused(tmp_path: Path) -> None:
    save_peft_adapter(tmp_path, **BASE_LORA)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        load_peft_adapter(tmp_path, model_config(), 64, "nosafe")


def test_missing_config_and_directory_refused(tmp_path: Path) -> None:
    save_peft_adapter(tmp_path, **BASE_LORA)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_peft_adapter(tmp_path, model_config(), 64, "nocfg")
    with pytest.raises(AdapterError, match="does not exist"):
        load_peft_adapter(tmp_path / "nowhere", model_config(), 64, "nodir")


def test_pickle_upload_from_path_leaves_store_unchanged(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store", model_config(), max_rank=64, host_cache_bytes=1 << 20)
    src = tmp_path / "src"
    save_peft_adapter(src, **BASE_LORA)
    (src / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterError, match="pickle weights"):
        store.add_from_path("pkl", src)
    assert store.names() == []
    assert list((tmp_path / "store").iterdir()) == []
