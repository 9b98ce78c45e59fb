"""LoRA and DoRA (peft_type LORA, use_dora false / true) into the normalised set.

    y = x @ W^T + scale * (x @ A^T) @ B^T      A: [r, in], B: [out, r]
    scale = alpha / r   (alpha / sqrt(r) with use_rslora)

r and alpha per module are resolved from rank_pattern / alpha_pattern with PEFT's own rule
(peft.utils.other.get_pattern_key). DoRA adds the magnitude vector m of each module, kept as an
output scale m / |W + scale * B @ A|_row that leaves the bias alone, as PEFT's DoRA does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch

from slserve.adapters.checks import check_gain, check_pair, check_shape, max_gain, to_float32
from slserve.adapters.fields import ConfigFields, is_int, is_number
from slserve.adapters.norms import take_saved_norms
from slserve.adapters.targets import (
    TargetSpec,
    group_module_tensors,
    param_key_pattern,
    require_params,
    where,
)
from slserve.adapters.weights import (
    WEIGHTS_FILE,
    LoRAAdapter,
    LoRAWeights,
    OutputScale,
    adapter_error,
    build_adapter,
)
from slserve.config import ModelConfig

# LoraConfig fields that, when truthy, change the forward pass beyond `y += scale * B A x` or add
# trained parts outside A/B. The variant fields mirror peft's LoraLayer.resolve_lora_variant.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "layer_replication": "layer_replication is not supported",
    "lora_bias": "lora_bias (a trained bias on lora_B) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora=true) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
}
# init_lora_weights values that select a LoRA variant (not just an initialisation).
_VARIANT_INITS = ("mica",)
# Initialisations that subtract the initial adapter from the base weights: such an adapter is only
# right on top of that modified base, unless peft converted it when saving (which writes
# init_lora_weights=true), see PeftModel.save_pretrained(path_initial_model_for_weight_conversion).
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

_PAIR = ("lora_A", "lora_B")
_LORA_KEYS = param_key_pattern({"lora_A": r"(?:\.[^.]+)?\.weight", "lora_B": r"(?:\.[^.]+)?\.weight"})
# DoRA's magnitude is saved as `<module>.lora_magnitude_vector` (peft adds `.<adapter>.weight` on load).
_DORA_KEYS = param_key_pattern(
    {
        "lora_A": r"(?:\.[^.]+)?\.weight",
        "lora_B": r"(?:\.[^.]+)?\.weight",
        "lora_magnitude_vector": r"(?:\.[^.]+)?(?:\.weight)?",
    }
)


def refuse_unsupported_fields(fields: ConfigFields) -> None:
    for field_name, reason in UNSUPPORTED_FIELDS.items():
        if fields.get(field_name):
            raise fields.bad(reason)


class _LoraSpec:
    """The parts of a LoraConfig that decide the scale of each module."""

    def __init__(self, fields: ConfigFields, model: ModelConfig, dora: bool) -> None:
        if not dora and fields.get("use_dora"):
            raise fields.bad("DoRA (use_dora=true) adapters are converted by the DoRA kind")
        refuse_unsupported_fields(fields)
        init = fields.get("init_lora_weights")
        if init in _VARIANT_INITS:
            raise fields.bad(f"the LoRA variant init_lora_weights={init!r} is not supported")
        if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
            raise fields.bad(
                f"init_lora_weights={init!r} adapters only work on a modified base model; convert it "
                "with save_pretrained(path_initial_model_for_weight_conversion=...) first"
            )
        self.r = fields.positive_int("r", 8)
        self.alpha = fields.number("lora_alpha", 8)
        self.use_rslora = fields.flag("use_rslora", False)
        self.bias = fields.choice("bias", "none", ("none", "all", "lora_only"))
        self.rank_pattern = fields.pattern("rank_pattern", lambda v: is_int(v) and v >= 1)
        self.alpha_pattern = fields.pattern("alpha_pattern", is_number)
        self.targets = TargetSpec(fields, model)

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """peft LoraModel._create_and_replace: the first pattern key matching wins."""
        r_key = get_pattern_key(self.rank_pattern, key)
        alpha_key = get_pattern_key(self.alpha_pattern, key)
        return self.rank_pattern.get(r_key, self.r), self.alpha_pattern.get(alpha_key, self.alpha)

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def get_pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    """peft.utils.other.get_pattern_key, verbatim semantics."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def describe_foreign_key(key: str, bias: str) -> str:
    """The reason a tensor key is not one of the kind's weights, as specific as the key allows."""
    if ".lora_embedding_" in key:
        return f"tensor {key!r} is a LoRA on 'embed_tokens', which the server does not support"
    if ".lora_magnitude_vector" in key:
        return f"tensor {key!r} is a DoRA magnitude vector, but use_dora is not set in the config"
    if ".lora_B." in key and key.endswith(".bias"):
        return f"tensor {key!r} is a lora_B bias (lora_bias), which is not supported"
    if key.endswith(".bias") and bias != "none":
        return (
            f"bias={bias!r} trains bias tensors of the base model ({key!r}), which the server "
            "does not apply; train with bias='none'"
        )
    return f"unexpected tensor key {key!r}"


def convert_lora(config: dict, tensors: dict[str, torch.Tensor], model: ModelConfig, max_rank: int,
                 name: str) -> LoRAAdapter:
    return _convert(config, tensors, model, max_rank, name, dora=False)


def convert_dora(config: dict, tensors: dict[str, torch.Tensor], model: ModelConfig, max_rank: int,
                 name: str) -> LoRAAdapter:
    return _convert(config, tensors, model, max_rank, name, dora=True)


def _convert(config: dict, tensors: dict[str, torch.Tensor], model: ModelConfig, max_rank: int, name: str,
             dora: bool) -> LoRAAdapter:
    fields = ConfigFields(config, name)
    spec = _LoraSpec(fields, model, dora)
    if dora and fields.flag("use_dora", False) is not True:
        raise fields.bad("use_dora must be true for a DoRA adapter")
    tensors = dict(tensors)
    norms, final_norm = take_saved_norms(fields, tensors, model)
    keys = _DORA_KEYS if dora else _LORA_KEYS
    groups = group_module_tensors(
        tensors, keys, spec.targets, name, lambda k: describe_foreign_key(k, spec.bias)
    )
    shapes = model.module_shapes()
    bound = max_gain(model)

    modules: dict[tuple[int, str], LoRAWeights] = {}
    output_scales: dict[tuple[int, str], OutputScale] = {}
    for (layer, module), (path, found) in sorted(groups.items()):
        at = where(layer, module)
        a, b = require_params(found, _PAIR, at, name)
        r = check_pair(a, b, shapes[module], max_rank, at, name)
        r_cfg, alpha = spec.rank_and_alpha(path)
        if r != r_cfg:
            raise adapter_error(
                name, f"rank mismatch: {at} has rank {r} tensors but adapter_config.json resolves r={r_cfg}"
            )
        a = to_float32(a, at + ".lora_A", name, check_finite=False)
        b = to_float32(b, at + ".lora_B", name, check_finite=False)
        scale = spec.scale(r, alpha)
        check_gain(a, b, scale, bound, at, name)  # refuses non-finite values as to_float32 would
        modules[(layer, module)] = LoRAWeights(a=a, b=b, scale=float(scale))
        if dora:
            (m,) = require_params(found, ("lora_magnitude_vector",), at + " (DoRA)", name)
            check_shape(m, (shapes[module][1],), f"{at}.lora_magnitude_vector (DoRA)", name)
            m = to_float32(m, f"{at}.lora_magnitude_vector", name)
            output_scales[(layer, module)] = OutputScale(vector=m, scales_bias=False, weight_norm=True)

    if not modules:
        raise adapter_error(name, f"{WEIGHTS_FILE} contains no LoRA tensors (missing tensors)")
    adapted = {m for _, m in modules}
    spec.targets.check_all_present(adapted)
    return build_adapter(name, config, "DORA" if dora else "LORA", modules, adapted, output_scales, norms,
                         final_norm=final_norm)
