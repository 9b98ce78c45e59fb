"""Text out of tokens: incremental detokenizing, stop checks and the per-step output of a request.

The scheduler owns a request's state (tokens, pages, status); this module only reads the tokens,
keeps the request's text, advances a structured output's grammar matcher and tells the engine why
a request should stop.
"""

from __future__ import annotations

from slserve.outputs import StepOutput
from slserve.request import Request, Status


class OutputProcessor:
    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    def finish_reason(self, req: Request, token: int) -> str | None:
        """Detokenize the newest token and say whether it ends the request ("stop", "length")."""
        params = req.params
        self._detokenize(req)
        if req.matcher is not None:
            # The mask allowed only tokens the grammar accepts, so a refusal is a bug: it ends this
            # request (the engine's per-request failure boundary) rather than letting it go astray.
            if not req.matcher.accept_token(token):
                raise RuntimeError(f"the grammar of structured outputs refused token {token}")
            if req.matcher.is_terminated():  # it accepted a stop token: the output is complete
                return "stop"
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return "stop"
        if params.stop and req.num_output_tokens > params.min_tokens and self._check_stop_strings(req):
            return "stop"
        if req.num_output_tokens >= params.max_tokens:
            return "length"
        return None

    def output(self, req: Request, new_ids: list[int], new_lps) -> StepOutput:
        finished = req.status is Status.FINISHED
        # Hold back text that could still turn into a stop string.
        hold = 0 if finished or not req.params.stop else max(len(s) for s in req.params.stop) - 1
        end = max(req.emitted_text_len, len(req.text) - hold)
        delta = req.text[req.emitted_text_len : end]
        req.emitted_text_len = end
        prompt_lps = None
        if req.params.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            req.prompt_logprobs_sent = True
            prompt_lps = req.prompt_logprobs or [None]  # a one-token prompt has just the None
        return StepOutput(
            request_id=req.request_id,
            new_token_ids=new_ids,
            new_text=delta,
            finished=finished,
            finish_reason=req.finish_reason if finished else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_generated_tokens=req.num_output_tokens,
            new_logprobs=list(new_lps),
            prompt_logprobs=prompt_lps,
            error=req.error,
            error_status=req.error_status,
        )

    def _detokenize(self, req: Request) -> None:
        """Incremental detokenization: decode a short window so that multi-token characters and
        leading spaces come out right without re-decoding the whole output every step."""
        ids = req.token_ids
        if ids[-1] in self.eos_ids and not req.params.ignore_eos:
            return
        decode = self.tokenizer.decode
        prefix = decode(ids[req.prefix_offset : req.read_offset], skip_special_tokens=True)
        full = decode(ids[req.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            req.text += full[len(prefix) :]
            req.prefix_offset = req.read_offset
            req.read_offset = len(ids)

    def _check_stop_strings(self, req: Request) -> bool:
        longest = max(len(s) for s in req.params.stop)
        window_start = max(0, req.emitted_text_len - longest)
        hits = [(req.text.find(s, window_start), s) for s in req.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        req.text = req.text[: i + len(s)] if req.params.include_stop_str_in_output else req.text[:i]
        return True
