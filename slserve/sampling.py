"""Turns a step's logits into one token per request: the grammar mask of structured outputs,
logit_bias, min_tokens, penalties, then greedy or temperature, min-p, top-k, top-p, seeds.

The order is vLLM's: the grammar mask (slserve.structured; its disallowed tokens get -inf, which
nothing later can undo), logit_bias and the min_tokens mask, then the repetition, frequency and
presence penalties (these change the argmax, so greedy rows get them too), then for sampled rows
temperature, min-p, top-k and top-p. Each stage runs only on the rows that ask for it, so a batch
without these settings pays nothing for them. Logprobs are the model's, taken before any of this
(vLLM's default).

A seeded request draws its randomness from its own generator, one draw per generated token, so
its tokens do not depend on what else is in the batch. Sampling uses the exponential race
(argmax of p / E with E ~ Exp(1)), which is an exact draw from p and vectorises over rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from slserve.outputs import TokenLogprob
from slserve.request import Request
from slserve.structured import fill_masks


class Sampler:
    def __init__(self, seed: int = 0, eos_token_ids: Iterable[int] = (), row_argmax=None):
        self.generator = torch.Generator().manual_seed(seed)
        # Masked, with each request's stop_token_ids, until the request has min_tokens outputs.
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.row_argmax = row_argmax  # the C++ loop for CPU logits (cpu_ext.row_argmax_op)

    def __call__(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [R, vocab], one row per request, in float32 or the model's dtype. Rows that only
        take the argmax read the model's values as they are (widening is exact, so the argmax is
        the same); anything more (sampling, logprobs, biases, masks, penalties) runs in float32."""
        if logits.dtype != torch.float32 and not all(_argmax_only(r) for r in requests):
            logits = logits.float()
        processed = self._process(logits, requests)
        tokens = self._argmax(processed)
        rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            tokens[idx] = self._sample(processed[idx], [requests[i] for i in rows])
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

    def _argmax(self, x: torch.Tensor) -> torch.Tensor:
        if (self.row_argmax is not None and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.bfloat16) and x.stride(-1) == 1 and x.shape[-1] > 0):
            return self.row_argmax(x)
        return x.argmax(dim=-1)

    def _process(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The grammar mask, logit_bias, the min_tokens mask and the penalties, on a copy (logprobs
        read the original); `logits` itself when no request asks for any of them."""
        vocab = logits.shape[1]
        guided = [i for i, r in enumerate(requests) if r.matcher is not None]
        rows, cols, values = [], [], []
        for i, r in enumerate(requests):
            for token, bias in r.params.logit_bias.items():
                rows.append(i)
                cols.append(token)
                values.append(bias)
            if r.num_output_tokens < r.params.min_tokens:
                stops = r.params.stop_token_ids if r.params.ignore_eos else [*self.eos_token_ids,
                                                                             *r.params.stop_token_ids]
                for token in stops:
                    if token < vocab:  # an id outside the vocabulary can never be sampled anyway
                        rows.append(i)
                        cols.append(token)
                        values.append(float("-inf"))
        penalized = [i for i, r in enumerate(requests) if r.params.penalized]
        if not rows and not penalized and not guided:
            return logits
        logits = logits.clone()
        if guided:
            banned = fill_masks([requests[i].matcher for i in guided], vocab).logical_not_().to(logits.device)
            for row, i in enumerate(guided):  # in place, row by row: no gather and scatter of the rows
                logits[i].masked_fill_(banned[row], float("-inf"))
        if rows:
            index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
            # accumulate: -inf wins over a bias on the same token
            logits.index_put_(index, torch.tensor(values, device=logits.device), accumulate=True)
        if penalized:
            idx = torch.tensor(penalized, device=logits.device)
            logits[idx] = _apply_penalties(logits[idx], [requests[i] for i in penalized])
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        temps = torch.tensor([r.params.temperature for r in requests], dtype=logits.dtype)
        logits = _scaled_logits(logits, temps)
        min_p = [r.params.min_p for r in requests]
        if any(min_p):
            logits = _filter_min_p(logits, min_p)
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


def _argmax_only(r: Request) -> bool:
    """Whether r's next token is the plain argmax of its logits: greedy, no logprobs, and nothing
    that Sampler._process would change."""
    p = r.params
    return (p.greedy and p.logprobs is None and not p.logit_bias and not p.penalized and r.matcher is None
            and r.num_output_tokens >= p.min_tokens)


def _scaled_logits(logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """(logits - row max) / temperature, never NaN: shifting first makes every value <= 0, so a
    small temperature can only push values towards -inf (weight 0), and the row's maximum stays 0
    (weight 1). Infinite logits are clamped to the largest finite values first, NaN to the lowest,
    so that inf - inf cannot occur. temps: [R], each >= GREEDY_TEMPERATURE."""
    finfo = torch.finfo(logits.dtype)
    logits = logits.nan_to_num(nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return shifted / temps[:, None]


def _token_counts(sequences: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(sequences), vocab] float32: how often each token occurs in each sequence."""
    width = max(1, max(len(s) for s in sequences))
    # Padding uses the extra column `vocab`, dropped at the end.
    ids = torch.full((len(sequences), width), vocab, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    ids = ids.to(device)
    counts = torch.zeros(len(sequences), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """vLLM's order: repetition over prompt and output (divide a positive logit, multiply a
    negative one), then OpenAI's frequency and presence penalties over the output.
    logits: [P, vocab], one row per request."""
    vocab, device = logits.shape[1], logits.device
    counts = _token_counts([r.output_token_ids for r in requests], vocab, device)  # [P, vocab]
    seen = counts > 0
    repetition = [r.params.repetition_penalty for r in requests]
    if any(p != 1.0 for p in repetition):
        in_prompt = _token_counts([r.prompt_token_ids for r in requests], vocab, device) > 0
        penalty = torch.tensor(repetition, device=device)[:, None].expand(-1, vocab)
        penalty = torch.where(seen | in_prompt, penalty, 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    frequency = torch.tensor([r.params.frequency_penalty for r in requests], device=device)[:, None]
    presence = torch.tensor([r.params.presence_penalty for r in requests], device=device)[:, None]
    return logits - frequency * counts - presence * seen


def _filter_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p x the row's largest (after temperature, as
    vLLM and transformers' MinPLogitsWarper do); the most likely token always stays."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=logits.device)[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


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
