"""The portable CPU path: the C++ helpers are keyed to the CPU they were built for, a baseline
build (no AVX2, no AVX512, no AVX512-BF16) gives the same results as the torch references, and
without a compiler the engine serves correct greedy output on the pure torch path.

Each check runs in a subprocess: the helpers register one torch op namespace per process, and a
machine without a compiler is a process whose build fails, not a patched function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slserve.kernels import cpu_ext

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "x86-64-v2"  # SSE4.2: what any x86-64 server of the last 15 years runs
x86_only = pytest.mark.skipif(not cpu_ext.cpu_isa().startswith(("x86_64", "AMD64")),
                              reason="the baseline target is an x86-64 level")


def _run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_extension_name_is_keyed_to_flags_and_cpu(monkeypatch):
    native = cpu_ext.build_flags("native")
    name = cpu_ext.extension_name(native)
    assert name != cpu_ext.extension_name(cpu_ext.build_flags(BASELINE))
    # Another CPU (here: one more ISA flag, as an AVX512-BF16 machine has) gets another name for
    # the native build; an explicit target builds the same code anywhere, so its name stays.
    baseline = cpu_ext.extension_name(cpu_ext.build_flags(BASELINE))
    monkeypatch.setattr(cpu_ext, "cpu_isa", lambda: "x86_64 AVX512 avx512_bf16 avx512f")
    assert cpu_ext.extension_name(native) != name
    assert cpu_ext.extension_name(cpu_ext.build_flags(BASELINE)) == baseline


@pytest.fixture(scope="session")
def baseline_ext_dir(tmp_path_factory) -> Path:
    """A build cache of its own for this session, so the baseline build never meets the native one."""
    return tmp_path_factory.mktemp("torch_ext_baseline")


@x86_only
def test_baseline_build_matches_the_torch_references(baseline_ext_dir):
    """The existing C++ tests (lora_apply, decode attention, fused ops, their references and
    tolerances) pass against helpers built for x86-64-v2: the code a CPU without AVX512-BF16 runs."""
    env = {"SLSERVE_CPU_MARCH": BASELINE, "TORCH_EXTENSIONS_DIR": str(baseline_ext_dir),
           "OMP_NUM_THREADS": "1"}
    tests = ["tests/test_lora_cpu.py", "tests/test_attention_cpu.py", "tests/test_fused_cpu.py"]
    r = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # It ran the baseline build (not a cached native one), and that build holds no AVX2/AVX512 code.
    name = cpu_ext.extension_name(cpu_ext.build_flags(BASELINE))
    libs = list((baseline_ext_dir / name).glob("*.so"))
    assert libs, sorted(p.name for p in baseline_ext_dir.iterdir())
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(libs[0])], capture_output=True,
                         text=True, check=True).stdout
    assert "%ymm" not in asm and "%zmm" not in asm and "vdpbf16ps" not in asm


def _hf_greedy(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    from slserve.model.loader import resolve_model

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            outs.append(gen[0, len(ids):].tolist())
    return outs


# Runs in a process whose build cannot work; prints which path the engine took and its tokens.
_ENGINE_SCRIPT = """
import json, sys
from slserve import LLM, SamplingParams
from slserve.kernels.cpu_ext import cpu_ops
prompts, max_tokens, adapter_dir = json.loads(sys.argv[1])
llm = LLM(dtype="float32", pool_bytes=64 << 20, adapter_dir=adapter_dir)
engine = llm.engine
outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
runner = engine.runner
print(json.dumps({"cpu_ops": cpu_ops() is not None, "lora_op": runner.backend.lora_op is not None,
                  "layer_ops": type(runner.model.ops).__name__,
                  "tokens": [o.token_ids for o in outs]}))
"""


@pytest.mark.parametrize("how", [{"CXX": "/nonexistent/c++"}, {"SLSERVE_NO_CPU_EXT": "1"}],
                         ids=["no-compiler", "disabled"])
def test_engine_without_the_helpers_matches_transformers(how, tmp_path):
    from transformers import AutoTokenizer

    from slserve.model.loader import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    text = "The history of the printing press begins in the fifteenth century, when movable type changed "
    prompts = [tok.encode("Hello")[:1], tok.encode("Hello, my name is"), tok.encode(text * 3)]
    max_tokens = 12
    # An empty build cache: a cached helper from an earlier run must not hide the missing compiler.
    env = {**how, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "OMP_NUM_THREADS": "1"}
    r = _run(["-c", _ENGINE_SCRIPT, json.dumps([prompts, max_tokens, str(tmp_path / "adapters")])], env)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["cpu_ops"] is False and got["lora_op"] is False and got["layer_ops"] == "TorchOps"
    assert got["tokens"] == _hf_greedy(prompts, max_tokens)


def test_bfloat16_matmul_runs_on_any_cpu():
    """oneDNN's packed bfloat16 weights need AVX512 (BW/VL/DQ) or AVX-NE-CONVERT; on an AVX2 CPU
    packing raised and a bfloat16 server could not start. dense() must work on every CPU."""
    from slserve.model.layers import dense

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(5, 64, generator=g).bfloat16()
    want = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(dense(w, b)(x).double(), want, atol=0.1, rtol=2e-2)


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_the_cpu(monkeypatch, native):
    """The default dtype is bfloat16 only where the CPU computes it natively: on an AVX2-only CPU
    an emulated bfloat16 matmul is several times slower than float32. GPUs always get bfloat16,
    and an explicit dtype is kept as given."""
    from slserve import config

    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: native)
    assert config.EngineConfig().dtype == ("bfloat16" if native else "float32")
    assert config.EngineConfig(device="cuda").dtype == "bfloat16"
    assert config.EngineConfig(dtype="bfloat16").dtype == "bfloat16"
    assert config.EngineConfig(dtype="float32").torch_dtype is torch.float32
