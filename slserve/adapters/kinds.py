"""Adapter kinds: one converter per PEFT method, keyed by peft_type (and use_dora for DoRA).

Each converter validates a PEFT folder's config and tensors against the base model and turns them
into the normalised set (slserve/adapters/weights.py), whose every part the engine applies: the
low-rank pairs and output scales per module, virtual tokens and prefix K/V per request, saved
norms per token (docs/ARCHITECTURE.md: Adapter kinds at run time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slserve.adapters.adalora import convert_adalora
from slserve.adapters.ia3 import convert_ia3
from slserve.adapters.lora import convert_dora, convert_lora
from slserve.adapters.prompt_learning import convert_p_tuning, convert_prefix_tuning, convert_prompt_tuning
from slserve.adapters.vera import convert_vera
from slserve.adapters.weights import CONFIG_FILE, LoRAAdapter, adapter_error
from slserve.config import ModelConfig

# config, tensors, base model, max_lora_rank, adapter name -> the normalised set
Converter = Callable[[dict, dict[str, torch.Tensor], ModelConfig, int, str], LoRAAdapter]


@dataclass(frozen=True)
class Kind:
    name: str
    peft_type: str
    use_dora: bool
    convert: Converter


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("LORA", "LORA", False, convert_lora),
        Kind("ADALORA", "ADALORA", False, convert_adalora),
        Kind("VERA", "VERA", False, convert_vera),
        Kind("DORA", "LORA", True, convert_dora),
        Kind("IA3", "IA3", False, convert_ia3),
        Kind("PROMPT_TUNING", "PROMPT_TUNING", False, convert_prompt_tuning),
        Kind("P_TUNING", "P_TUNING", False, convert_p_tuning),
        Kind("PREFIX_TUNING", "PREFIX_TUNING", False, convert_prefix_tuning),
    )
}
_BY_TYPE: dict[tuple[str, bool], Kind] = {(k.peft_type, k.use_dora): k for k in KINDS.values()}


def kind_of(config: dict, name: str) -> Kind:
    """The kind of an adapter config; an unknown peft_type is refused, naming the served kinds."""
    peft_type = config.get("peft_type")
    # use_dora only selects a kind for LoRA; other kinds refuse it in their converter.
    use_dora = peft_type == "LORA" and bool(config.get("use_dora"))
    kind = _BY_TYPE.get((peft_type, use_dora)) if isinstance(peft_type, str) else None
    if kind is None:
        raise adapter_error(
            name, f"{CONFIG_FILE}: peft_type {peft_type!r} is not supported "
            f"(served kinds: {', '.join(KINDS)})"
        )
    return kind
