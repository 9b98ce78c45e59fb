"""Prompt tuning, P-tuning and prefix tuning (P-tuning v2) into virtual tokens or prefix K/V.

All three save one tensor, prompt_embeddings: [n, token_dim], already past any prompt encoder
(PEFT saves the encoder's output; a loaded adapter reads it as is, inference_mode).

    PROMPT_TUNING, P_TUNING  token_dim = hidden: n input embeddings put before the prompt's
    PREFIX_TUNING            token_dim = layers * 2 * kv_heads * head_dim: each layer's keys and
                             values for n positions; PEFT views the row as
                             [layers * 2, kv_heads, head_dim], key of layer l at 2l, value at 2l + 1
"""

from __future__ import annotations

import torch

from slserve.adapters.checks import check_shape, to_float32
from slserve.adapters.fields import ConfigFields
from slserve.adapters.weights import WEIGHTS_FILE, LoRAAdapter, adapter_error, build_adapter
from slserve.config import ModelConfig

_TENSOR = "prompt_embeddings"


def convert_prompt_tuning(config: dict, tensors: dict[str, torch.Tensor], model: ModelConfig, max_rank: int,
                          name: str) -> LoRAAdapter:
    return _virtual_tokens(config, tensors, model, name, "PROMPT_TUNING")


def convert_p_tuning(config: dict, tensors: dict[str, torch.Tensor], model: ModelConfig, max_rank: int,
                     name: str) -> LoRAAdapter:
    return _virtual_tokens(config, tensors, model, name, "P_TUNING")


def convert_prefix_tuning(config: dict, tensors: dict[str, torch.Tensor], model: ModelConfig, max_rank: int,
                          name: str) -> LoRAAdapter:
    fields = ConfigFields(config, name)
    n = _common_fields(fields, model)
    kv_dim = model.num_kv_heads * model.head_dim
    # PEFT sets these from the base model (GQA: key/value heads); a mismatch means another base.
    fields.equal("num_attention_heads", model.num_kv_heads, "the base model's key/value head count is")
    fields.equal("token_dim", kv_dim, "the base model's key/value width (kv_heads * head_dim) is")
    emb = _embeddings(tensors, (n, model.num_layers * 2 * kv_dim), name)
    # prefix_kv: [layers, 2, n, kv_heads, head_dim]
    kv = emb.view(n, model.num_layers, 2, model.num_kv_heads, model.head_dim)
    kv = kv.permute(1, 2, 0, 3, 4).contiguous()
    return build_adapter(name, config, "PREFIX_TUNING", {}, set(), prefix_kv=kv)


def _virtual_tokens(config: dict, tensors: dict[str, torch.Tensor], model: ModelConfig, name: str,
                    kind: str) -> LoRAAdapter:
    fields = ConfigFields(config, name)
    n = _common_fields(fields, model)
    fields.equal("token_dim", model.hidden_size, "the base model's hidden size is")
    emb = _embeddings(tensors, (n, model.hidden_size), name)
    return build_adapter(name, config, kind, {}, set(), virtual_tokens=emb)


def _common_fields(fields: ConfigFields, model: ModelConfig) -> int:
    """The number of virtual tokens, after checking the fields every prompt-learning kind shares."""
    fields.equal("task_type", "CAUSAL_LM", "a decoder-only model needs")
    fields.equal("num_transformer_submodules", 1, "a decoder-only model needs")
    fields.equal("num_layers", model.num_layers, "the base model's layer count is")
    if fields.get("modules_to_save"):
        raise fields.bad("modules_to_save is not supported with prompt-learning adapters")
    return fields.positive_int("num_virtual_tokens", None)


def _embeddings(tensors: dict[str, torch.Tensor], shape: tuple[int, int], name: str) -> torch.Tensor:
    extra = sorted(k for k in tensors if k != _TENSOR)
    if extra:
        raise adapter_error(name, f"unexpected tensor key {extra[0]!r} (only {_TENSOR} is expected)")
    if _TENSOR not in tensors:
        raise adapter_error(name, f"{WEIGHTS_FILE} has no {_TENSOR} tensor (missing tensor)")
    emb = tensors[_TENSOR]
    check_shape(emb, shape, _TENSOR, name)
    return to_float32(emb, _TENSOR, name)
