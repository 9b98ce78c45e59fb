"""Write N random LoRA adapters for the served base model in PEFT's on-disk format, and optionally
upload them to a running server (POST /v1/adapters).

Layout: OUT/<name>/adapter_config.json + adapter_model.safetensors, with names PREFIX0000,
PREFIX0001, ... (the names load_test.py's --adapters PREFIX/N expects), plus OUT/manifest.json.
Ranks are drawn uniformly from --ranks; lora_A is PEFT's default init (uniform in +-1/sqrt(fan_in))
and lora_B is N(0, --b-std), so every adapter changes the model's output.

Speed: PEFT builds one template per rank (on the meta device, from config.json alone) to get the
exact tensor names, shapes and adapter_config.json; each adapter then costs only its random
numbers and one safetensors write, spread over --workers processes. tests/test_load_test.py checks
that `PeftModel.from_pretrained` loads the result.

    python benchmarks/make_adapters.py --model /path/to/base -n 2000 --ranks 8,16,32,64 --out adapters/
    python benchmarks/make_adapters.py -n 100 --out adapters/ --upload http://127.0.0.1:8000 --api-key KEY
    python benchmarks/make_adapters.py -n 100 --out adapters/ --upload http://127.0.0.1:8000 --upload-only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from load_test import adapter_names, resolve_model_path
from tqdm import tqdm

log = logging.getLogger("make_adapters")

SHORT_TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
DTYPES = ("float32", "bfloat16", "float16")


def parse_targets(spec: str) -> tuple[str, ...]:
    """'q,k,v' -> ('q_proj', 'k_proj', 'v_proj'); full module names pass through."""
    return tuple(SHORT_TARGETS.get(s.strip(), s.strip()) for s in spec.split(",") if s.strip())


@dataclass(frozen=True)
class AdapterSetConfig:
    num: int
    out: str
    model: str | None = None
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    targets: tuple[str, ...] = tuple(SHORT_TARGETS.values())
    prefix: str = "lora-"
    lora_alpha: float = 16.0
    b_std: float = 0.02
    dtype: str = "bfloat16"
    seed: int = 0
    workers: int = 0  # 0: one per CPU core
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.num < 1:
            raise ValueError("num must be >= 1")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError("ranks must be positive")
        if not self.targets:
            raise ValueError("targets must not be empty")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}")
        if self.b_std <= 0:
            raise ValueError("b_std must be positive (a zero lora_B makes the adapter a no-op)")


@dataclass(frozen=True)
class Template:
    """What PEFT would write for one rank: the config JSON and (name, shape) of every tensor."""

    rank: int
    config: dict[str, Any]
    tensors: tuple[tuple[str, tuple[int, ...]], ...]


def build_templates(cfg: AdapterSetConfig, model_path: Path, base_name: str) -> dict[int, Template]:
    """One PEFT model per rank, on the meta device, so no base weights are read."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(str(model_path))
    templates = {}
    for rank in sorted(set(cfg.ranks)):
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(hf_config)
        lcfg = LoraConfig(
            r=rank,
            lora_alpha=cfg.lora_alpha,
            target_modules=list(cfg.targets),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_name,
        )
        peft_model = get_peft_model(base, lcfg)
        state = get_peft_model_state_dict(peft_model)
        lcfg = peft_model.peft_config["default"]
        lcfg.inference_mode = True  # as PeftModel.save_pretrained writes it
        with tempfile.TemporaryDirectory() as tmp:
            lcfg.save_pretrained(tmp)
            config = json.loads((Path(tmp) / "adapter_config.json").read_text())
        templates[rank] = Template(rank, config, tuple((k, tuple(v.shape)) for k, v in state.items()))
    return templates


def write_adapter(path: str, template: Template, seed: int, b_std: float, dtype: str) -> int:
    """Write one adapter; returns its size in bytes. Runs in a worker process."""
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    tensors = {}
    for name, shape in template.tensors:
        t = torch.empty(shape, dtype=dt)
        if ".lora_A." in name:
            bound = shape[1] ** -0.5  # lora_A: [r, in]
            tensors[name] = t.uniform_(-bound, bound, generator=g)
        else:
            tensors[name] = t.normal_(0.0, b_std, generator=g)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(template.config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def make_adapters(cfg: AdapterSetConfig) -> dict[str, Any]:
    """Write the adapter set and its manifest; returns the manifest."""
    model_path = resolve_model_path(cfg.model)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    names = adapter_names(cfg.prefix, cfg.num)
    rng = random.Random(cfg.seed)
    ranks = [rng.choice(cfg.ranks) for _ in names]
    templates = build_templates(cfg, model_path, cfg.model or str(model_path))
    jobs = []
    for i, (name, rank) in enumerate(zip(names, ranks, strict=True)):
        if not cfg.overwrite and (root / name / "adapter_model.safetensors").exists():
            continue
        # The per-adapter seed depends only on (seed, index): the set does not depend on --workers.
        jobs.append((str(root / name), templates[rank], cfg.seed * 1_000_003 + i, cfg.b_std, cfg.dtype))
    workers = cfg.workers or os.cpu_count() or 1
    t = time.perf_counter()
    nbytes = 0
    if len(jobs) == 1 or workers == 1:
        for job in tqdm(jobs, desc="adapters", unit="adapter"):
            nbytes += write_adapter(*job)
    elif jobs:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = [pool.submit(write_adapter, *job) for job in jobs]
            for f in tqdm(futures, desc="adapters", unit="adapter"):
                nbytes += f.result()
    elapsed = time.perf_counter() - t
    manifest = {
        "config": asdict(cfg),
        "base_model": str(model_path),
        "written": len(jobs),
        "skipped_existing": cfg.num - len(jobs),
        "seconds": elapsed,
        "bytes_written": nbytes,
        "adapters": {
            n: {"rank": r, "target_modules": list(cfg.targets)} for n, r in zip(names, ranks, strict=True)
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


async def upload_adapters(
    base_url: str,
    root: str | Path,
    names: list[str],
    api_key: str | None = None,
    concurrency: int = 4,
    timeout: float = 600.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    """POST every adapter to {base_url}/v1/adapters as a multipart form (name, config, weights).

    Returns {"status": {status: count}, "failed": {name: detail}}; status is the HTTP code or an
    exception name.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    status: Counter[str] = Counter()
    failed: dict[str, str] = {}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout, transport=transport
    ) as client:
        bar = tqdm(total=len(names), desc="upload", unit="adapter")

        async def one(name: str) -> None:
            d = Path(root) / name
            async with sem:
                files = {
                    "config": (
                        "adapter_config.json",
                        (d / "adapter_config.json").read_bytes(),
                        "application/json",
                    ),
                    "weights": (
                        "adapter_model.safetensors",
                        (d / "adapter_model.safetensors").read_bytes(),
                        "application/octet-stream",
                    ),
                }
                try:
                    resp = await client.post("/v1/adapters", data={"name": name}, files=files)
                    key = str(resp.status_code)
                    if resp.status_code >= 300:
                        failed[name] = resp.text[:300]
                except httpx.HTTPError as e:
                    key = type(e).__name__
                    failed[name] = repr(e)
            status[key] += 1
            bar.update(1)

        await asyncio.gather(*(one(n) for n in names))
        bar.close()
    return {"status": dict(sorted(status.items())), "failed": failed}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num", type=int, required=True, help="number of adapters")
    p.add_argument("--out", required=True, help="directory; one subdirectory per adapter")
    p.add_argument("--model", default=None, help="base model directory (default: resolve_model(None))")
    p.add_argument("--ranks", default="8,16,32,64", help="ranks to draw from, comma separated")
    p.add_argument("--targets", default="q,k,v,o,gate,up,down", help="target modules (short or full names)")
    p.add_argument("--prefix", default="lora-")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--b-std", type=float, default=0.02, help="std of the random lora_B entries")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="writer processes (0: one per core)")
    p.add_argument("--overwrite", action="store_true", help="rewrite adapters that already exist")
    p.add_argument(
        "--upload", metavar="BASE_URL", default=None, help="POST each adapter to BASE_URL/v1/adapters"
    )
    p.add_argument(
        "--upload-only", action="store_true", help="upload the existing OUT/<name> dirs; write nothing"
    )
    p.add_argument("--upload-concurrency", type=int, default=4)
    p.add_argument("--api-key", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = AdapterSetConfig(
        num=a.num,
        out=a.out,
        model=a.model,
        ranks=tuple(int(r) for r in a.ranks.split(",")),
        targets=parse_targets(a.targets),
        prefix=a.prefix,
        lora_alpha=a.lora_alpha,
        b_std=a.b_std,
        dtype=a.dtype,
        seed=a.seed,
        workers=a.workers,
        overwrite=a.overwrite,
    )
    names = adapter_names(cfg.prefix, cfg.num)
    if not a.upload_only:
        m = make_adapters(cfg)
        counts = Counter(v["rank"] for v in m["adapters"].values())
        print("| rank | adapters |\n|---:|---:|")
        for r in sorted(counts):
            print(f"| {r} | {counts[r]} |")
        print(
            f"\nwrote {m['written']} adapters ({m['bytes_written'] / 2**20:.0f} MiB) to {cfg.out} "
            f"in {m['seconds']:.1f} s, kept {m['skipped_existing']} existing (--overwrite rewrites them); "
            f"manifest: {Path(cfg.out) / 'manifest.json'}"
        )
    if a.upload:
        res = asyncio.run(upload_adapters(a.upload, cfg.out, names, a.api_key, a.upload_concurrency))
        print(f"upload: {res['status']}")
        for name, detail in list(res["failed"].items())[:10]:
            print(f"  {name}: {detail}")
        (Path(cfg.out) / "upload.json").write_text(json.dumps(res, indent=1))
        if res["failed"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
