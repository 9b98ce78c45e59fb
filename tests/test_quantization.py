"""Quantization (--quantization): the weight-only matmuls against float32/float64 matmuls with the
same dequantized weights, w8a8 against integer arithmetic on the documented codes, the
tensor-parallel slices against the whole model, and a mixed base + adapter batch against
transformers + peft on the same dequantized weights (w8a8: with the base projections' inputs
rounded as documented)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slserve.config import QUANTIZATIONS, EngineConfig
from slserve.kernels.cpu_ext import cpu_ops
from slserve.model.quant import (
    LOOP_ROWS,
    Q4_GROUP,
    QUANTIZED_TYPES,
    W8A8_COLUMN_BLOCK,
    Int8Weight,
    Q4Weight,
    W8A8Weight,
    head_copy_key,
    quantize_rows,
    quantized_matmul,
    quantizes_head,
)
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


def w8a8_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented w8a8 activation scheme, written out row by row: inv = 127 / max |row| and
    scale = max |row| / 127 in float64, each rounded to float32 (a zero row: codes 0, scale 1);
    codes round_half_even(x * inv) in float32, clamped to [-127, 127]."""
    codes, scales = [], []
    for row in x.float():
        amax = float(row.abs().max())
        inv = torch.tensor(127 / amax if amax else 0.0, dtype=torch.float32)
        scales.append(torch.tensor(amax / 127 if amax else 1.0, dtype=torch.float32))
        codes.append(torch.round(row * inv).clamp(-127, 127).to(torch.int8))
    return torch.stack(codes), torch.stack(scales)


REFERENCES = {"int8": int8_reference, "q4": q4_reference, "w8a8": int8_reference}
# The projections each mode quantizes: w8a8 leaves down_proj (whose inputs hold the massive
# activations) in the serving dtype.
MODE_PROJECTIONS = {"int8": PROJECTIONS, "q4": PROJECTIONS, "w8a8": PROJECTIONS[:-1]}
WEIGHT_TYPES = {"int8": Int8Weight, "q4": Q4Weight, "w8a8": W8A8Weight}


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_rows_match_the_documented_scheme(dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(40, 100, generator=g) * torch.rand(40, 1, generator=g) * 10).to(dtype)
    x[3] = 0  # a zero row: scale 1, codes 0
    x[7, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])  # inv = 1 exactly: ties round half to even
    x[7, 4:] = 0
    want_q, want_s = w8a8_rows_reference(x)
    assert want_q[7, :4].tolist() == [127, 2, -4, 0] and want_s[3] == 1 and (want_q[3] == 0).all()
    ops = cpu_ops()
    assert ops is not None, "the C++ helpers must build on this machine"
    cpp_q, cpp_s = torch.empty(x.shape, dtype=torch.int8), torch.empty(40)
    ops.quantize_rows(cpp_q, cpp_s, x)
    for xq, sx in [quantize_rows(x), (cpp_q, cpp_s)]:
        assert torch.equal(xq, want_q) and torch.equal(sx, want_s)


def _w8a8_cases():
    # decode and prefill row counts, vector tails (in % 16), SmolLM2's shapes, and outputs over
    # one column block (the lm_head's vocabulary rows run block by block)
    return [(1, 576, 576), (3, 37, 100), (17, 576, 1536), (256, 960, 576), (300, 64, 40),
            (5, W8A8_COLUMN_BLOCK * 2 + 100, 64), (1, W8A8_COLUMN_BLOCK + 1, 32)]


@pytest.mark.parametrize("rows,out,inp", _w8a8_cases())
@pytest.mark.parametrize("kernels", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_matmul_is_exact_integer_arithmetic(rows, out, inp, kernels, dtype):
    """y = float32(sum_k xq q) * (sx * scale), rounded once to the output dtype: the int32 sums are
    exact, so the kernel equals an int64 matmul of the documented codes bit for bit."""
    ops = cpu_ops() if kernels == "cpp" else None
    assert kernels == "torch" or ops is not None, "the C++ helpers must build on this machine"
    g = torch.Generator().manual_seed(rows * 1000 + out)
    w = torch.randn(out, inp, generator=g) * 0.05
    b = torch.randn(out, generator=g).to(dtype)
    x = torch.randn(rows, inp, generator=g).to(dtype)
    qw = W8A8Weight.quantize(w)
    xq, sx = w8a8_rows_reference(x)
    acc = xq.long() @ qw.q.long().T
    want = (acc.float() * (sx[:, None] * qw.scale[None, :])).to(dtype)
    assert torch.equal(quantized_matmul(qw, None, ops)(x), want)
    assert torch.equal(quantized_matmul(qw, b, ops)(x), want + b)
    # ... and it is the float matmul to within the activations' rounding (half a step a row).
    err = (want.double() - x.double() @ int8_reference(w).double().T).abs()
    assert (err <= (sx.double()[:, None] / 2) * qw.dequantize().double().abs().sum(1)[None, :] + 0.02).all()


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
    assert kernels == "torch" or ops is not None, "the C++ helpers must build on this machine"
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


@pytest.mark.parametrize("mode", ["int8", "q4", "w8a8"])
def test_tensor_parallel_slices_dequantize_to_the_whole_model(mode):
    """Each rank quantizes its slice as it reads it; column-parallel slices keep their rows'
    scales, int8 row-parallel slices (o, down; w8a8's o) take the scales of the whole rows, q4 groups lie
    inside one rank's columns: the ranks' dequantized slices put together are the one-rank model
    exactly. A quantized lm_head (w8a8) splits by vocabulary rows, each with its own scale."""
    from slserve.model.loader import load_model_config, load_state_dict, resolve_model
    from slserve.parallel import Shard, base_weight_slice

    path = resolve_model(None)
    cfg = load_model_config(path)
    whole = load_state_dict(path, torch.float32, quantization=mode)
    shards = [load_state_dict(path, torch.float32, cfg, Shard(r, 3), mode) for r in range(3)]
    for layer in (0, cfg.num_layers - 1):
        for name in PROJECTIONS:
            key = f"model.layers.{layer}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}.weight"
            if name not in MODE_PROJECTIONS[mode]:
                assert all(isinstance(s[key], torch.Tensor) for s in shards) and torch.is_tensor(whole[key])
                continue
            dim, _ = base_weight_slice(key, cfg, Shard(0, 3))
            joined = torch.cat([s[key].dequantize() for s in shards], dim=dim)
            assert torch.equal(joined, whole[key].dequantize()), key
            assert all(isinstance(s[key], WEIGHT_TYPES[mode]) for s in shards)
    assert shards[0]["model.norm.weight"].dtype == torch.float32  # everything else as it was
    head = head_copy_key("model.embed_tokens.weight")  # SmolLM2's lm_head is its tied embedding
    if not quantizes_head(mode):
        assert head not in whole and all(head not in s for s in shards)
        return
    # Vocabulary rows, each quantized alone: the ranks' slices are the whole head's rows.
    joined = torch.cat([s[head].dequantize() for s in shards])
    assert torch.equal(joined, whole[head].dequantize()) and isinstance(whole[head], W8A8Weight)
    assert torch.equal(whole[head].dequantize(), int8_reference(whole["model.embed_tokens.weight"]))


@pytest.mark.parametrize("tie", [False, True])
def test_w8a8_head_is_the_models_own_head(tie, tmp_path):
    """Under w8a8 the logits come from the int8 copy of the model's head: its lm_head weight when
    untied, its embedding when tied, multiplied exactly as the documented scheme says."""
    from safetensors.torch import load_file

    from slserve import LLM
    from tests.tiny_llama import write_tiny_llama

    path = write_tiny_llama(tmp_path, tie=tie)
    weights = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    llm = LLM(model=str(path), dtype="float32", quantization="w8a8", pool_bytes=64 << 20)
    head = W8A8Weight.quantize(weights["model.embed_tokens.weight" if tie else "lm_head.weight"])
    h = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    xq, sx = w8a8_rows_reference(h)
    want = (xq.long() @ head.q.long().T).float() * (sx[:, None] * head.scale[None, :])
    assert torch.equal(llm.engine.runner.model._lm_head(h), want)


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


def round_inputs_as_w8a8(module, args):
    """Forward pre-hook of a base projection: its input rows as w8a8 rounds them (codes * scale)."""
    (x,) = args
    xq, sx = w8a8_rows_reference(x.reshape(-1, x.shape[-1]))
    return ((xq.float() * sx[:, None]).reshape(x.shape),)


def test_w8a8_mixed_batch_matches_the_documented_model_on_average(adapters, tmp_path):
    """w8a8 served in a mixed batch against transformers + peft in float32 with the same int8
    weights and each quantized projection's input rounded as documented, the lm_head's included
    (the LoRA paths read the unrounded input, as slserve's do).

    Token-for-token equality cannot be asked of this mode: rounding activations is discontinuous,
    and the ~1e-4 differences between two correct float32 implementations of the same layers move
    some values across a rounding boundary, so single log-probabilities differ between the two by
    about as much as w8a8 differs from weight-only int8 (~0.15 on average). What must agree is
    the model: the mean log-likelihood of a text (320 tokens, over which those differences
    average out to well under the bound: 0.1-0.6% here), per request, within 1.2%; and each
    adapter, which moves it by 4% or more (over 3x that bound), must move it as much as it moves
    the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slserve import LLM, SamplingParams
    from slserve.model.loader import resolve_model
    from tests.peft_util import peft_logprobs

    path = str(resolve_model(None))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.encode((Path(__file__).parents[1] / "benchmarks" / "quant_text.txt").read_text())[:320]
    with torch.no_grad():
        for name, module in base.named_modules():
            if name.split(".")[-1] in MODE_PROJECTIONS["w8a8"]:  # peft keeps these as its base layers
                module.weight.copy_(int8_reference(module.weight))
                module.register_forward_pre_hook(round_inputs_as_w8a8)
        # The lm_head too (quantized from the tied embedding, which itself stays as it is).
        base.lm_head.weight = torch.nn.Parameter(int8_reference(base.lm_head.weight), requires_grad=False)
        base.lm_head.register_forward_pre_hook(round_inputs_as_w8a8)
    assert not torch.equal(base.lm_head.weight, base.model.embed_tokens.weight)
    names = [None, *adapters]
    want = {a: -peft_logprobs(base, adapters[a] if a else None, ids).mean().item() for a in names}

    llm = LLM(dtype="float32", quantization="w8a8", pool_bytes=256 << 20, adapter_dir=str(tmp_path / "store"))
    for name, adapter_path in adapters.items():
        llm.add_adapter(name, adapter_path)
    outs = llm.generate([ids] * len(names), SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                        adapters=names)
    got = {a: -sum(lp.logprob for lp in out.prompt_logprobs[1:]) / (len(ids) - 1)
           for a, out in zip(names, outs, strict=True)}
    print('DBG', got, want)
    for a in names:
        assert abs(got[a] - want[a]) < 0.012 * want[a], (a, got[a], want[a])
        if a is not None:  # the adapter's own effect, several times the tolerance
            assert abs(want[a] - want[None]) > 0.04 * want[None]
            assert (got[a] - got[None]) * (want[a] - want[None]) > 0
            assert abs((got[a] - got[None]) - (want[a] - want[None])) < 0.3 * abs(want[a] - want[None])
