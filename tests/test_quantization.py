"""Weight-only quantization (--quantization): the quantized matmuls against float32/float64 matmuls
with the same dequantized weights, the tensor-parallel slices against the whole model, and a
mixed base + adapter batch against transformers + peft on the same dequantized weights."""

from __future__ import annotations

import pytest
import torch

from slserve.config import QUANTIZATIONS, EngineConfig
from slserve.kernels.cpu_ext import cpu_ops
from slserve.model.quant import LOOP_ROWS, Q4_GROUP, QUANTIZED_TYPES, Int8Weight, Q4Weight, quantized_matmul
from tests.peft_util import ALL_TARGETS, make_peft_adapter, peft_generate

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def int8_reference(w: torch.Tensor) -> torch.Tensor:
    """The documented int8 scheme, written out in float32: symmetric, one scale per output channel
    (max |row| / 127, 1 for a zero row), codes W / scale rounded half to even and clamped to
    [-127, 127]; returns the dequantized q * scale."""
    w = w.detach().float()
    scale = w.abs().max(dim=1, keepdim=True).values / 127
    scale[scale == 0] = 1
    return torch.round(w / scale).clamp(-127, 127) * scale


def q4_reference(w: torch.Tensor) -> torch.Tensor:
    """The documented q4 scheme, written out in float32: groups of 32 inputs, scale (max - min) / 15
    (1 for a constant group), zero = min, codes (W - zero) / scale rounded half to even and
    clamped to [0, 15]; returns the dequantized code * scale + zero."""
    w = w.detach().float()
    out, inp = w.shape
    g = w.reshape(out, inp // 32, 32)
    lo = g.min(dim=-1, keepdim=True).values
    scale = (g.max(dim=-1, keepdim=True).values - lo) / 15
    scale[scale == 0] = 1
    return (torch.round((g - lo) / scale).clamp(0, 15) * scale + lo).reshape(out, inp)


REFERENCES = {"int8": int8_reference, "q4": q4_reference}
WEIGHT_TYPES = {"int8": Int8Weight, "q4": Q4Weight}


def test_modes_and_refusals():
    assert set(QUANTIZED_TYPES) == set(QUANTIZATIONS)
    assert EngineConfig().quantization is None
    with pytest.raises(ValueError, match="quantization must be one of int8, q4"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="groups of 32 inputs"):
        Q4Weight.quantize(torch.ones(4, 48))


def test_cli_maps_and_refuses(capsys):
    import argparse

    from slserve.cli import _engine_args, engine_config, main

    p = argparse.ArgumentParser()
    _engine_args(p)
    assert engine_config(p.parse_args(["--quantization", "int8"])).quantization == "int8"
    assert engine_config(p.parse_args([])).quantization is None
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--quantization", "fp4"])
    assert exc.value.code == 2
    assert "invalid choice: 'fp4'" in (err := capsys.readouterr().err) and "'int8', 'q4'" in err


def test_quantize_matches_the_documented_scheme():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 100, generator=g) * torch.rand(37, 1, generator=g)
    w[5] = 0  # an all-zero channel keeps scale 1 and codes 0
    qw = Int8Weight.quantize(w)
    assert qw.q.dtype == torch.int8 and qw.scale.dtype == torch.float32
    assert qw.q.abs().max() == 127 and (qw.q[5] == 0).all() and qw.scale[5] == 1
    torch.testing.assert_close(qw.dequantize(), int8_reference(w), rtol=0, atol=0)
    # Per channel: the error of every weight is at most half a step of its row.
    assert ((qw.dequantize() - w).abs() <= qw.scale[:, None] / 2 + 1e-7).all()


def test_q4_quantize_matches_the_documented_scheme():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 96, generator=g)
    w[2, 32:64] = 0.5  # a constant group: scale 1, zero 0.5, codes 0
    qw = Q4Weight.quantize(w)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (6, 48) and qw.scale.shape == (6, 3)
    assert qw.scale[2, 1] == 1 and qw.zero[2, 1] == 0.5
    torch.testing.assert_close(qw.dequantize(), q4_reference(w), rtol=0, atol=0)
    # Each group keeps its minimum and maximum as codes 0 and 15.
    deq = qw.dequantize().view(6, 3, 32)
    torch.testing.assert_close(deq.amin(-1), w.view(6, 3, 32).amin(-1), rtol=0, atol=0)
    torch.testing.assert_close(deq.amax(-1), w.view(6, 3, 32).amax(-1), rtol=1e-6, atol=1e-6)


def test_q4_recovers_the_embedded_gguf_blocks():
    """The embedded model's projections are GGUF Q4_1 blocks of 32 (w = d q + m); q4 finds the
    same codes, scales and zeros again in the cached safetensors, read here from the GGUF itself."""
    import importlib.util
    from pathlib import Path

    gguf = pytest.importorskip("gguf")
    import numpy as np
    from safetensors import safe_open

    from slserve.model.loader import EMBEDDED_GGUF, EMBEDDED_PACKAGE, resolve_model

    package = Path(importlib.util.find_spec(EMBEDDED_PACKAGE).submodule_search_locations[0])
    reader = gguf.GGUFReader(str(package / EMBEDDED_GGUF))
    with safe_open(str(resolve_model(None) / "model.safetensors"), "pt") as f:
        for gguf_name, name in [("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                                ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight")]:
            t = next(t for t in reader.tensors if t.name == gguf_name)
            assert t.tensor_type.name == "Q4_1"
            w = f.get_tensor(name)
            blocks = np.asarray(t.data).reshape(w.shape[0], -1, 20)  # d f16, m f16, 16 bytes of codes
            d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
            m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
            qs = torch.from_numpy(blocks[..., 4:].copy())
            codes = torch.cat([qs & 15, qs >> 4], dim=-1)  # elements 0-15 low nibbles, 16-31 high
            qw = Q4Weight.quantize(w)
            ours = torch.stack([qw.codes & 15, qw.codes >> 4], dim=-1).view(w.shape[0], -1, Q4_GROUP)
            assert torch.equal(ours, codes) and torch.equal(qw.scale, d) and torch.equal(qw.zero, m)
            assert torch.equal(qw.dequantize(), w)


def _cases():
    # (rows, out, in): decode and prefill row counts, the C++ loop's tails (out % 4; in % 8 for
    # int8 alone, below: q4 takes groups of 32),
    # SmolLM2's shapes, and rows past LOOP_ROWS (the dequantize path).
    return [(1, 576, 576), (3, 37, 96), (8, 1536, 576), (17, 576, 1536), (LOOP_ROWS, 64, 160),
            (LOOP_ROWS + 5, 40, 64)]


@pytest.mark.parametrize("rows,out,inp", _cases())
@pytest.mark.parametrize("kernels", ["cpp", "torch"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["int8", "q4"])
def test_matmul_float32_matches_dequantized_reference(rows, out, inp, kernels, bias, mode):
    ops = cpu_ops() if kernels == "cpp" else None
    if kernels == "cpp" and ops is None:
        pytest.skip("C++ CPU helpers not built here")
    g = torch.Generator().manual_seed(rows * 1000 + out)
    w = torch.randn(out, inp, generator=g) * 0.05
    b = torch.randn(out, generator=g) if bias else None
    x = torch.randn(rows, inp, generator=g)
    y = quantized_matmul(WEIGHT_TYPES[mode].quantize(w), b, ops)(x)
    want = x.double() @ REFERENCES[mode](w).double().T + (b.double() if bias else 0)
    assert y.dtype == torch.float32 and y.shape == (rows, out)
    # float32 accumulation in another order: a few units of float32 rounding per sum.
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5 * inp**0.5)


def test_int8_matmul_odd_input_width():
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(37, 100, generator=g), torch.randn(3, 100, generator=g)
    want = x.double() @ int8_reference(w).double().T
    for ops in (cpu_ops(), None):
        y = quantized_matmul(Int8Weight.quantize(w), None, ops)(x)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, LOOP_ROWS + 1])
@pytest.mark.parametrize("mode", ["int8", "q4"])
def test_matmul_16bit_matches_dequantized_reference(dtype, rows, mode):
    """16-bit activations (int8: ATen's int8pack kernel up to LOOP_ROWS rows; q4: rows widened for
    the C++ loop; dequantize past it)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 224, generator=g) * 0.05
    x = torch.randn(rows, 224, generator=g).to(dtype)
    y = quantized_matmul(WEIGHT_TYPES[mode].quantize(w), None, cpu_ops())(x)
    assert y.dtype == dtype
    want = x.double() @ REFERENCES[mode](w).double().T
    # The output is rounded to the 16-bit type; the scale may be too (ATen takes it in x's dtype).
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), want, rtol=2 * eps, atol=4 * eps)


@pytest.mark.parametrize("mode", ["int8", "q4"])
def test_tensor_parallel_slices_dequantize_to_the_whole_model(mode):
    """Each rank quantizes its slice as it reads it; column-parallel slices keep their rows'
    scales, int8 row-parallel slices (o, down) take the scales of the whole rows, q4 groups lie
    inside one rank's columns: the ranks' dequantized slices put together are the one-rank model
    exactly."""
    from slserve.model.loader import load_model_config, load_state_dict, resolve_model
    from slserve.parallel import Shard, base_weight_slice

    path = resolve_model(None)
    cfg = load_model_config(path)
    whole = load_state_dict(path, torch.float32, quantization=mode)
    shards = [load_state_dict(path, torch.float32, cfg, Shard(r, 3), mode) for r in range(3)]
    for layer in (0, cfg.num_layers - 1):
        for name in PROJECTIONS:
            key = f"model.layers.{layer}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}.weight"
            dim, _ = base_weight_slice(key, cfg, Shard(0, 3))
            joined = torch.cat([s[key].dequantize() for s in shards], dim=dim)
            assert torch.equal(joined, whole[key].dequantize()), key
            assert all(isinstance(s[key], WEIGHT_TYPES[mode]) for s in shards)
    assert shards[0]["model.norm.weight"].dtype == torch.float32  # everything else as it was


MAX_TOKENS = 8
ADAPTERS = [("r8-all", 8, ALL_TARGETS), ("r32-mlp", 32, ["gate_proj", "up_proj", "down_proj"])]
# The first prompt's greedy tokens from the float32 and the int8 weights part at the third token.
PROMPTS = ["The quick brown fox", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from slserve.model.loader import resolve_model

    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()
    src = tmp_path_factory.mktemp("peft")
    return {name: make_peft_adapter(base, src / name, r, t, seed=i)
            for i, (name, r, t) in enumerate(ADAPTERS)}


@pytest.mark.parametrize("mode", ["int8", "q4"])
def test_mixed_batch_matches_peft_on_dequantized_weights(mode, adapters, tmp_path):
    """A mixed batch of base and adapter requests on the quantized model gives transformers +
    peft's greedy tokens when transformers runs in float32 on the same dequantized weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slserve import LLM, SamplingParams
    from slserve.model.loader import resolve_model

    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    work = [(p, a) for p in PROMPTS for a in [None, *adapters]]
    if mode == "int8":
        float_tokens = peft_generate(base, None, tok.encode(PROMPTS[0]), MAX_TOKENS)
    changed = 0
    with torch.no_grad():
        for name, module in base.named_modules():
            if name.split(".")[-1] in PROJECTIONS:
                deq = REFERENCES[mode](module.weight)
                changed += not torch.equal(deq, module.weight)
                module.weight.copy_(deq)
    expected = [peft_generate(base, adapters[a] if a else None, tok.encode(p), MAX_TOKENS) for p, a in work]
    if mode == "int8":
        # Served unquantized, the first base request would differ: equality tells the two apart.
        assert expected[0] != float_tokens
    else:
        # q4 finds the embedded model's own Q4_1 blocks: its dequantized weights are the float ones.
        assert changed == 0

    llm = LLM(dtype="float32", quantization=mode, pool_bytes=256 << 20, adapter_dir=str(tmp_path / "store"))
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    outs = llm.generate([p for p, _ in work], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        adapters=[a for _, a in work])
    for (prompt, adapter), out, ref in zip(work, outs, expected, strict=True):
        assert out.token_ids == ref, f"adapter {adapter} on {prompt!r}"
    base_out = {p: ref for (p, a), ref in zip(work, expected, strict=True) if a is None}
    assert sum(ref != base_out[p] for (p, a), ref in zip(work, expected, strict=True) if a) >= 2
