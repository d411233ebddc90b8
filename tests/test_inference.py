"""minilm.inference: per-row lengths and refills, so every row of a batch decodes as it would alone.

Where it meets the other features: left padding, the refill past block_size, sampling seeds and penalties, eos,
every weight format, and the compiled step (here with torch.compile's `eager` backend, which traces the same
graphs without building C++ kernels: fast, and it needs no compiler).
"""

import logging

import pytest
import torch
from test_minilm_arch import VARIANTS, make

from minilm.inference import Decoder, generate
from minilm.inference.cache import KVCache, step_mask
from minilm.inference.compiled import MAX_GRAPHS, batch_bucket, graphs_for, length_bucket
from minilm.quantize import WEIGHTS, use_weights


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def traced_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def eager_backend(model):
    graphs = graphs_for(model)
    graphs.backend = "eager"
    return graphs


def left_pad(*prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.size(1) for p in prompts)
    idx = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(idx)
    for i, p in enumerate(prompts):
        idx[i, width - p.size(1) :], mask[i, width - p.size(1) :] = p[0], 1
    return idx, mask


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_short_prompt_beside_a_long_one_keeps_its_context(name, compiled):
    # The case: block 32, a 5-token prompt beside a 28-token one. A shared cache fills when the long row
    # reaches 32 positions (new token 5) and a shared refill would cut the short row too; from new token 28 on
    # its tokens then differed from its own alone. Each row refills on its own: identical all the way.
    model = make(**VARIANTS[name])
    if compiled:
        eager_backend(model)
    short, long = torch.randint(1, 97, (1, 5)), torch.randint(1, 97, (1, 28))
    idx, mask = left_pad(short, long)
    out = generate(model, idx, 60, temperature=0, attention_mask=mask, compile=compiled)
    assert torch.equal(out[0, 23:], generate(model, short, 60, temperature=0)[0])
    assert torch.equal(out[1], generate(model, long, 60, temperature=0)[0])


def test_refill_past_block_size_sampled_with_seeds_and_penalty():
    # Rows refill at different steps (their lengths differ); row i samples with seed + i, as it would alone.
    model = make(**VARIANTS["modern"])
    prompts = [torch.randint(1, 97, (1, n)) for n in (3, 17, 30)]
    idx, mask = left_pad(*prompts)
    kw = dict(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.3)
    out = generate(model, idx, 70, attention_mask=mask, seed=11, **kw)
    for i, p in enumerate(prompts):
        alone = generate(model, p, 70, seed=11 + i, **kw)[0]
        assert torch.equal(out[i, idx.size(1) - p.size(1) :], alone), i


def test_decoder_refills_each_row_alone_when_it_is_full():
    model = make(**VARIANTS["gpt2"])
    decoder = Decoder(model, 2)
    rows = [type("Seq", (), {"tokens": torch.randint(1, 97, (n,)).tolist()})() for n in (30, 4)]
    for r in rows:
        decoder.add(r)
    for _ in range(4):
        for seq, logits in decoder.step():
            seq.tokens.append(int(logits[-1].argmax()))
    # step 1: both prefilled (30 and 4 positions); steps 2-3: both decode, row 0 reaches 32; step 4: row 0 is
    # full and refilled alone from its last 16 tokens while row 1 decodes (7 positions).
    assert decoder.prefills == 3 and decoder.decode_steps == 3
    assert sorted(decoder.cache.lengths) == [7, 16]


def test_eos_rows_stop_and_the_rest_go_on():
    model = make(**VARIANTS["modern"])
    a, b = torch.randint(1, 97, (1, 6)), torch.randint(1, 97, (1, 9))
    free = generate(model, a, 12, temperature=0)[0, 6:].tolist()
    eos = free[3]
    idx, mask = left_pad(a, b)
    out = generate(model, idx, 12, temperature=0, attention_mask=mask, eos_id=eos)
    cut = free.index(eos)
    assert out[0, 9:].tolist() == free[: cut + 1] + [eos] * (11 - cut)
    want_b = generate(model, b, 12, temperature=0, eos_id=eos)[0]
    assert torch.equal(out[1, : want_b.size(0)], want_b)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_every_weight_format_batched_equals_alone(weights):
    model = use_weights(make(**VARIANTS["modern"]), weights)
    eager_backend(model)
    prompts = [torch.randint(1, 97, (1, n)) for n in (5, 28, 12)]
    idx, mask = left_pad(*prompts)
    for compiled in (False, True):
        out = generate(model, idx, 40, temperature=0, attention_mask=mask, compile=compiled)
        for i, p in enumerate(prompts):
            assert torch.equal(out[i, 28 - p.size(1) :], generate(model, p, 40, temperature=0)[0]), (weights, i)


def test_step_writes_each_row_at_its_own_column():
    model = make(**VARIANTS["gpt2"])
    cache = KVCache(model.config, 3, 8, "cpu", torch.float32)
    cols = torch.tensor([2, 5, 0])
    k = torch.arange(3 * 2 * 16, dtype=torch.float32).view(3, 2, 1, 16)
    keys, _ = cache.step(cols, 6).update(0, k, k)
    assert keys.shape == (3, 2, 6, 16)
    for row, col in enumerate(cols.tolist()):
        assert torch.equal(cache.k[0][row, :, col], k[row, :, 0])
    assert step_mask(cols, 6)[:, 0, 0].tolist() == [[c <= n for c in range(6)] for n in (2, 5, 0)]


def test_batched_decode_logits_equal_the_full_forward():
    model = make(**VARIANTS["modern"])
    seqs = [type("Seq", (), {"tokens": torch.randint(1, 97, (n,)).tolist()})() for n in (3, 9, 5)]
    decoder = Decoder(model, 3)
    for s in seqs:
        decoder.add(s)
    decoder.step()  # the prefills
    for i, s in enumerate(seqs):
        s.tokens.append(7 + i)
    for seq, logits in decoder.step():
        full, _ = model(torch.tensor([seq.tokens]))
        torch.testing.assert_close(logits[-1], full[0, -1], atol=1e-5, rtol=1e-5)


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert [length_bucket(512, n) for n in (1, 64, 65, 600)] == [64, 64, 128, 512]


def test_more_graphs_than_the_recompile_limit():
    # torch.compile allows 8 graphs per function; one shared function raised FailOnRecompileLimitHit at the 9th.
    model = make(**VARIANTS["modern"])
    model.config.block_size = 768  # 12 length buckets (positions: RoPE tables are rebuilt below)
    model.rope_cos, model.rope_sin = (t.repeat(24, 1) for t in (model.rope_cos, model.rope_sin))
    graphs = eager_backend(model)
    for n in range(12):
        x = torch.randint(1, 97, (1 + n % 2, 60 + 64 * n))
        assert torch.equal(generate(model, x, 4, temperature=0, compile=True), generate(model, x, 4, temperature=0))
    assert len(graphs.steps) == 12 and not graphs.eager and traced_graphs() == 12 <= MAX_GRAPHS


def test_past_max_graphs_a_shape_runs_eagerly_with_one_log_line(caplog):
    model = make(**VARIANTS["gpt2"])
    graphs = eager_backend(model)
    graphs.max_graphs = 2
    x = torch.randint(1, 97, (4, 5))
    with caplog.at_level(logging.WARNING, logger="minilm.inference"):
        for rows in (1, 2, 4, 4):
            assert torch.equal(generate(model, x[:rows], 6, temperature=0, compile=True),
                               generate(model, x[:rows], 6, temperature=0))
    assert len(graphs.steps) == 2 and graphs.eager == {(4, 32, "fp32")}
    assert len(caplog.records) == 1 and "runs eagerly" in caplog.records[0].message


def test_a_failing_compiler_falls_back_to_eager(caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no kernels today")

    model = make(**VARIANTS["modern"])
    graphs_for(model).backend = broken
    x = torch.randint(1, 97, (2, 5))
    with caplog.at_level(logging.WARNING, logger="minilm.inference"):
        out = generate(model, x, 8, temperature=0, compile=True)
    assert torch.equal(out, generate(model, x, 8, temperature=0))
    assert len(caplog.records) == 1 and "no kernels today" in caplog.records[0].message


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generate_under_autocast_caches_in_the_autocast_dtype(dtype, compiled):
    # Training samples at each eval inside its autocast block (bf16 on a GPU or a bf16 CPU, fp16 on a T4): the
    # layers then make bf16/fp16 keys and values, which a float32 cache refused at the first decode step.
    model = make(**VARIANTS["modern"])
    if compiled:
        eager_backend(model)
    prompt = torch.randint(1, 97, (2, 7))
    with torch.autocast("cpu", dtype):
        decoder = Decoder(model, 2)
        assert decoder.cache.k[0].dtype == dtype
        out = generate(model, prompt, 40, temperature=0.8, top_k=20, seed=3, compile=compiled)
        # rows of different lengths (left padding), a repetition penalty, and past block_size (32): each row refills
        idx, mask = left_pad(torch.randint(1, 97, (1, 3)), torch.randint(1, 97, (1, 20)))
        padded = generate(model, idx, 40, temperature=0.9, top_k=30, repetition_penalty=1.3, seed=5,
                          attention_mask=mask, compile=compiled)
    assert out.shape == (2, 47) and torch.equal(out[:, :7], prompt) and int(out.max()) < model.config.vocab_size
    assert padded.shape == (2, 60) and torch.equal(padded[:, :20], idx)
    assert int(padded[:, 20:].min()) >= 0 and int(padded.max()) < model.config.vocab_size
    assert Decoder(model, 2).cache.k[0].dtype == torch.float32  # outside autocast: the weights' dtype
