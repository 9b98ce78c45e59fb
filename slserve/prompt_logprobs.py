"""Prompt logprobs (vLLM's `prompt_logprobs`, OpenAI's `echo` + `logprobs`): the logprob of each
prompt token given the tokens before it, from the logits of the prefill that computes it anyway.

    add_rows(plan, scheduled) -> spans   the prefill positions of requests that ask, appended to
                                         plan.logits_index after the sampling rows
    record(logits, spans)                one TokenLogprob per prompt token onto req.prompt_logprobs

Position p's logits give token p + 1's logprob; the first prompt token has none (None, as OpenAI
and vLLM report it). Positions already recorded (a prompt recomputed after a preemption) are not
asked for again. The values are the model's raw log-softmax, as for sampled tokens.
"""

from __future__ import annotations

import torch

from slserve.outputs import TokenLogprob
from slserve.plan import StepPlan
from slserve.request import Request


def add_rows(plan: StepPlan, scheduled: list[tuple[Request, int]]) -> list[tuple[Request, int, int]]:
    """Append the logits rows prompt logprobs need to plan.logits_index; (request, first position,
    count) per request, in that order. `scheduled` must be the list build_plan laid out."""
    spans = []
    offset = 0  # where the request's tokens start in plan.input_ids (build_plan keeps the order)
    for req, n in scheduled:
        if req.params.prompt_logprobs is not None:
            done = req.num_computed - req.num_virtual  # tokens computed before this step (< 0: virtual slots)
            start = max(done, len(req.prompt_logprobs) - 1, 0)
            # the last prompt position predicts the first output token: a sampling row, not ours
            end = min(done + n, req.num_prompt_tokens - 1)
            if start < end:
                first = offset + start - done
                plan.logits_index.extend(range(first, first + end - start))
                spans.append((req, start, end - start))
        offset += n
    return spans


def record(logits: torch.Tensor, spans: list[tuple[Request, int, int]]) -> None:
    """logits: [sum of counts, vocab] (any float dtype), the rows add_rows asked for, in order."""
    row = 0
    for req, start, count in spans:
        if not req.prompt_logprobs:
            req.prompt_logprobs.append(None)
        lp = torch.log_softmax(logits[row : row + count].float(), dim=-1)  # [count, vocab]
        row += count
        targets = torch.tensor(req.prompt_token_ids[start + 1 : start + 1 + count], device=lp.device)
        chosen = lp.gather(1, targets[:, None])  # [count, 1]
        ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()  # 1: the most likely token
        chosen = chosen[:, 0]
        k = req.params.prompt_logprobs
        top_v, top_i = lp.topk(max(k, 1), dim=-1)
        for j, (token, value) in enumerate(zip(targets.tolist(), chosen.tolist(), strict=True)):
            req.prompt_logprobs.append(TokenLogprob(
                token_id=token, logprob=value, rank=ranks[j],
                top=list(zip(top_i[j, :k].tolist(), top_v[j, :k].tolist(), strict=True))))
