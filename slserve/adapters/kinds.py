"""Adapter kinds: one converter per PEFT method, keyed by peft_type (and use_dora for DoRA).

Each converter validates a PEFT folder's config and tensors against the base model and turns them
into the normalised set (slserve/adapters/weights.py). A kind is served when the engine applies
every part its converter produces; today those are the low-rank pairs and the output scales, so
LoRA, AdaLoRA, VeRA, DoRA and IA3 are served, and the other kinds are parsed and validated but
refused as not served yet.
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
from slserve.adapters.weights import CONFIG_FILE, PART_NAMES, LoRAAdapter, adapter_error
from slserve.config import ModelConfig

# config, tensors, base model, max_lora_rank, adapter name -> the normalised set
Converter = Callable[[dict, dict[str, torch.Tensor], ModelConfig, int, str], LoRAAdapter]

# The parts of the normalised set the engine applies.
SERVED_PARTS = frozenset({"modules", "output_scales"})


@dataclass(frozen=True)
class Kind:
    name: str
    what: str  # the kind as messages name it
    peft_type: str
    use_dora: bool
    convert: Converter
    parts: frozenset[str]  # parts every adapter of the kind has (LoRA's saved norms are optional)

    @property
    def served(self) -> bool:
        return self.parts <= SERVED_PARTS

    @property
    def selector(self) -> str:
        return f"peft_type {self.peft_type!r}" + (" with use_dora=true" if self.use_dora else "")


_PAIRS = frozenset({"modules"})
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("LORA", "LoRA", "LORA", False, convert_lora, _PAIRS),
        Kind("ADALORA", "AdaLoRA", "ADALORA", False, convert_adalora, _PAIRS),
        Kind("VERA", "VeRA", "VERA", False, convert_vera, _PAIRS),
        Kind("DORA", "DoRA", "LORA", True, convert_dora, frozenset({"modules", "output_scales"})),
        Kind("IA3", "IA3", "IA3", False, convert_ia3, frozenset({"output_scales"})),
        Kind("PROMPT_TUNING", "prompt tuning", "PROMPT_TUNING", False, convert_prompt_tuning,
             frozenset({"virtual_tokens"})),
        Kind("P_TUNING", "P-tuning", "P_TUNING", False, convert_p_tuning, frozenset({"virtual_tokens"})),
        Kind("PREFIX_TUNING", "prefix tuning", "PREFIX_TUNING", False, convert_prefix_tuning,
             frozenset({"prefix_kv"})),
    )
}
_BY_TYPE: dict[tuple[str, bool], Kind] = {(k.peft_type, k.use_dora): k for k in KINDS.values()}


def served_kinds() -> list[str]:
    return [k for k, kind in KINDS.items() if kind.served]


def _kind_lists() -> str:
    unserved = [k for k, kind in KINDS.items() if not kind.served]
    return f"served kinds: {', '.join(served_kinds())}; parsed but not served yet: {', '.join(unserved)}"


def kind_of(config: dict, name: str) -> Kind:
    """The kind of an adapter config; an unknown peft_type is refused, naming the served kinds."""
    peft_type = config.get("peft_type")
    # use_dora only selects a kind for LoRA; other kinds refuse it in their converter.
    use_dora = peft_type == "LORA" and bool(config.get("use_dora"))
    kind = _BY_TYPE.get((peft_type, use_dora)) if isinstance(peft_type, str) else None
    if kind is None:
        raise adapter_error(
            name, f"{CONFIG_FILE}: peft_type {peft_type!r} is not supported ({_kind_lists()})"
        )
    return kind


def require_served_kind(kind: Kind, name: str) -> None:
    """Refuse a kind whose parts the engine does not apply yet, before its tensors are read."""
    if not kind.served:
        raise adapter_error(
            name,
            f"{CONFIG_FILE}: {kind.selector} is not supported yet: {kind.what} adapters are not served yet "
            f"(served kinds: {', '.join(served_kinds())})",
        )


def require_served(adapter: LoRAAdapter) -> None:
    """Refuse an adapter holding a part the engine does not apply yet (a LoRA's own norms)."""
    unserved = [p for p in adapter.parts() if p not in SERVED_PARTS]
    if unserved:
        raise adapter_error(
            adapter.name,
            f"{KINDS[adapter.kind].what} adapters with {PART_NAMES[unserved[0]]} are not served yet "
            "(only low-rank pairs and output scales are applied)",
        )
