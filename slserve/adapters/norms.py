"""modules_to_save: fully trained copies of base modules saved beside an adapter.

LongLoRA trains the RMSNorm weights alongside its LoRA pairs; those are taken into the normalised
set (norms, final_norm). A trained copy of any other module is refused, the embedding and lm_head
with a message of their own. Which modules an entry names follows PEFT's _set_trainable: every
module whose key ends with the entry (plain string suffix, so "norm" names every norm).
"""

from __future__ import annotations

import torch

from slserve.adapters.checks import check_shape, to_float32
from slserve.adapters.fields import ConfigFields
from slserve.adapters.targets import BLOCK_OF, LAYER_KEYS, TOP_KEYS
from slserve.adapters.weights import WEIGHTS_FILE, adapter_error
from slserve.config import ModelConfig

LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
FINAL_NORM = "model.norm"
_PREFIX = "base_model.model."
_COPIES_REFUSED = {
    "model.embed_tokens": "a trained copy of the token embedding",
    "lm_head": "a trained copy of the output head",
}


def _module_keys(num_layers: int) -> list[str]:
    """Model-relative keys of a Llama model's modules, as PEFT's named_modules lists them."""
    per_layer = [*LAYER_KEYS, *(f"{BLOCK_OF[m]}.{m}" for m in BLOCK_OF)]
    layers = [f"model.layers.{i}{'.' + k if k else ''}" for i in range(num_layers) for k in ("", *per_layer)]
    return ["model", *TOP_KEYS, "model.layers", *layers]


def take_saved_norms(
    fields: ConfigFields, tensors: dict[str, torch.Tensor], model: ModelConfig
) -> tuple[dict[tuple[int, str], torch.Tensor], torch.Tensor | None]:
    """(norms, final_norm) named by modules_to_save; their tensors are removed from `tensors`."""
    entries = fields.get("modules_to_save")
    if not entries:
        return {}, None
    if not (isinstance(entries, list) and all(isinstance(e, str) and e for e in entries)):
        raise fields.bad(f"modules_to_save must be a list of module names, got {entries!r}")
    norms: dict[tuple[int, str], torch.Tensor] = {}
    final_norm = None
    for key in _module_keys(model.num_layers):
        entry = next((e for e in entries if (_PREFIX + key).endswith(e)), None)
        if entry is None:
            continue
        parts = key.split(".")
        is_layer_norm = len(parts) == 4 and parts[1] == "layers" and parts[3] in LAYER_NORMS
        if not (is_layer_norm or key == FINAL_NORM):
            what = _COPIES_REFUSED.get(key, "a trained copy of that module")
            raise fields.bad(
                f"modules_to_save entry {entry!r} names {key!r} ({what}), which the server does not "
                "serve; only RMSNorm weights (input_layernorm, post_attention_layernorm, norm) are accepted"
            )
        weight = _take(tensors, key, fields.name)
        check_shape(weight, (model.hidden_size,), f"{key}.weight", fields.name)
        if key == FINAL_NORM:
            final_norm = weight
        else:
            norms[(int(parts[2]), parts[3])] = weight
    return norms, final_norm


def _take(tensors: dict[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
    found = [k for k in (f"{_PREFIX}{key}.weight", f"{key}.weight") if k in tensors]
    if not found:
        raise adapter_error(
            name,
            f"modules_to_save names {key!r} but {WEIGHTS_FILE} has no {key}.weight tensor (missing tensor)",
        )
    if len(found) > 1:
        raise adapter_error(name, f"duplicate tensors for {key}.weight")
    return to_float32(tensors.pop(found[0]), f"{key}.weight", name)
