"""Prompt logprobs: OpenAI's `echo` (with `logprobs`) on /v1/completions and vLLM's
`prompt_logprobs`, checked against transformers' log-softmax of the same prompt in float32; and
`best_of`, which returns the candidates of highest mean token logprob.

Position p's logits give token p + 1's logprob; the first prompt token has none (null). The
engine is checked offline with a prefill split into chunks (so that the rows come from several
steps) and through the real openai client against a real server, streaming and not, with an
adapter made by peft (the reference then is transformers + peft).
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from slserve import LLM
from slserve.model.loader import resolve_model
from slserve.sampling_params import SamplingParams
from tests.peft_util import make_peft_adapter
from tests.test_server import BASE, THREADS, assert_error, openai_client
from tests.test_structured_outputs import server_with_adapters

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
slow = pytest.mark.slow

PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find"
ATOL = 2e-4  # float32 both sides; the paged attention sums in another order


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(resolve_model(None))
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
           AutoTokenizer.from_pretrained(path))
    torch.set_num_threads(threads)


@torch.no_grad()
def reference(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: log-softmax at positions 0..L-2, predicting tokens 1..L-1."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def chosen(ref: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_engine_prompt_logprobs_over_chunked_prefill(hf):
    model, tokenizer = hf
    llm = LLM(dtype="float32", pool_bytes=64 << 20, threads=THREADS, max_num_batched_tokens=8)
    ids = tokenizer.encode(PROMPT)
    short = ids[:1]
    outs = llm.generate([ids, short, ids], [SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3),
                                            SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0),
                                            SamplingParams(max_tokens=2, temperature=0)])
    got = outs[0].prompt_logprobs
    assert len(got) == len(ids) and got[0] is None
    ref = reference(model, ids)
    values = torch.tensor([lp.logprob for lp in got[1:]])
    torch.testing.assert_close(values, chosen(ref, ids), atol=ATOL, rtol=0)
    top_v, top_i = ref.topk(3, dim=-1)
    for j, lp in enumerate(got[1:]):
        assert [t for t, _ in lp.top] == top_i[j].tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top_v[j], atol=ATOL, rtol=0)
        assert lp.rank == int((ref[j] > ref[j, ids[j + 1]]).sum()) + 1
    assert outs[1].prompt_logprobs == [None] and outs[2].prompt_logprobs is None


# -- through the openai client against a real server ---------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf):
    """(server, the directory of its peft-made adapter "tiny")."""
    root = tmp_path_factory.mktemp("echo")
    path = root / "peft"
    with server_with_adapters(root, lambda: {
        "tiny": make_peft_adapter(hf[0], path, r=4, targets=["q_proj", "v_proj"], seed=3, std=0.05),
    }) as proc:
        yield proc, path


@slow
@pytest.mark.parametrize("adapter", [None, "tiny"])
def test_echo_with_logprobs_matches_transformers(server, hf, adapter):
    proc, path = server
    model, tokenizer = hf
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path)).eval()
    ids = tokenizer.encode(PROMPT)
    ref = reference(model, ids)
    if adapter is not None:
        model.unload()
    client = openai_client(proc.url)
    out = client.completions.create(model=adapter or BASE, prompt=PROMPT, max_tokens=3, temperature=0,
                                    echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    lp = choice.logprobs
    n = len(ids)
    assert len(lp.tokens) == n + 3 and lp.tokens[:n] == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:n]), chosen(ref, ids), atol=ATOL, rtol=0)
    for j in range(1, n):
        top = ref[j - 1].topk(2).indices.tolist()
        assert {tokenizer.decode([t]) for t in top} <= set(lp.top_logprobs[j])
    assert lp.text_offset[0] == 0 and lp.text_offset[n] == sum(len(t) for t in lp.tokens[:n])
    assert out.usage.prompt_tokens == n and out.usage.completion_tokens == 3


@slow
def test_echo_streamed_and_with_token_prompts_and_n(server, hf):
    proc, _ = server
    _, tokenizer = hf
    client = openai_client(proc.url)
    ids = tokenizer.encode(PROMPT)
    whole = client.completions.create(model=BASE, prompt=[ids, ids[:5]], max_tokens=4, temperature=0,
                                      echo=True, n=2)
    texts = [c.text for c in whole.choices]
    assert texts[0] == texts[1] and texts[0].startswith(tokenizer.decode(ids))
    assert texts[2].startswith(tokenizer.decode(ids[:5]))
    pieces = ["", "", "", ""]
    for chunk in client.completions.create(model=BASE, prompt=[ids, ids[:5]], max_tokens=4, temperature=0,
                                           echo=True, n=2, stream=True):
        for c in chunk.choices:
            pieces[c.index] += c.text
    assert pieces == texts
    # echo without logprobs asks the engine for nothing more: no logprobs object
    assert whole.choices[0].logprobs is None


@slow
def test_max_tokens_zero_with_echo_scores_the_prompt(server, hf):
    """vLLM's way to score a prompt: echo + logprobs with no generated token."""
    proc, _ = server
    model, tokenizer = hf
    client = openai_client(proc.url)
    ids = tokenizer.encode(PROMPT)
    ref = reference(model, ids)
    out = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, n=2)
    for choice in out.choices:
        assert choice.text == PROMPT and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp.tokens == [tokenizer.decode([t]) for t in ids] and lp.token_logprobs[0] is None
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), chosen(ref, ids), atol=ATOL, rtol=0)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 0)
    chunks = list(client.completions.create(model=BASE, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.text for ch in chunks for c in ch.choices)
    tokens = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
    assert text == PROMPT and len(tokens) == len(ids)
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 0
    # Without echo there is nothing to return; min_tokens cannot exceed 0.
    url = f"{proc.url}/v1/completions"
    for fields, param in (({}, "max_tokens"), ({"echo": True, "min_tokens": 1}, "min_tokens")):
        body = {"model": BASE, "prompt": PROMPT, "max_tokens": 0, **fields}
        assert_error(httpx.post(url, json=body, timeout=60), 400, param=param)


@slow
def test_vllm_prompt_logprobs_on_completions_and_chat(server, hf):
    proc, _ = server
    model, tokenizer = hf
    client = openai_client(proc.url)
    ids = tokenizer.encode(PROMPT)
    ref = reference(model, ids)
    out = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=2, temperature=0,
                                    extra_body={"prompt_logprobs": 1})
    plp = out.choices[0].prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    for j, entry in enumerate(plp[1:]):
        want = {str(ids[j + 1]), str(int(ref[j].argmax()))}
        assert set(entry) == want
        assert entry[str(ids[j + 1])]["logprob"] == pytest.approx(float(ref[j, ids[j + 1]]), abs=ATOL)
        assert entry[str(ids[j + 1])]["rank"] == int((ref[j] > ref[j, ids[j + 1]]).sum()) + 1
        assert entry[str(ids[j + 1])]["decoded_token"] == tokenizer.decode([ids[j + 1]])

    messages = [{"role": "user", "content": "Name a color."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = tokenizer.encode(text, add_special_tokens=False)
    chat_ref = reference(model, chat_ids)
    chat = client.chat.completions.create(model=BASE, messages=messages, max_tokens=2, temperature=0,
                                          extra_body={"prompt_logprobs": 0})
    plp = chat.prompt_logprobs
    assert len(plp) == len(chat_ids) and plp[0] is None
    got = torch.tensor([e[str(t)]["logprob"] for e, t in zip(plp[1:], chat_ids[1:], strict=True)])
    torch.testing.assert_close(got, chosen(chat_ref, chat_ids), atol=ATOL, rtol=0)


@slow
def test_prompt_logprobs_errors(server):
    proc, _ = server
    url = f"{proc.url}/v1/completions"
    cases = [({"prompt_logprobs": 21}, "prompt_logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
             ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
             ({"echo": True, "logprobs": 21}, "logprobs")]
    for fields, param in cases:
        body = {"model": BASE, "prompt": "x", "max_tokens": 2, **fields}
        assert_error(httpx.post(url, json=body, timeout=60), 400, param=param)
    # chat's echo (vLLM's: the last message) is still refused by name
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(proc.url).chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "x"}], extra_body={"echo": True})
    assert info.value.body["param"] == "echo"


@slow
def test_best_of_returns_the_candidates_of_highest_mean_logprob(server):
    """best_of 3 with seed s runs the candidates n = 3 with seed s gives (choice i: seed s + i);
    the one returned must be the one whose sampled tokens have the highest mean logprob."""
    proc, _ = server
    client = openai_client(proc.url)
    common = {"model": BASE, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 11, "logprobs": 0}
    candidates = client.completions.create(n=3, **common).choices
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates]
    assert len(set(means)) == 3  # the seeds drew three different continuations
    best = client.completions.create(n=1, best_of=3, **common)
    assert [c.text for c in best.choices] == [candidates[means.index(max(means))].text]
    assert best.usage.completion_tokens == 18  # every candidate is generated (and counted)
    two = client.completions.create(n=2, best_of=3, **{**common, "logprobs": None})
    ranked = sorted(range(3), key=lambda i: -means[i])[:2]
    assert [c.text for c in two.choices] == [candidates[i].text for i in ranked]
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].logprobs is None


@slow
def test_best_of_errors(server):
    proc, _ = server
    url = f"{proc.url}/v1/completions"
    for fields in ({"n": 3, "best_of": 2}, {"best_of": 200}, {"best_of": 2, "stream": True}):
        body = {"model": BASE, "prompt": "x", "max_tokens": 2, **fields}
        assert_error(httpx.post(url, json=body, timeout=60), 400, param="best_of")
