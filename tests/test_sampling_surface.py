"""The sampling surface: presence, frequency and repetition penalties, logit_bias, min_p and
min_tokens; known parameters the server does not implement refused with a 400 naming them,
unknown fields ignored with a warning; vLLM's /tokenize and /detokenize.

Every reference is independent of slserve: transformers' logits processors
(RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor, MinNewTokensLengthLogitsProcessor,
TemperatureLogitsWarper, MinPLogitsWarper) and a torch loop of OpenAI's documented penalty formula
(`mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty`, c counting the output so far).
They are applied in vLLM's order (bias and the min_tokens mask, repetition, frequency/presence,
then temperature and min-p) to handmade logits at the Sampler level, and, through the real openai
client against a real server, to the embedded model run step by step by transformers in float32.
Sampled requests are checked through the sampler's documented draw: the exponential race
argmax(p / E), E ~ Exp(1) from the request's own generator seeded with its seed, one draw of the
vocabulary's size per token.
"""

from __future__ import annotations

import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

from slserve.api import protocol
from slserve.model.loader import resolve_model
from slserve.request import Request
from slserve.sampling import Sampler
from slserve.sampling_params import SamplingParams, SamplingParamsError
from tests.peft_util import make_peft_adapter
from tests.test_server import BASE, THREADS, ServerProcess, assert_error, openai_client, upload

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")]
slow = pytest.mark.slow  # the tests that start a server

VOCAB = 64
EOS = [2, 5]
_ids = itertools.count()


# -- references ----------------------------------------------------------------------------------


def openai_penalties(scores: torch.Tensor, output: list[int], presence: float,
                     frequency: float) -> torch.Tensor:
    """OpenAI's formula, one token at a time. scores: [1, vocab]."""
    out = scores.clone()
    for j in set(output):
        c = output.count(j)
        out[0, j] = out[0, j] - c * frequency - float(c > 0) * presence
    return out


def reference_processors(req: Request, eos: list[int]) -> list:
    """transformers processors (and the OpenAI loop) for one request's settings, in vLLM's order;
    each is called as f(input_ids [1, L] of prompt + output, scores [1, vocab])."""
    p, prompt_len = req.params, req.num_prompt_tokens
    procs = []
    if p.logit_bias:
        procs.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias.items()]))
    if p.min_tokens:
        stops = list(p.stop_token_ids) + ([] if p.ignore_eos else eos)
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, p.min_tokens, stops))
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.presence_penalty or p.frequency_penalty:
        procs.append(lambda ids, s: openai_penalties(s, ids[0, prompt_len:].tolist(), p.presence_penalty,
                                                     p.frequency_penalty))
    return procs


def apply_all(procs: list, token_ids: list[int], scores: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([token_ids])
    for proc in procs:
        scores = proc(ids, scores)
    return scores


def race(scores: torch.Tensor, noise: torch.Tensor, temperature: float, min_p: float) -> int:
    """The exponential race on transformers' temperature and min-p warpers. scores: [1, vocab]."""
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    probs = scores.softmax(-1)[0]
    return int((probs / noise.clamp(min=torch.finfo(noise.dtype).tiny)).argmax())


def make_request(prompt: list[int], output: list[int], **params) -> Request:
    req = Request(f"r{next(_ids)}", list(prompt), SamplingParams(max_tokens=64, **params))
    req.token_ids += output
    return req


def random_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def history(seed: int, length: int) -> list[int]:
    # a small alphabet, so that tokens repeat and the counts matter
    return torch.randint(6, 20, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- the Sampler on handmade logits --------------------------------------------------------------

SETTINGS = {
    "presence": dict(presence_penalty=1.5),
    "negative_presence": dict(presence_penalty=-2.0),
    "frequency": dict(frequency_penalty=0.7),
    "presence_and_frequency": dict(presence_penalty=-0.5, frequency_penalty=2.0),
    "repetition": dict(repetition_penalty=1.8),
    "repetition_below_1": dict(repetition_penalty=0.5),
    "logit_bias": dict(logit_bias={7: 100.0, 8: -100.0, 30: 2.5, 0: -3.0}),
    "min_tokens": dict(min_tokens=10, stop_token_ids=[40]),
    "min_tokens_ignore_eos": dict(min_tokens=10, stop_token_ids=[40], ignore_eos=True),
    "min_tokens_reached": dict(min_tokens=3, stop_token_ids=[40]),
    "all": dict(presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=1.3, min_tokens=9,
                logit_bias={6: 3.0, 9: -1.0, 2: 50.0}),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_processed_logits_and_greedy_tokens_match_references(name):
    """Each setting on its own row between rows without settings (which must come out bitwise
    unchanged); full processed logits compared, then the greedy token, which the settings change."""
    logits = random_logits(4, seed=len(name))
    logits[:, EOS[0]] = 8.0  # EOS is the argmax: min_tokens has something to prevent
    reqs = [make_request(history(i, 7), history(10 + i, 5), temperature=0.0,
                         **(SETTINGS[name] if i % 2 else {})) for i in range(4)]
    processed = Sampler(0, EOS)._process(logits, reqs)
    tokens, _ = Sampler(0, EOS)(logits, reqs)
    for i, req in enumerate(reqs):
        if i % 2 == 0:
            assert torch.equal(processed[i], logits[i])
            assert tokens[i] == int(logits[i].argmax())
            continue
        expected = apply_all(reference_processors(req, EOS), req.token_ids, logits[i : i + 1].clone())
        torch.testing.assert_close(processed[i : i + 1], expected, rtol=1e-6, atol=1e-6)
        assert tokens[i] == int(expected.argmax())
        # the setting did something to this row, except where it has nothing left to do
        assert torch.equal(processed[i], logits[i]) == (name == "min_tokens_reached"), name


GREEDY_CASES = {  # settings -> the token they must make the argmax
    "logit_bias": (dict(logit_bias={30: 100.0}), 30),
    "ban": (dict(logit_bias={10: -100.0}), 50),
    "presence": (dict(presence_penalty=1.0), 50),
    "frequency": (dict(frequency_penalty=0.4), 50),  # token 10 occurs twice: 9 - 0.8 < 8.5
    "repetition": (dict(repetition_penalty=1.2), 50),
    "repetition_of_a_prompt_token": (dict(repetition_penalty=1.2), 50),
    "min_tokens": (dict(min_tokens=4), 10),
}


@pytest.mark.parametrize("name", list(GREEDY_CASES))
def test_greedy_rows_get_the_settings(name):
    """Token 10 (seen) leads with 9.0, token 50 (unseen) follows with 8.5; with min_tokens the
    EOS leads (10.0). Each setting hands the argmax to the token the reference predicts."""
    params, winner = GREEDY_CASES[name]
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 50] = 9.0, 8.5
    prompt, output = ([10, 11], [12]) if name == "repetition_of_a_prompt_token" else ([11], [10, 12, 10])
    if name == "min_tokens":
        logits[0, EOS[1]] = 10.0
    req = make_request(prompt, output, temperature=0.0, **params)
    expected = apply_all(reference_processors(req, EOS), req.token_ids, logits.clone())
    assert int(expected.argmax()) == winner
    assert Sampler(0, EOS)(logits, [req])[0] == [winner]


def test_requests_without_settings_cost_nothing():
    logits = random_logits(3, seed=1)
    reqs = [make_request([1, 2], [3], temperature=t, top_k=5, seed=1) for t in (0.0, 0.7, 1.0)]
    assert Sampler(0, EOS)._process(logits, reqs) is logits


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_sampling_matches_transformers_warpers(min_p):
    """64 seeded rows: each token equals the race on TemperatureLogitsWarper + MinPLogitsWarper
    with the row's own noise; without min_p the race would pick other tokens on some rows."""
    rows, temperature = 64, 1.7
    logits = random_logits(1, seed=3).expand(rows, -1).contiguous()
    reqs = [make_request([1], [], temperature=temperature, min_p=min_p, seed=s) for s in range(rows)]
    tokens, _ = Sampler(0, EOS)(logits, reqs)
    unfiltered = []
    for s in range(rows):
        noise = torch.empty(VOCAB).exponential_(generator=torch.Generator().manual_seed(s))
        assert tokens[s] == race(logits[s : s + 1], noise, temperature, min_p), s
        unfiltered.append(race(logits[s : s + 1], noise, temperature, 0.0))
    assert unfiltered != tokens


def test_seeded_request_is_reproducible_whatever_the_batch():
    """A seeded request with every setting draws the same tokens alone and among greedy,
    penalized, unseeded and other seeded requests; and each of its tokens equals the reference."""

    def run(with_others: bool) -> list[int]:
        sampler = Sampler(123, EOS)
        req = make_request([6, 7, 8, 6], [], temperature=0.9, min_p=0.02, seed=77, presence_penalty=0.8,
                           frequency_penalty=0.4, repetition_penalty=1.4, logit_bias={9: 2.0}, min_tokens=4)
        others = [make_request([6, 7], [8, 8], temperature=0.0, repetition_penalty=1.5),
                  make_request([6], [], temperature=1.0),
                  make_request([6], [7], temperature=0.5, seed=1, min_p=0.2, logit_bias={3: -5.0})]
        generator = torch.Generator().manual_seed(77)
        for step in range(10):
            row = random_logits(1, seed=100 + step)
            noise = torch.empty(VOCAB).exponential_(generator=generator)
            scores = apply_all(reference_processors(req, EOS), req.token_ids, row.clone())
            expected = race(scores, noise, 0.9, 0.02)
            if with_others:  # the request's row sits second; the others get logits of their own
                batch = [others[0], req, others[1], others[2]]
                logits = torch.cat([random_logits(1, seed=1000 + step), row,
                                    random_logits(2, seed=2000 + step)])
            else:
                batch, logits = [req], row
            tokens, _ = sampler(logits, batch)
            assert tokens[batch.index(req)] == expected, step
            for r, token in zip(batch, tokens, strict=True):
                r.token_ids.append(token)
        return req.output_token_ids

    assert run(False) == run(True)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (dict(presence_penalty=2.01), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(frequency_penalty=math.nan), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=math.inf), "repetition_penalty"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=17, max_tokens=16), "min_tokens"),
        (dict(logit_bias={5: 100.5}), "logit_bias"),
        (dict(logit_bias={"5x": 1.0}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={True: 1.0}), "logit_bias"),
    ],
)
def test_sampling_params_refuse_invalid_values(fields, param):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**fields)
    assert info.value.param == param


def test_logit_bias_keys_must_lie_in_the_vocabulary():
    params = SamplingParams(logit_bias={"63": 1.0})
    assert params.logit_bias == {63: 1.0}
    params.check_vocab(64)
    with pytest.raises(SamplingParamsError):
        SamplingParams(logit_bias={64: 1.0}).check_vocab(64)


# -- through the openai client against a real server ---------------------------------------------


@pytest.fixture(scope="module")
def hf():
    """The embedded model in transformers (float32), its tokenizer and its EOS ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(resolve_model(None))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    # One intra-op thread, as the server has (tests/test_server.py: OpenMP barriers stall when
    # the machine is shared).
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield SimpleNamespace(model=model, tokenizer=tokenizer, eos=sorted({tokenizer.eos_token_id, *eos}))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server (float32) with a peft-made adapter "tiny" uploaded."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("surface")
    proc = ServerProcess(root / "adapters", root / "server.log")
    proc.start()
    try:
        base = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32)
        adapter = make_peft_adapter(base, root / "peft-tiny", r=2, targets=["q_proj"], seed=0)
        del base
        proc.wait_ready()
        r = upload(proc.url, "tiny", adapter)
        assert r.status_code == 201, r.text
        yield proc
    finally:
        proc.stop()


@torch.no_grad()
def hf_generate(hf, prompt_ids: list[int], max_tokens: int, procs=(),
                sample: tuple | None = None) -> list[int]:
    """transformers, one token at a time, with the processors applied to each step's float32
    logits; greedy, or with sample = (temperature, min_p, seed) the seeded exponential race."""
    ids = list(prompt_ids)
    generator = torch.Generator().manual_seed(sample[2]) if sample else None
    past, step_input = None, torch.tensor([ids])
    for _ in range(max_tokens):
        out = hf.model(step_input, past_key_values=past, use_cache=True)
        past = out.past_key_values
        scores = apply_all(procs, ids, out.logits[:, -1].float())
        if sample:
            noise = torch.empty(scores.shape[1]).exponential_(generator=generator)
            token = race(scores, noise, sample[0], sample[1])
        else:
            token = int(scores.argmax())
        ids.append(token)
        if token in hf.eos:
            break
        step_input = torch.tensor([[token]])
    return ids[len(prompt_ids):]


def text_of(hf, tokens: list[int]) -> str:
    return hf.tokenizer.decode(tokens, skip_special_tokens=True)


def chat_ids(hf, messages) -> list[int]:
    text = hf.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return hf.tokenizer.encode(text, add_special_tokens=False)


def completion_ids(hf, prompt: str) -> list[int]:
    return hf.tokenizer.encode(prompt)


REPEATING = "one, two, one, two, one, two, one,"
NAME = "Hello, my name is"
YES_NO = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]


def openai_processor(prompt_len: int, presence: float, frequency: float):
    return lambda ids, s: openai_penalties(s, ids[0, prompt_len:].tolist(), presence, frequency)


@slow
def test_logit_bias_forces_and_bans_tokens(server, hf):
    client = openai_client(server.url)
    ids = completion_ids(hf, NAME)
    forced = hf.tokenizer.encode(" Bob", add_special_tokens=False)[0]
    out = client.completions.create(model=BASE, prompt=NAME, max_tokens=4, temperature=0,
                                    logit_bias={str(forced): 100})
    assert out.choices[0].text == text_of(hf, [forced] * 4)
    assert hf_generate(hf, ids, 4, [SequenceBiasLogitsProcessor([[[forced], 100.0]])]) == [forced] * 4

    greedy = hf_generate(hf, ids, 8)
    banned = {greedy[0]: -100.0, greedy[1]: -100.0}
    expected = hf_generate(hf, ids, 8, [SequenceBiasLogitsProcessor([[[t], b] for t, b in banned.items()])])
    assert expected[0] != greedy[0]
    out = client.completions.create(model=BASE, prompt=NAME, max_tokens=8, temperature=0,
                                    logit_bias={str(t): b for t, b in banned.items()})
    assert out.choices[0].text == text_of(hf, expected)

    messages = [{"role": "user", "content": "Name a color."}]
    chat = chat_ids(hf, messages)
    expected = hf_generate(hf, chat, 6, [SequenceBiasLogitsProcessor([[[forced], 7.5]])])
    out = client.chat.completions.create(model=BASE, messages=messages, max_tokens=6, temperature=0,
                                         logit_bias={str(forced): 7.5})
    assert out.choices[0].message.content == text_of(hf, expected)


@slow
@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 1.0), (2.0, 2.0), (-1.0, 0.5)])
def test_presence_and_frequency_penalties_change_greedy_output_as_the_formula_predicts(server, hf, presence,
                                                                                      frequency):
    ids = completion_ids(hf, REPEATING)
    expected = hf_generate(hf, ids, 12, [openai_processor(len(ids), presence, frequency)])
    if presence > 0:
        assert expected != hf_generate(hf, ids, 12)
    out = openai_client(server.url).completions.create(
        model=BASE, prompt=REPEATING, max_tokens=12, temperature=0, presence_penalty=presence,
        frequency_penalty=frequency)
    assert out.choices[0].text == text_of(hf, expected)
    assert out.usage.completion_tokens == len(expected)


@slow
@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(server, hf, penalty):
    client = openai_client(server.url)
    ids = completion_ids(hf, NAME)
    expected = hf_generate(hf, ids, 12, [RepetitionPenaltyLogitsProcessor(penalty)])
    assert expected != hf_generate(hf, ids, 12)
    out = client.completions.create(model=BASE, prompt=NAME, max_tokens=12, temperature=0,
                                    extra_body={"repetition_penalty": penalty})
    assert out.choices[0].text == text_of(hf, expected)
    messages = [{"role": "user", "content": "Say hi."}]
    expected = hf_generate(hf, chat_ids(hf, messages), 8, [RepetitionPenaltyLogitsProcessor(penalty)])
    out = client.chat.completions.create(model=BASE, messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"repetition_penalty": penalty})
    assert out.choices[0].message.content == text_of(hf, expected)


@slow
def test_min_tokens_prevents_an_early_eos(server, hf):
    client = openai_client(server.url)
    ids = chat_ids(hf, YES_NO)
    plain = hf_generate(hf, ids, 16)
    assert plain[-1] in hf.eos and len(plain) < 6  # the model stops at once ("No.")
    out = client.chat.completions.create(model=BASE, messages=YES_NO, max_tokens=16, temperature=0)
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == len(plain)

    expected = hf_generate(hf, ids, 16, [MinNewTokensLengthLogitsProcessor(len(ids), 8, hf.eos)])
    assert len(expected) >= 9
    out = client.chat.completions.create(model=BASE, messages=YES_NO, max_tokens=16, temperature=0,
                                         extra_body={"min_tokens": 8})
    assert out.choices[0].message.content == text_of(hf, expected)
    assert out.usage.completion_tokens == len(expected)
    assert out.choices[0].finish_reason == ("stop" if expected[-1] in hf.eos else "length")
    # Stop strings are not checked before min_tokens either (vLLM): the first token's text does
    # not end the request.
    first = text_of(hf, expected[:1]).strip()
    assert first and first not in text_of(hf, expected[1:])
    out = client.chat.completions.create(model=BASE, messages=YES_NO, max_tokens=16, temperature=0,
                                         stop=[first], extra_body={"min_tokens": 8})
    assert out.choices[0].message.content == text_of(hf, expected)


@slow
def test_min_p_matches_transformers_in_a_mixed_batch(server, hf):
    """A seeded min_p request sent at the same time as penalized and unseeded ones equals the
    seeded race on transformers' warpers; without min_p its tokens differ."""
    client = openai_client(server.url)
    ids = completion_ids(hf, NAME)
    temperature, min_p, seed = 1.5, 0.1, 11
    expected = hf_generate(hf, ids, 10, sample=(temperature, min_p, seed))
    assert expected != hf_generate(hf, ids, 10, sample=(temperature, 0.0, seed))

    def seeded():
        return client.completions.create(model=BASE, prompt=NAME, max_tokens=10, temperature=temperature,
                                         seed=seed, extra_body={"min_p": min_p})

    def other(i: int):
        return client.completions.create(model="tiny" if i % 2 else BASE, prompt=REPEATING, max_tokens=10,
                                         temperature=0.8 * i, presence_penalty=0.5 * i,
                                         extra_body={"repetition_penalty": 1.0 + 0.1 * i})

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(seeded), *[pool.submit(other, i) for i in range(3)]]
        outs = [f.result() for f in futures]
    assert outs[0].choices[0].text == text_of(hf, expected)


BAD_VALUES = [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.01}, "min_p"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"logit_bias": {"49152": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999999999999999999": 1}}, "logit_bias"),
]


@slow
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_invalid_values_are_400_naming_the_parameter(server, route):
    for fields, param in BAD_VALUES:
        if route == "completions":
            body = {"model": BASE, "prompt": NAME, "max_tokens": 4, **fields}
        else:
            body = {"model": BASE, "messages": YES_NO, **fields}
            if "max_tokens" in fields:
                body["max_completion_tokens"] = body.pop("max_tokens")
        url = f"{server.url}/v1/{'chat/' if route == 'chat' else ''}completions"
        assert_error(httpx.post(url, json=body, timeout=60), 400, param=param)


@slow
def test_invalid_values_through_the_openai_client(server):
    client = openai_client(server.url)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=BASE, prompt=NAME, max_tokens=4, logit_bias={"50000": 3})
    assert info.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BASE, messages=YES_NO, frequency_penalty=-2.5)
    assert info.value.body["param"] == "frequency_penalty"


# -- known parameters the server lacks, and unknown ones ------------------------------------------

NOT_ACCEPTED = {"on": 1}  # a value no "off" list holds


@slow
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_known_parameters_without_support_are_400_naming_them(server, route):
    table = protocol._COMPLETION_NOT_IMPLEMENTED if route == "completions" else protocol._CHAT_NOT_IMPLEMENTED
    base = {"model": BASE, "prompt": NAME} if route == "completions" else {"model": BASE, "messages": YES_NO}
    url = f"{server.url}/v1/{'chat/' if route == 'chat' else ''}completions"
    for name in table:
        assert_error(httpx.post(url, json={**base, name: NOT_ACCEPTED}, timeout=60), 400, param=name)
    # The "off" values (and null) are accepted, all at once.
    off = {name: values[0] if values else None for name, values in table.items()}
    r = httpx.post(url, json={**base, **off, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text


@slow
def test_known_parameters_without_support_through_the_openai_client(server):
    client = openai_client(server.url)
    cases = [
        (lambda: client.completions.create(model=BASE, prompt=NAME, suffix=" end"), "suffix"),
        (lambda: client.completions.create(model=BASE, prompt=NAME, extra_body={"use_beam_search": True}),
         "use_beam_search"),
        (lambda: client.chat.completions.create(model=BASE, messages=YES_NO, store=True), "store"),
        (lambda: client.chat.completions.create(model=BASE, messages=YES_NO, reasoning_effort="low"),
         "reasoning_effort"),
        (lambda: client.chat.completions.create(
            model=BASE, messages=YES_NO, tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (lambda: client.chat.completions.create(model=BASE, messages=YES_NO, stream=True,
                                                stream_options={"include_usage": True,
                                                                "include_obfuscation": True}),
         "stream_options.include_obfuscation"),
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["param"] == param, param


@slow
def test_unknown_fields_are_ignored_with_a_logged_warning(server):
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"model": BASE, "prompt": NAME, "max_tokens": 2, "surely_not_a_parameter": 1})
    assert r.status_code == 200, r.text
    assert "ignored unknown fields of a CompletionRequest: 'surely_not_a_parameter'" in server.log_tail(20000)


def test_unknown_field_warning_is_bounded(caplog):
    body = {"prompt": "x", **{f"field{i}" + "z" * 500: i for i in range(100)}}
    with caplog.at_level("WARNING", logger="slserve.api.protocol"):
        protocol.CompletionRequest.model_validate(body)
    (record,) = caplog.records
    assert "and 80 more" in record.getMessage() and len(record.getMessage()) < 2000


@slow
def test_request_id_names_the_response(server):
    out = openai_client(server.url).chat.completions.create(
        model=BASE, messages=YES_NO, max_tokens=2, extra_body={"request_id": "my-trace-7"})
    assert out.id == "chatcmpl-my-trace-7"


# -- /tokenize and /detokenize ------------------------------------------------------------------


@slow
def test_tokenize_a_prompt(server, hf):
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
    max_model_len = next(m["max_model_len"] for m in models if m["id"] == BASE)
    text = "Hello world, tokenize me."
    for model in (BASE, "tiny", None):
        for special in (True, False):
            body = {"prompt": text, "add_special_tokens": special, **({"model": model} if model else {})}
            r = httpx.post(f"{server.url}/tokenize", json=body, timeout=30)
            assert r.status_code == 200, r.text
            expected = hf.tokenizer.encode(text, add_special_tokens=special)
            assert r.json() == {"tokens": expected, "count": len(expected), "max_model_len": max_model_len,
                                "token_strs": None}
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "return_token_strs": True}, timeout=30)
    assert r.json()["token_strs"] == hf.tokenizer.convert_ids_to_tokens(hf.tokenizer.encode(text))


@slow
def test_tokenize_messages_with_the_chat_template(server, hf):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, I am"}]
    cases = [({}, dict(add_generation_prompt=True)),
             ({"add_generation_prompt": False}, dict(add_generation_prompt=False)),
             ({"add_generation_prompt": False, "continue_final_message": True},
              dict(add_generation_prompt=False, continue_final_message=True))]
    for fields, template_args in cases:
        body = {"model": "tiny", "messages": messages, **fields}
        r = httpx.post(f"{server.url}/tokenize", json=body, timeout=30)
        assert r.status_code == 200, r.text
        text = hf.tokenizer.apply_chat_template(messages, tokenize=False, **template_args)
        expected = hf.tokenizer.encode(text, add_special_tokens=False)
        assert r.json()["tokens"] == expected and r.json()["count"] == len(expected)
        # chat completions honour the same options: the prompt is the same tokens
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"model": BASE, "messages": messages, "max_tokens": 1, **fields})
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["prompt_tokens"] == len(expected)
    r = httpx.post(f"{server.url}/tokenize", timeout=30,
                   json={"messages": messages, "add_generation_prompt": True, "continue_final_message": True})
    assert_error(r, 400, param="continue_final_message")


@slow
def test_detokenize(server, hf):
    tokens = hf.tokenizer.encode("Bonjour, le monde!")
    for model in (BASE, "tiny"):
        r = httpx.post(f"{server.url}/detokenize", json={"model": model, "tokens": tokens}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {"prompt": hf.tokenizer.decode(tokens)}
    for tokens in ([1, 49152], [-1]):
        r = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}, timeout=30)
        assert_error(r, 400, param="tokens")


@slow
def test_tokenizer_routes_refuse_unknown_models_and_bad_bodies(server):
    for path, body in (("/tokenize", {"model": "nope", "prompt": "x"}),
                       ("/tokenize", {"model": "nope", "messages": YES_NO}),
                       ("/detokenize", {"model": "nope", "tokens": [1]})):
        err = assert_error(httpx.post(f"{server.url}{path}", json=body, timeout=30), 404, param="model")
        assert err["code"] == "model_not_found"
    assert_error(httpx.post(f"{server.url}/tokenize", json={"model": BASE}, timeout=30), 422)
    assert_error(httpx.post(f"{server.url}/detokenize", json={"tokens": "abc"}, timeout=30), 422)
    body = {"messages": YES_NO, "chat_template": "{{ 1 }}"}
    assert_error(httpx.post(f"{server.url}/tokenize", json=body, timeout=30), 400, param="chat_template")
    text = json.dumps({"prompt": "a\ud800b"})
    r = httpx.post(f"{server.url}/tokenize", content=text.encode(), timeout=30,
                   headers={"content-type": "application/json"})
    assert_error(r, 400, param="prompt")
