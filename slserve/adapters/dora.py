"""DoRA's output scale, resolved once at load against the base model's weights.

The converter (adapters/lora.py) keeps each module's magnitude m; the scale PEFT applies is
s = m / |W + scale * B @ A|_row, which needs the base weight W. The adapter store resolves it when
it parses the adapter (upload or load into the host tier) into the vector s and, for a module with
a bias, the shift (1 - s) * bias, so that y = s * (x W^T + bias + lora(x)) + shift is PEFT's
s * (x W^T + lora(x)) + bias. The norm uses the checkpoint's weights in float32, whole: each
tensor-parallel rank later takes its own columns of s (parallel.py: output_scale_slice).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors import safe_open

from slserve.adapters.checks import check_scale_bound, max_gain
from slserve.adapters.targets import where
from slserve.adapters.weights import BLOCK_OF, LoRAAdapter, OutputScale, adapter_error, tensor_bytes
from slserve.config import ModelConfig


class BaseWeights:
    """The base model's linear weights, read from its safetensors files one module at a time."""

    def __init__(self, path: Path, model: ModelConfig):
        self.model = model
        self._file: dict[str, Path] = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                self._file.update(dict.fromkeys(f.keys(), file))

    def _read(self, key: str) -> torch.Tensor | None:
        file = self._file.get(key)
        if file is None:
            return None
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key).to(torch.float32)

    def linear(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W [out, in], bias [out] or None) of one target module, float32."""
        prefix = f"model.layers.{layer}.{BLOCK_OF[module]}.{module}."
        weight = self._read(prefix + "weight")
        if weight is None:
            raise KeyError(f"the base checkpoint has no {prefix}weight")
        return weight, self._read(prefix + "bias")


def resolve_weight_norms(adapter: LoRAAdapter, base: BaseWeights | None) -> LoRAAdapter:
    """The adapter with every DoRA magnitude turned into the scale (and shift) PEFT applies."""
    pending = {k: s for k, s in adapter.output_scales.items() if s.weight_norm}
    if not pending:
        return adapter
    if base is None:
        raise adapter_error(adapter.name, "DoRA adapters need the base model's weights for their norms")
    bound = max_gain(base.model)
    scales = dict(adapter.output_scales)
    for (layer, module), s in pending.items():
        at = f"{where(layer, module)} (DoRA)"
        weight, bias = base.linear(layer, module)
        w = adapter.modules[(layer, module)]
        norm = (weight + w.scale * (w.b @ w.a)).norm(dim=1)  # peft DoraLinearLayer.get_weight_norm
        vector = s.vector / norm
        if not bool(torch.isfinite(vector).all()):
            raise adapter_error(adapter.name,
                                f"{at}: a row of W + scale * B @ A has norm 0; its scale is undefined")
        check_scale_bound(vector, bound, at, adapter.name)
        shift = None if bias is None else (1 - vector) * bias
        scales[(layer, module)] = OutputScale(vector=vector, scales_bias=False, weight_norm=False,
                                              shift=shift)
    extra = tensor_bytes(*(scales[k].shift for k in pending))
    return dataclasses.replace(adapter, output_scales=scales, nbytes=adapter.nbytes + extra)
