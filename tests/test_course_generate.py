"""check.generate passes the solution's KV-cache generate over MyGPT, fails each planted bug (one test each), and
counts minilm's engine as the reference."""

from __future__ import annotations

import math

import pytest
import torch

from course import check
from course import solutions as sol


@pytest.fixture(autouse=True)
def course_log(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_LOG", str(tmp_path / "checks.jsonl"))
    monkeypatch.delenv("COURSE_STRICT", raising=False)


def ok(r) -> bool:
    return bool(r) and not r.uses_reference


def test_solution_passes_over_mygpt():
    assert ok(check.generate(sol.my_generate, sol.MyGPT))


def test_solution_passes_with_minilm_gpt_holding_the_weights():
    """Only the weights of minilm's GPT are read, never its forward: still the learner's pass."""
    assert ok(check.generate(sol.my_generate, seed=3))


def test_no_cache_fails_on_the_positions_it_recomputes():
    """Same tokens as minilm, but the whole sequence goes through the model at every step."""

    def no_cache(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
        ids = prompt_ids
        for _ in range(max_new_tokens):
            logits = sol.my_forward_cached(model, ids, sol.my_kv_cache(model), 0)[:, -1]
            if temperature == 0:
                token = logits.argmax(dim=-1, keepdim=True)
            else:
                token = torch.multinomial(sol.my_probs(logits, temperature, top_k, top_p), 1, generator=generator)
            ids = torch.cat([ids, token], dim=1)
        return ids

    r = check.generate(no_cache, sol.MyGPT, seed=0)
    assert not r and "generation without a cache" in r.message


def test_rope_without_offset_fails(monkeypatch):
    monkeypatch.setattr(sol, "my_rope_at", lambda x, theta, start: sol.my_rope(x, theta))
    r = check.generate(sol.my_generate, sol.MyGPT, seed=1)
    assert not r and "modern recipe" in r.message and "decode step" in r.message


def test_learned_positions_from_zero_fail(monkeypatch):
    """The GPT-2 recipe's version of the same bug: the new token's position embedding taken at 0."""
    forward = sol.my_forward_cached
    monkeypatch.setattr(sol, "my_forward_cached", lambda model, idx, cache, start: forward(
        model, idx, cache, start) if start == 0 or model.config.pos != "learned" else _wpe_at_zero(
        forward, model, idx, cache, start))
    assert not check.generate(sol.my_generate, sol.MyGPT, seed=2)


def _wpe_at_zero(forward, model, idx, cache, start):
    wpe = model.transformer.wpe
    shifted = torch.nn.Embedding.from_pretrained(torch.roll(wpe.weight, start, dims=0))  # row start = row 0
    model.transformer.wpe = shifted
    try:
        return forward(model, idx, cache, start)
    finally:
        model.transformer.wpe = wpe


def test_prefill_not_causal_fails(monkeypatch):
    def full_attention(q, k, v, block=64):  # every prompt position sees the whole prompt
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1) @ v

    monkeypatch.setattr(sol, "my_flash_attention", full_attention)
    assert not check.generate(sol.my_generate, sol.MyGPT, seed=0)


def test_decode_step_without_its_own_key_fails(monkeypatch):
    """The cache read one column short: the new query sees every earlier position but not itself."""
    attend = sol.my_attend_cache
    monkeypatch.setattr(sol, "my_attend_cache", lambda q, k, v, start: attend(q, k[:, :, :-1], v[:, :, :-1],
                                                                             start))
    assert not check.generate(sol.my_generate, sol.MyGPT, seed=0)


def test_minilm_generate_counts_as_the_reference():
    from minilm.inference import generate

    def engine(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
        seed = None if generator is None else generator.initial_seed()  # minilm seeds its own generator
        return generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed=seed)

    r = check.generate(engine, seed=0)
    assert r and r.uses_reference and "minilm.inference" in r.message
