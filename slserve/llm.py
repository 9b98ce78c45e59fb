"""The offline API, shaped like vLLM's: `LLM(...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from slserve.config import EngineConfig
from slserve.engine import Engine
from slserve.outputs import RequestOutput
from slserve.sampling_params import SamplingParams


class LLM:
    """One base model plus any number of LoRA adapters, run to completion in-process.

    LLM(model=None, dtype="auto", device="cpu", **engine_options): model None is the
    embedded SmolLM2-135M-Instruct; any EngineConfig field may be passed by name.
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "cpu", **kwargs):
        self.engine = Engine(EngineConfig(model=model, dtype=dtype, device=device, **kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: Sequence[str | None] | str | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * n
        adapter_list = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters] * n
        if len(params_list) != n or len(adapter_list) != n:
            raise ValueError("params and adapters need one entry per prompt")
        work = zip(prompts, params_list, adapter_list, strict=True)
        reqs = [self.engine.add_request(p, sp, a) for p, sp, a in work]
        while any(not r.finished for r in reqs):
            self.engine.step()
        return [
            RequestOutput(
                request_id=r.request_id,
                prompt_token_ids=r.prompt_token_ids,
                token_ids=r.output_token_ids,
                text=r.text,
                finish_reason=r.finish_reason if r.error is None else f"error: {r.error}",
                adapter=r.adapter,
                logprobs=r.logprobs if r.params.logprobs is not None else None,
                prompt_logprobs=((r.prompt_logprobs or [None]) if r.params.prompt_logprobs is not None
                                 else None),
            )
            for r in reqs
        ]

    def add_adapter(self, name: str, path: str | Path, replace: bool = False):
        return self.engine.add_adapter(name, path, replace=replace)

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def adapters(self) -> list[str]:
        return self.engine.adapters()

    def stats(self) -> dict:
        return self.engine.stats()
