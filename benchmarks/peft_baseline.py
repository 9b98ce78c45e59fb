"""The baseline S-LoRA compares against: transformers + PEFT serving the load_test.py trace in-process.

Every adapter named by --adapters is loaded into one PeftModel (PeftModel.from_pretrained for the
first, load_adapter for the rest) from ADAPTER_DIR/<name>. An online loop replays the trace made by
load_test.make_trace (same arrivals, adapters, prompts, lengths and seed): whenever the previous
batch finishes it takes every request that has arrived (at most --max-batch-size, oldest first),
left-pads them into one batch and runs `model.generate(..., adapter_names=[...])`, a mixed-adapter
batch; "__base__" rows use the base model. Decoding is greedy with a fixed output length
(min_new_tokens = max_new_tokens = the longest output in the batch); a stopping criterion ends each
row at its own output length. A batch admits no newcomers until it finishes.

Timing. There is no token stream, so a StoppingCriteria hook stamps the clock after every decoding
step of the batch (after torch.cuda.synchronize on a GPU). The first stamp marks the end of the
batch's prefill, so TTFT = (batch start + prefill time) - arrival: the wait for earlier batches is
included, exactly as an arriving request would see it. A request's k-th token time is the k-th
stamp and its end is the stamp of its last token, so TPOT, ITL and E2E follow the definitions in
load_test.py. The same metrics table and JSON layout as load_test.py are produced.

    python benchmarks/peft_baseline.py --model /path/to/base --adapter-dir adapters/ --adapters lora-/5 \\
        --rate 2 --num-requests 8 --input-len 64 --output-len 16 --dtype bfloat16 --out peft.json
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from load_test import (
    RequestRecord,
    TraceItem,
    WorkloadConfig,
    add_workload_args,
    build_result,
    make_trace,
    report,
    resolve_model_path,
    workload_from_args,
)
from tqdm import tqdm

log = logging.getLogger("peft_baseline")

BASE = "__base__"  # PEFT's adapter name for rows that use the base model


@dataclass(frozen=True)
class BaselineConfig:
    workload: WorkloadConfig
    adapter_dir: str | None = None  # required when the workload names adapters
    dtype: str = "bfloat16"
    device: str = "auto"  # auto: cuda when available, else cpu
    max_batch_size: int = 32
    slo_ttft: float = 1.0
    warmup: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError("dtype must be float32, bfloat16 or float16")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.workload.adapters and not self.adapter_dir:
            raise ValueError("adapter_dir is required when the workload uses adapters")


def load_model(cfg: BaselineConfig) -> tuple[Any, Any, str]:
    """Base model (+ every adapter in one PeftModel), tokenizer, device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    path = str(resolve_model_path(cfg.workload.model))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype)).to(device)
    names = cfg.workload.adapters
    if names:
        from peft import PeftModel

        root = Path(cfg.adapter_dir or "")
        # autocast_adapter_dtype=False keeps the adapters in the base dtype instead of upcasting
        # them to float32, as a serving system would.
        model = PeftModel.from_pretrained(
            model, str(root / names[0]), adapter_name=names[0], autocast_adapter_dtype=False
        )
        for name in tqdm(names[1:], desc="load adapters", unit="adapter", disable=not cfg.progress):
            model.load_adapter(str(root / name), adapter_name=name, autocast_adapter_dtype=False)
        model = model.to(device)
    model.eval()
    return model, tok, device


class StepClock:
    """A StoppingCriteria that stamps the clock after every decoding step and ends each row at its
    own output length."""

    def __init__(self, prompt_width: int, out_lens: list[int], t0: float, sync: bool):
        import torch

        self.prompt_width = prompt_width
        self.out_lens = torch.tensor(out_lens)
        self.t0 = t0
        self.sync = sync
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t0)
        # input_ids: [batch, prompt_width + generated]
        generated = input_ids.shape[1] - self.prompt_width
        return (self.out_lens <= generated).to(input_ids.device)


def run_batch(
    model: Any, tok: Any, device: str, items: list[TraceItem], use_adapters: bool, t0: float
) -> list[float]:
    """Generate for one batch; returns the step stamps (seconds since t0)."""
    import torch
    from transformers import StoppingCriteriaList

    width = max(len(it.prompt_token_ids) for it in items)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):  # left padding: every row's last prompt token is aligned
        n = len(it.prompt_token_ids)
        ids[row, width - n :] = torch.tensor(it.prompt_token_ids)
        mask[row, width - n :] = 1
    out_lens = [it.output_len for it in items]
    clock = StepClock(width, out_lens, t0, sync=device.startswith("cuda"))
    kwargs: dict[str, Any] = {}
    if use_adapters:
        kwargs["adapter_names"] = [it.adapter or BASE for it in items]
    with torch.inference_mode():
        model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(out_lens),
            min_new_tokens=max(out_lens),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([clock]),
            **kwargs,
        )
    return clock.times


def run_baseline(cfg: BaselineConfig, trace: list[TraceItem] | None = None) -> dict[str, Any]:
    """Load the model and adapters, replay the trace online, return load_test's result layout."""
    model, tok, device = load_model(cfg)
    if trace is None:
        trace = make_trace(cfg.workload, tok)
    use_adapters = bool(cfg.workload.adapters)
    if cfg.warmup and trace:
        # One short mixed batch so that lazy initialisation is not charged to the first requests.
        warm = [TraceItem(0.0, it.adapter, it.prompt_token_ids[:8], 2) for it in trace[:2]]
        run_batch(model, tok, device, warm, use_adapters, time.perf_counter())

    records: list[RequestRecord | None] = [None] * len(trace)
    bar = tqdm(total=len(trace), desc="requests", unit="req", disable=not cfg.progress)
    t0 = time.perf_counter()
    queue: list[int] = []
    nxt = 0
    while nxt < len(trace) or queue:
        now = time.perf_counter() - t0
        while nxt < len(trace) and trace[nxt].arrival_s <= now:
            queue.append(nxt)
            nxt += 1
        if not queue:
            time.sleep(max(0.0, trace[nxt].arrival_s - now))
            continue
        batch, queue = queue[: cfg.max_batch_size], queue[cfg.max_batch_size :]
        start = time.perf_counter() - t0
        stamps = run_batch(model, tok, device, [trace[i] for i in batch], use_adapters, t0)
        for i in batch:
            it = trace[i]
            times = stamps[: it.output_len]
            records[i] = RequestRecord(
                index=i,
                adapter=it.adapter,
                arrival_s=it.arrival_s,
                start_s=it.arrival_s,  # latencies count from arrival: queueing is included
                prompt_len=len(it.prompt_token_ids),
                requested_tokens=it.output_len,
                token_times=times,
                end_s=times[-1],
                output_tokens=len(times),
            )
        log.debug("batch of %d at %.3f s took %.3f s", len(batch), start, stamps[-1] - start)
        bar.update(len(batch))
    bar.close()
    config = {"kind": "peft", "device": device, "torch_threads": _threads(), **asdict(cfg)}
    return build_result("transformers + PEFT baseline", config, [r for r in records if r], cfg.slo_ttft)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--adapter-dir", default=None, help="directory with one PEFT adapter per subdirectory")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT SLO in seconds")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", default="peft_baseline.json", help="JSON result path ('' for none)")
    p.add_argument("--plot", default=None, help="PNG with latency CDFs and throughput over time")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = BaselineConfig(
        workload=workload_from_args(a),
        adapter_dir=a.adapter_dir,
        dtype=a.dtype,
        device=a.device,
        max_batch_size=a.max_batch_size,
        slo_ttft=a.slo_ttft,
        warmup=a.warmup,
        progress=a.progress,
    )
    result = run_baseline(cfg)
    report(result, a.out or None, a.plot)


if __name__ == "__main__":
    main()
