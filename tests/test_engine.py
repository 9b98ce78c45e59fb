"""End-to-end engine checks against an independent implementation: Hugging Face transformers."""

from __future__ import annotations

import pytest
import torch

from slserve import LLM, SamplingParams
from slserve.model.loader import resolve_model

MAX_TOKENS = 24


def _prompts(tokenizer) -> list[list[int]]:
    """Eight prompts from 1 to ~300 tokens."""
    text = (
        "The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made and read across Europe. "
    )
    long_ids = tokenizer.encode(text * 12)
    lengths = [1, 5, 17, 40, 77, 130, 210, 300]
    prompts = [long_ids[:n] for n in lengths[1:]]
    return [[tokenizer.encode("Hello")[0]]] + prompts


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(hf_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    prompts = _prompts(tokenizer)
    outs = []
    with torch.no_grad():
        for ids in prompts:
            gen = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
            outs.append(gen[0, len(ids):].tolist())
    return prompts, outs


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(dtype="float32", pool_bytes=256 << 20, adapter_dir=str(tmp_path_factory.mktemp("a")))


def _idle(llm: LLM) -> None:
    stats = llm.stats()
    pool = stats["pool"]
    assert pool["pages_kv"] == 0
    assert pool["pages_free"] + pool["pages_adapter"] + pool["pages_prefix"] == pool["pages_total"]
    assert stats["prefix_cache"]["idle_pages"] == pool["pages_prefix"]  # kept for reuse, used by none


def test_greedy_matches_transformers(llm, reference):
    prompts, expected = reference
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    _idle(llm)


def test_greedy_matches_transformers_under_preemption(reference, tmp_path):
    prompts, expected = reference
    # 10 pages of 16 tokens: far less than the ~1000 tokens the eight requests need together,
    # and a 64-token step budget, so prompts are chunked and requests are preempted.
    page_bytes = 30 * 2 * 16 * 3 * 64 * 4
    small = LLM(dtype="float32", pool_bytes=28 * page_bytes, max_num_batched_tokens=64,
                adapter_dir=str(tmp_path))
    outs = small.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert small.stats()["preemptions"] > 0
    assert [o.token_ids for o in outs] == expected
    _idle(small)


def test_string_prompt_and_text(llm, hf_model):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0]
    ids = llm.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        gen = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    assert out.token_ids == gen.tolist()
    assert out.text == llm.tokenizer.decode(gen, skip_special_tokens=True)


def test_stop_strings_and_stop_token_ids(llm):
    base = llm.generate("1 2 3 4 5", SamplingParams(temperature=0, max_tokens=12))[0]
    assert "8" in base.text
    cut = llm.generate("1 2 3 4 5", SamplingParams(temperature=0, max_tokens=12, stop=["8"]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == base.text[: base.text.index("8")]
    stop_id = base.token_ids[3]
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id])
    by_id = llm.generate("1 2 3 4 5", params)[0]
    assert by_id.finish_reason == "stop"
    assert by_id.token_ids == base.token_ids[: base.token_ids.index(stop_id) + 1]


def test_max_tokens_and_ignore_eos(llm):
    # The chat template's end token would normally stop this early; ignore_eos runs to the limit.
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    natural = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64))[0]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] in llm.engine.eos_ids
    forced = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0]
    assert forced.finish_reason == "length" and len(forced.token_ids) == 64


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16)
    alone = llm.generate("Once upon a time", params)[0].token_ids
    again = llm.generate("Once upon a time", params)[0].token_ids
    assert alone == again
    others = ["A different prompt entirely", "Yet another one, longer than the rest of them by far", "x"]
    mixed = llm.generate(
        ["Once upon a time", *others],
        [params] + [SamplingParams(temperature=1.0, max_tokens=20)] * 3,
    )
    assert mixed[0].token_ids == alone
    reordered = llm.generate([others[0], "Once upon a time"], [SamplingParams(temperature=0.7), params])
    assert reordered[1].token_ids == alone
    other_seed = llm.generate("Once upon a time", SamplingParams(temperature=1.0, seed=99, max_tokens=16))
    assert other_seed[0].token_ids != alone


def test_logprobs_match_model_distribution(llm, hf_model):
    ids = llm.tokenizer.encode("The sky is")
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=1, logprobs=3))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)
    lp = out.logprobs[0]
    assert lp.token_id == int(ref.argmax())
    torch.testing.assert_close(torch.tensor(lp.logprob), ref.max(), atol=1e-4, rtol=1e-4)
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()


def test_bad_requests_are_refused(llm):
    from slserve.engine import RequestError

    with pytest.raises(RequestError, match="maximum context length"):
        llm.generate([1] * 10, SamplingParams(max_tokens=llm.engine.max_model_len))
    with pytest.raises(RequestError, match="does not exist"):
        llm.generate("hi", SamplingParams(), adapters=["no-such-adapter"])
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    _idle(llm)


def test_bfloat16_engine_tracks_float32_reference(hf_model, tmp_path):
    """The bfloat16 path (packed oneDNN weights, C++ decode attention) stays close to float32."""
    llm16 = LLM(dtype="bfloat16", pool_bytes=64 << 20, adapter_dir=str(tmp_path))
    ids = llm16.tokenizer.encode("The history of the printing press begins in the fifteenth century, when")
    out = llm16.generate(ids, SamplingParams(temperature=0, max_tokens=8, logprobs=5))[0]
    with torch.no_grad():
        full = torch.tensor([ids + out.token_ids])
        ref = torch.log_softmax(hf_model(full).logits[0].float(), -1)
    for step, lp in enumerate(out.logprobs):
        pos = len(ids) - 1 + step
        # The chosen token is among the reference's top 3 and its logprob is close.
        assert lp.token_id in ref[pos].topk(3).indices.tolist()
        assert abs(lp.logprob - float(ref[pos, lp.token_id])) < 0.15
