"""Tensor checks every adapter kind shares: shapes against the base model, dtype, finite values,
and the gain bound that keeps a served adapter from overflowing the serving dtype."""

from __future__ import annotations

import math

import torch

from slserve.adapters.weights import adapter_error
from slserve.config import ModelConfig


def check_pair(
    a: torch.Tensor,
    b: torch.Tensor,
    in_out: tuple[int, int],
    max_rank: int,
    where: str,
    name: str,
    names: tuple[str, str] = ("lora_A", "lora_B"),
) -> int:
    """The rank of a module's low-rank pair after checking it against the base model; raises otherwise."""
    in_features, out_features = in_out
    a_name, b_name = names
    if a.ndim != 2 or b.ndim != 2:
        raise adapter_error(
            name,
            f"{where}: {a_name} and {b_name} must be matrices, got shapes {list(a.shape)} and "
            f"{list(b.shape)}",
        )
    r = a.shape[0]
    if b.shape[1] != r:
        raise adapter_error(
            name,
            f"{where}: rank mismatch between {a_name} {list(a.shape)} and {b_name} {list(b.shape)} "
            f"(A/B rank mismatch)",
        )
    if r < 1:
        raise adapter_error(name, f"{where}: rank 0 tensors")
    if r > max_rank:
        raise adapter_error(name, f"rank {r} of {where} exceeds the server's max_lora_rank {max_rank}")
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise adapter_error(
            name,
            f"{where}: shapes {a_name} {list(a.shape)} / {b_name} {list(b.shape)} do not fit the base model "
            f"(expected [{r}, {in_features}] / [{out_features}, {r}])",
        )
    return r


def check_shape(t: torch.Tensor, shape: tuple[int, ...], what: str, name: str) -> None:
    if tuple(t.shape) != shape:
        raise adapter_error(
            name, f"{what} has shape {list(t.shape)}, but the base model needs {list(shape)} (wrong shape)"
        )


def max_gain(model: ModelConfig) -> float:
    """The largest gain a module's LoRA may have on `model` (see check_gain), a bound that keeps
    every activation finite in float32 and bfloat16, which share float32's exponent range.

    The residual stream must stay below sqrt(max / hidden): RMSNorm squares and sums it. Each
    block reads a normalised input, so gains do not compound across layers, only within one: q/k/v
    and gate/up see unit-RMS inputs (gain g), o_proj a mix of value rows (g^2), down_proj the
    product gate * up (g^3). Layers add up, so num_layers * g^3 <= sqrt(max / hidden), i.e.
    g <= (sqrt(max / hidden) / num_layers)^(1/3): 2.9e5 for SmolLM2-135M (576 wide, 30 layers).
    Trained adapters have gains of about 1 to 1e3, the overflowing ones of issue 15 above 1e29.
    float16 has a far smaller range, which base models alone can exceed; it is not covered.
    """
    limit = math.sqrt(torch.finfo(torch.float32).max / model.hidden_size)
    return (limit / model.num_layers) ** (1 / 3)


def check_gain(a: torch.Tensor, b: torch.Tensor, scale: float, bound: float, where: str, name: str) -> None:
    """Refuse a module whose LoRA could overflow the serving dtype once applied.

    For an input row x of RMS 1 (so |x|_2 = sqrt(in)), Cauchy-Schwarz gives the exact worst cases
        shrink  |(x @ A^T)_i|            <= |A_i|_2 * sqrt(in)
        output  |scale * (x @ A^T @ B^T)_j| <= |scale| * |(B @ A)_j|_2 * sqrt(in)      (the gain)
    and, for the expand alone on an intermediate of RMS 1, |scale| * |B_j|_2 * sqrt(r). Each of
    these, and |scale| itself, must stay within `bound` (max_gain). |(B @ A)_j|^2 is computed as
    B_j (A A^T) B_j^T, which costs r^2 (in + out) instead of the r * in * out of forming B @ A.
    Squares are taken in float32, so weights beyond ~1e19 make a gain inf and are refused whatever
    the scale; such weights are absurd for any model.
    """
    r, in_features = a.shape
    a_norm, b_norm = float(a.norm(dim=1).max()), float(b.norm(dim=1).max())
    if not (math.isfinite(a_norm) and math.isfinite(b_norm)):  # NaN or inf inside, or absurd values
        check_finite_values(a, f"{where}.lora_A", name)
        check_finite_values(b, f"{where}.lora_B", name)
    row_gain = float(((b @ (a @ a.T)) * b).sum(dim=1).max()) ** 0.5  # max_j |(B @ A)_j|_2
    gains = {
        "scale (lora_alpha / r)": abs(scale),
        "lora_A gain": a_norm * math.sqrt(in_features),
        "lora_B gain (scale * lora_B)": abs(scale) * b_norm * math.sqrt(r),
        "gain (scale * lora_B @ lora_A)": abs(scale) * row_gain * math.sqrt(in_features),
    }
    for what, gain in gains.items():
        if not gain <= bound:  # also refuses inf and NaN
            raise adapter_error(
                name,
                f"{where}: the {what} is {gain:.3g}, beyond the bound {bound:.3g} that keeps the model's "
                "activations finite (a unit-RMS input could overflow float32/bfloat16); retrain or rescale "
                "the adapter",
            )


def check_scale_bound(v: torch.Tensor, bound: float, what: str, name: str) -> None:
    """Refuse a per-channel scale that could overflow once applied (the bound of max_gain)."""
    gain = float(v.abs().max()) if v.numel() else 0.0
    if not gain <= bound:
        raise adapter_error(
            name,
            f"{what}: a scale of {gain:.3g} is beyond the bound {bound:.3g} that keeps the activations "
            "finite",
        )


def to_float32(t: torch.Tensor, where: str, name: str, check_finite: bool = True) -> torch.Tensor:
    """t as contiguous float32, refused unless floating point and (check_finite) finite.
    check_finite=False is for a LoRA pair that check_gain will see: a non-finite value makes one of
    its norms non-finite, and check_gain then names it as this would (one pass fewer per tensor)."""
    if not t.is_floating_point():
        raise adapter_error(name, f"{where} has dtype {t.dtype}; floating-point weights are required")
    t = t.to(torch.float32).contiguous()
    if check_finite:
        check_finite_values(t, where, name)
    return t


def check_finite_values(t: torch.Tensor, where: str, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise adapter_error(name, f"{where} contains non-finite values (nan or inf)")
