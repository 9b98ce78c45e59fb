"""A step's saved norms: the token segments whose adapter brings RMSNorm weights of its own.

LongLoRA trains the RMSNorm weights with its LoRA pairs (PEFT's modules_to_save); such an
adapter's norm rows sit in its pool pages (memory/adapter_layout.py: Extras). The layers normalise
every token with the base weights as usual; then the rows of these segments are normalised again
with their adapter's weight, the same formula as model/layers.py:RMSNorm. Base requests and other
adapters keep the base norms; a step without saved norms builds nothing (`ForwardContext.norms`
is None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slserve.memory.adapter_layout import FINAL_NORM, SlotView


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * F.rms_norm(x.float(), w.shape, eps=eps).to(x.dtype)


class SavedNorms:
    """bounds/views: the step's segments; `flat`: the rank's pool; `logits_index`: the rows the
    final norm sees, in order."""

    def __init__(self, bounds: list[tuple[int, int]], views: list[SlotView], flat: torch.Tensor,
                 hidden: int, logits_index: list[int], eps: float):
        self.eps = eps
        self.layers: dict[tuple[int, str], list[tuple[int, int, torch.Tensor]]] = {}
        self.final: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows of the final norm, weight)
        for (s0, s1), view in zip(bounds, views, strict=True):
            for key, off in (view.norms or {}).items():
                w = flat[off : off + hidden]
                if key != FINAL_NORM:
                    self.layers.setdefault(key, []).append((s0, s1, w))
                    continue
                rows = [j for j, t in enumerate(logits_index) if s0 <= t < s1]
                if rows:
                    self.final.append((torch.tensor(rows, dtype=torch.long, device=flat.device), w))

    def apply(self, h: torch.Tensor, x: torch.Tensor, layer: int, name: str) -> None:
        """h: the base norm of x [T, hidden]; the saved norm's segments are normalised again."""
        for s0, s1, w in self.layers.get((layer, name), ()):
            h[s0:s1] = _norm(x[s0:s1], w, self.eps)

    def apply_final(self, h: torch.Tensor, x: torch.Tensor) -> None:
        """h, x: [R, hidden], the logits rows."""
        for rows, w in self.final:
            h[rows] = _norm(x[rows], w, self.eps)


def saved_norms(bounds: list[tuple[int, int]], views: list[SlotView], flat: torch.Tensor, hidden: int,
                logits_index: list[int], eps: float) -> SavedNorms | None:
    """The step's saved norms, or None when no segment has any."""
    if not any(v.norms for v in views):
        return None
    return SavedNorms(bounds, views, flat, hidden, logits_index, eps)
