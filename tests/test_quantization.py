"""Weight-only quantization (--quantization): the quantized matmuls against float32/float64 matmuls
with the same dequantized weights, the tensor-parallel slices against the whole model, and a
mixed base + adapter batch against transformers + peft on the same dequantized weights."""

from __future__ import annotations

import pytest
import torch

from slserve.config import QUANTIZATIONS, EngineConfig
from slserve.kernels.cpu_ext import cpu_ops
from slserve.model.quant import LOOP_ROWS, QUANTIZED_TYPES, Int8Weight, quantized_matmul
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


def test_modes_and_refusals():
    assert set(QUANTIZED_TYPES) == set(QUANTIZATIONS)
    assert EngineConfig().quantization is None
    with pytest.raises(ValueError, match="quantization must be one of int8"):
        EngineConfig(quantization="int4")


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
    assert "invalid choice: 'fp4'" in (err := capsys.readouterr().err) and "'int8'" in err


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


def _cases():
    # (rows, out, in): decode and prefill row counts, the C++ loop's tails (out % 4, in % 8),
    # SmolLM2's shapes, and rows past LOOP_ROWS (the dequantize path).
    return [(1, 576, 576), (3, 37, 100), (8, 1536, 576), (17, 576, 1536), (LOOP_ROWS, 64, 72),
            (LOOP_ROWS + 5, 40, 64)]


@pytest.mark.parametrize("rows,out,inp", _cases())
@pytest.mark.parametrize("kernels", ["cpp", "torch"])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_matmul_float32_matches_dequantized_reference(rows, out, inp, kernels, bias):
    ops = cpu_ops() if kernels == "cpp" else None
    if kernels == "cpp" and ops is None:
        pytest.skip("C++ CPU helpers not built here")
    g = torch.Generator().manual_seed(rows * 1000 + out)
    w = torch.randn(out, inp, generator=g) * 0.05
    b = torch.randn(out, generator=g) if bias else None
    x = torch.randn(rows, inp, generator=g)
    y = quantized_matmul(Int8Weight.quantize(w), b, ops)(x)
    want = x.double() @ int8_reference(w).double().T + (b.double() if bias else 0)
    assert y.dtype == torch.float32 and y.shape == (rows, out)
    # float32 accumulation in another order: a few units of float32 rounding per sum.
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5 * inp**0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, LOOP_ROWS + 1])
def test_int8_matmul_16bit_matches_dequantized_reference(dtype, rows):
    """16-bit activations (ATen's int8pack kernel up to LOOP_ROWS rows, dequantize past it)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 200, generator=g) * 0.05
    x = torch.randn(rows, 200, generator=g).to(dtype)
    y = quantized_matmul(Int8Weight.quantize(w), None, cpu_ops())(x)
    assert y.dtype == dtype
    want = x.double() @ int8_reference(w).double().T
    # The output is rounded to the 16-bit type; the scale may be too (ATen takes it in x's dtype).
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), want, rtol=2 * eps, atol=4 * eps)


def test_tensor_parallel_slices_dequantize_to_the_whole_model():
    """Each rank quantizes its slice as it reads it; column-parallel slices keep their rows'
    scales, and row-parallel slices (o, down) take the scales of the whole rows: the ranks'
    dequantized slices put together are the one-rank model exactly."""
    from slserve.model.loader import load_model_config, load_state_dict, resolve_model
    from slserve.parallel import Shard, base_weight_slice

    path = resolve_model(None)
    cfg = load_model_config(path)
    whole = load_state_dict(path, torch.float32, quantization="int8")
    shards = [load_state_dict(path, torch.float32, cfg, Shard(r, 3), "int8") for r in range(3)]
    for layer in (0, cfg.num_layers - 1):
        for name in PROJECTIONS:
            key = f"model.layers.{layer}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}.weight"
            dim, _ = base_weight_slice(key, cfg, Shard(0, 3))
            joined = torch.cat([s[key].dequantize() for s in shards], dim=dim)
            assert torch.equal(joined, whole[key].dequantize()), key
            assert all(s[key].q.dtype == torch.int8 for s in shards)
    assert shards[0]["model.norm.weight"].dtype == torch.float32  # everything else as it was


MAX_TOKENS = 12
ADAPTERS = [("r8-all", 8, ALL_TARGETS), ("r32-mlp", 32, ["gate_proj", "up_proj", "down_proj"])]
# Prompts whose greedy tokens from the float32 and the int8 weights part within MAX_TOKENS.
PROMPTS = ["The quick brown fox", "In a distant galaxy, the crew of the starship"]


def test_int8_mixed_batch_matches_peft_on_dequantized_weights(tmp_path):
    """A mixed batch of base and adapter requests on the int8 model gives transformers + peft's
    greedy tokens when transformers runs in float32 on the same dequantized weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slserve import LLM, SamplingParams
    from slserve.model.loader import resolve_model

    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()
    paths = {name: make_peft_adapter(base, tmp_path / name, r, t, seed=i)
             for i, (name, r, t) in enumerate(ADAPTERS)}
    tok = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    float_tokens = [peft_generate(base, None, tok.encode(p), MAX_TOKENS) for p in PROMPTS]
    with torch.no_grad():
        for name, module in base.named_modules():
            if name.split(".")[-1] in PROJECTIONS:
                module.weight.copy_(int8_reference(module.weight))
    work = [(p, a) for p in PROMPTS for a in [None, *paths]]
    expected = [peft_generate(base, paths[a] if a else None, tok.encode(p), MAX_TOKENS) for p, a in work]
    # Served unquantized, the base requests would differ: token equality tells the two apart.
    assert [e for (_, a), e in zip(work, expected, strict=True) if a is None] != float_tokens

    llm = LLM(dtype="float32", quantization="int8", pool_bytes=256 << 20,
              adapter_dir=str(tmp_path / "store"))
    for name, path in paths.items():
        llm.add_adapter(name, path)
    outs = llm.generate([p for p, _ in work], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        adapters=[a for _, a in work])
    for (prompt, adapter), out, ref in zip(work, outs, expected, strict=True):
        assert out.token_ids == ref, f"adapter {adapter} on {prompt!r}"
    base_out = {p: ref for (p, a), ref in zip(work, expected, strict=True) if a is None}
    assert sum(ref != base_out[p] for (p, a), ref in zip(work, expected, strict=True) if a) >= 3
