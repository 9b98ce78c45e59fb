"""Turns a step's logits into one token per request: greedy, temperature, top-k, top-p, seeds.

A seeded request draws its randomness from its own generator, one draw per generated token, so
its tokens do not depend on what else is in the batch. Sampling uses the exponential race
(argmax of p / E with E ~ Exp(1)), which is an exact draw from p and vectorises over rows.
"""

from __future__ import annotations

import torch

from slserve.outputs import TokenLogprob
from slserve.request import Request


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [R, vocab] float32, one row per request."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if rows:
            idx = torch.tensor(rows)
            tokens[idx] = self._sample(logits[idx], [requests[i] for i in rows])
        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if wanted:
            lp = torch.log_softmax(logits[torch.tensor(wanted)], dim=-1)
            k = max(requests[i].params.logprobs for i in wanted)
            top_v, top_i = lp.topk(max(k, 1), dim=-1)
            for row, i in enumerate(wanted):
                n = requests[i].params.logprobs
                logprobs[i] = TokenLogprob(
                    token_id=token_list[i],
                    logprob=float(lp[row, token_list[i]]),
                    top=list(zip(top_i[row, :n].tolist(), top_v[row, :n].tolist(), strict=True)),
                )
        return token_list, logprobs

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        temps = torch.tensor([r.params.temperature for r in requests], dtype=logits.dtype)
        logits = _scaled_logits(logits, temps)
        vocab = logits.shape[1]
        # Python ints, clamped before they become tensors: any k >= vocab keeps every token.
        top_k = [min(r.params.top_k, vocab) for r in requests]
        top_p = [r.params.top_p for r in requests]
        if any(0 < k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _filter_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        shared = [i for i, r in enumerate(requests) if r.generator is None]
        if shared:
            noise[shared] = torch.empty(len(shared), probs.shape[1]).exponential_(generator=self.generator)
        for i, r in enumerate(requests):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        # An exact 0 draw would make 0 / 0 = NaN for a filtered token, which argmax would pick.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=-1)


def _scaled_logits(logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """(logits - row max) / temperature, never NaN: shifting first makes every value <= 0, so a
    small temperature can only push values towards -inf (weight 0), and the row's maximum stays 0
    (weight 1). Infinite logits are clamped to the largest finite values first, NaN to the lowest,
    so that inf - inf cannot occur. temps: [R], each >= GREEDY_TEMPERATURE."""
    finfo = torch.finfo(logits.dtype)
    logits = logits.nan_to_num(nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return shifted / temps[:, None]


def _filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    ks = torch.tensor([k if k > 0 else vocab for k in top_k])
    rank = torch.arange(vocab)[None, :]
    drop = rank >= ks[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
    before = probs.cumsum(dim=-1) - probs
    drop |= before >= torch.tensor(top_p)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
