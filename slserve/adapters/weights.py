"""The one normalised weight set every adapter kind is converted into, and the error of every refusal.

Whatever PEFT method trained it, an adapter reaches the host cache, the pool and the forward as
one `LoRAAdapter`; code downstream reads its parts, never its kind (slserve/adapters/kinds.py):

    modules         (layer, module) -> LoRAWeights     y += scale * (x @ a^T) @ b^T
    output_scales   (layer, module) -> OutputScale     a per-channel scale of the module's output
    virtual_tokens  [n, hidden]                         embeddings put before the prompt's
    prefix_kv       [layers, 2, n, kv_heads, head_dim]  keys and values every layer attends to first
    norms           (layer, norm name) -> [hidden]      RMSNorm weights that replace the base model's
    final_norm      [hidden]                            the final RMSNorm's weight

The engine applies every part (docs/ARCHITECTURE.md: Adapter kinds at run time).
All tensors are float32 on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# The linear modules the server adapts, in layer order, with the block each lives in.
TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
BLOCK_OF: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

# Parts of the normalised set, as named in messages.
PART_NAMES: dict[str, str] = {
    "modules": "low-rank pairs",
    "output_scales": "per-module output scales",
    "virtual_tokens": "virtual-token embeddings",
    "prefix_kv": "per-layer prefix keys and values",
    "norms": "RMSNorm weights of its own (modules_to_save)",
}


class AdapterError(ValueError):
    """An adapter that cannot be served; the message is shown to the client as is."""


def adapter_error(name: str, reason: str) -> AdapterError:
    return AdapterError(f"adapter {name!r}: {reason}")


@dataclass(frozen=True, eq=False)
class LoRAWeights:
    """One module's LoRA: y += scale * (x @ a^T) @ b^T."""

    a: torch.Tensor  # [r, in] float32 (16-bit in the host tier: adapters/host_copy.py)
    b: torch.Tensor  # [out, r] float32 (likewise)
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True, eq=False)
class OutputScale:
    """A per-channel scale of one module's output, with the module's LoRA inside it:

        y = s * (x @ W^T + lora(x)) + bias      (scales_bias=False: DoRA)
        y = s * (x @ W^T + bias + lora(x))      (scales_bias=True: IA3)

    With `weight_norm` the vector holds DoRA's magnitude m and the scale is
    s = m / |W + scale * B @ A|_row (the norm of each output row, taken with the base weights);
    the converter cannot know W, so the store resolves it once at load (adapters/dora.py) into
    `vector` = s and, for a module with a bias, `shift` = (1 - s) * bias. What the engine applies
    is then always

        y = vector * (x @ W^T + bias + lora(x)) + shift
    """

    vector: torch.Tensor  # [out] float32
    scales_bias: bool
    weight_norm: bool
    shift: torch.Tensor | None = None  # [out] float32


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """A parsed, validated adapter held in host memory: the normalised set (see the module docstring)."""

    name: str
    modules: dict[tuple[int, str], LoRAWeights]  # (layer index, module name) -> weights
    target_modules: tuple[str, ...]  # module names the adapter adapts, in TARGET_MODULES order
    ranks: dict[str, int]  # module name -> max rank of its low-rank pairs over layers
    nbytes: int  # host bytes of all tensors
    config: dict
    kind: str = "LORA"  # kinds.KINDS key: what the adapter was converted from
    output_scales: dict[tuple[int, str], OutputScale] = field(default_factory=dict)
    virtual_tokens: torch.Tensor | None = None  # [n, hidden]
    prefix_kv: torch.Tensor | None = None  # [layers, 2, n, kv_heads, head_dim]
    norms: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # -> [hidden]
    final_norm: torch.Tensor | None = None  # [hidden]

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    @property
    def num_virtual(self) -> int:
        """Sequence slots the adapter puts before a request's prompt: its virtual tokens or its
        prefix K/V (0 for the other kinds)."""
        if self.virtual_tokens is not None:
            return self.virtual_tokens.shape[0]
        return 0 if self.prefix_kv is None else self.prefix_kv.shape[2]

    def parts(self) -> list[str]:
        """The PART_NAMES keys this adapter holds."""
        held = {
            "modules": bool(self.modules),
            "output_scales": bool(self.output_scales),
            "virtual_tokens": self.virtual_tokens is not None,
            "prefix_kv": self.prefix_kv is not None,
            "norms": bool(self.norms) or self.final_norm is not None,
        }
        return [part for part in PART_NAMES if held[part]]


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def build_adapter(
    name: str,
    config: dict,
    kind: str,
    modules: dict[tuple[int, str], LoRAWeights],
    adapted: set[str],
    output_scales: dict[tuple[int, str], OutputScale] | None = None,
    norms: dict[tuple[int, str], torch.Tensor] | None = None,
    **tensors: torch.Tensor | None,
) -> LoRAAdapter:
    """The normalised set of a converted adapter, its ranks and byte count derived from its parts;
    `adapted` names the modules the adapter adapts, `tensors` the optional tensor parts
    (virtual_tokens, prefix_kv, final_norm)."""
    ranks: dict[str, int] = {}
    for (_, module), w in modules.items():
        ranks[module] = max(ranks.get(module, 0), w.rank)
    output_scales, norms = output_scales or {}, norms or {}
    nbytes = tensor_bytes(
        *(t for w in modules.values() for t in (w.a, w.b)),
        *(t for s in output_scales.values() for t in (s.vector, s.shift)),
        *norms.values(),
        *tensors.values(),
    )
    return LoRAAdapter(
        name=name,
        modules=modules,
        target_modules=tuple(m for m in TARGET_MODULES if m in adapted),
        ranks=ranks,
        nbytes=nbytes,
        config=config,
        kind=kind,
        output_scales=output_scales,
        norms=norms,
        **tensors,
    )
