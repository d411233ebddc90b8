"""POST /v1/completions driven by the official `openai` client against a real uvicorn server: plain, streamed,
batched and token-id prompts, log-probabilities (equal to minilm.evaluate's NLL), echo scoring and errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from metrics.perplexity import token_nll  # what minilm.evaluate scores tokens with
from minilm.sample import eos_of, generate_text, load_run
from minilm.serve import create_app, serve_in_thread

openai = pytest.importorskip("openai")

PROMPTS = ["def read(self, path):\n    ", "import ", "class Parser:\n"]


@pytest.fixture(scope="module")
def run(tiny_run):
    model, tok, ckpt = load_run(tiny_run, "cpu")
    return model, tok, eos_of(tok, ckpt)


@pytest.fixture(scope="module")
def client(tiny_run):
    app = create_app(tiny_run, max_concurrency=4, max_queue=8, max_new_tokens_cap=128)
    with serve_in_thread(app) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(run):
    """minilm.sample.generate_text in a 1-thread worker like the engine's (the same float arithmetic)."""
    model, tok, eos = run
    pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))
    yield lambda prompt, **kw: pool.submit(generate_text, model, tok, prompt, eos_id=eos, **kw).result()
    pool.shutdown()


def forced_logprobs(model, ids: list[int]) -> list[float]:
    """-NLL of ids[1:] given what precedes them, as minilm.evaluate computes it (one teacher-forced forward)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    return (-token_nll(logits, torch.tensor([ids[1:]]))[0]).tolist()


def test_models_and_a_plain_completion(client, reference, tiny_run):
    assert [m.id for m in client.models.list().data] == [tiny_run.name]
    out = client.completions.create(model=tiny_run.name, prompt=PROMPTS[0], max_tokens=24, temperature=0.9,
                                    top_p=0.9, seed=5)
    want = reference(PROMPTS[0], max_new_tokens=24, temperature=0.9, top_k=None, top_p=0.9, seed=5)
    (choice,) = out.choices
    assert choice.text == want["text"] and choice.logprobs is None
    assert out.usage.prompt_tokens == want["prompt_tokens"]
    assert out.usage.completion_tokens == want["completion_tokens"]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_equals_non_streamed_at_temperature_0(client):
    body = dict(model="tiny", prompt=PROMPTS[1], max_tokens=40, temperature=0, logprobs=2)
    plain = client.completions.create(**body).choices[0]
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 2  # piece by piece
    assert "".join(c.choices[0].text for c in text_chunks) == plain.text
    assert text_chunks[-1].choices[0].finish_reason == plain.finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [v for c in text_chunks for v in getattr(c.choices[0].logprobs, key)]
        assert streamed == getattr(plain.logprobs, key), key
    assert chunks[-1].usage.completion_tokens == len(plain.logprobs.tokens)


def test_batched_prompts_n_and_token_ids(client, run):
    model, tok, _ = run
    out = client.completions.create(model="tiny", prompt=PROMPTS[:2], n=2, max_tokens=20, temperature=0.8,
                                    seed=3)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:  # choice j of prompt i samples as a request of its own with seed + j
        alone = client.completions.create(model="tiny", prompt=PROMPTS[c.index // 2], max_tokens=20,
                                          temperature=0.8, seed=3 + c.index % 2)
        assert c.text == alone.choices[0].text
    assert out.choices[0].text != out.choices[1].text  # n choices differ
    ids = [tok.encode(p).ids for p in PROMPTS[:2]]
    by_ids = client.completions.create(model="tiny", prompt=ids[0], max_tokens=20, temperature=0.8, seed=3)
    assert by_ids.choices[0].text == out.choices[0].text
    lists = client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0.8, seed=3)
    assert [c.text for c in lists.choices] == [out.choices[0].text, out.choices[2].text]
    assert lists.usage.prompt_tokens == sum(map(len, ids))


def test_echo_scores_a_text_with_minilm_evaluates_nll(client, run):
    model, tok, _ = run
    text = "def main(argv=None):\n    parser = argparse.ArgumentParser()\n    return 0\n"
    out = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=5)
    (choice,) = out.choices
    ids = tok.encode(text).ids
    lp = choice.logprobs
    assert choice.text == text and out.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    assert lp.token_logprobs[1:] == pytest.approx(forced_logprobs(model, ids), abs=1e-4)
    assert "".join(lp.tokens) == text and len(lp.tokens) == len(ids)
    assert [text[a:b] for a, b in zip(lp.text_offset, [*lp.text_offset[1:], len(text)])] == lp.tokens
    for chosen, token, top in zip(lp.token_logprobs[1:], lp.tokens[1:], lp.top_logprobs[1:]):
        assert 5 <= len(top) <= 6 and top[token] == chosen and max(top.values()) >= chosen
    chunks = list(client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=5,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs] == \
        lp.token_logprobs


def test_generated_logprobs_of_a_batch_equal_teacher_forced_nll(client, run):
    """Tokens decoded together in one batch carry the log-probabilities a teacher-forced forward gives them."""
    model, tok, eos = run
    out = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=30, temperature=0, logprobs=1)
    for prompt, choice in zip(PROMPTS, out.choices):
        ids = tok.encode(prompt).ids
        new = model.generate(torch.tensor([ids]), 30, temperature=0, eos_id=eos)[0, len(ids):].tolist()
        lp = choice.logprobs
        assert len(lp.tokens) == len(new)
        assert lp.token_logprobs == pytest.approx(forced_logprobs(model, ids + new)[len(ids) - 1:], abs=1e-4)
        for token, top in zip(lp.tokens, lp.top_logprobs):  # greedy: each chosen token is the likeliest
            assert max(top, key=top.get) == token


def test_bad_input_raises_the_clients_error_with_our_message(client):
    ok = dict(model="tiny", prompt="def ", max_tokens=4)
    cases = [({"max_tokens": 10_000}, "max_tokens: 10000 is above this server's cap of 128", None),
             ({"logprobs": 6}, "logprobs", "logprobs"),
             ({"prompt": [1, 10**6]}, "token id 1000000 is outside the vocabulary", "prompt"),
             ({"prompt": []}, "empty list", "prompt"),
             ({"temperature": 3.0}, "temperature", "temperature"),
             ({"n": 7, "prompt": ["a", "b"]}, "more than this server takes at once", "prompt"),
             ({"extra_body": {"temprature": 1}}, "temprature: unknown field", "temprature")]
    for bad, fragment, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{**ok, **bad})
        assert fragment in e.value.message, (bad, e.value.message)
        assert e.value.body["type"] == "invalid_request_error"
        if param:
            assert e.value.param == param, (bad, e.value.body)
    with pytest.raises(openai.NotFoundError, match="no model"):
        client.models.retrieve("gpt-4")
