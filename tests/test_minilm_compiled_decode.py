"""The torch.compile'd decode step (minilm.inference.compiled) gives the tokens the eager decode step gives.

Where it meets the other generation features: left padding, repetition penalty, sampling seeds, eos, the cache
refill past block_size, batch sizes, and the int8/w8a8 weight formats.
"""

import shutil

import pytest
import torch
from test_minilm_arch import VARIANTS, make

from minilm.inference.cache import KVCache, step_mask
from minilm.inference.compiled import decode_step, graphs_for
from minilm.quantize import use_weights

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="torch.compile on a CPU needs a C++ compiler")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # graphs from other tests must not count (or be reused) here
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_whole_cache_step_equals_the_sliced_one(name):
    # Eager, so it runs without a compiler: the compiled step's shapes (every row of a bucketed batch, the whole
    # cache width under a mask) give the logits of the eager step's (the running rows, the filled columns).
    model = make(**VARIANTS[name])
    x = torch.randint(1, 97, (3, 6))
    full = KVCache(model.config, 4, 32, "cpu", torch.float32)  # batch_bucket(3) rows
    narrow = KVCache(model.config, 3, 32, "cpu", torch.float32)
    with torch.no_grad():
        for row, n in enumerate((6, 2, 4)):
            for cache in (full, narrow):
                model(x[row : row + 1, -n:], cache=cache.prefill(row))
                cache.lengths[row] = n
        for t in range(5):
            tok = torch.randint(1, 97, (3, 1))
            cols = torch.tensor(narrow.lengths)
            a = decode_step(model, tok, cols[:, None], step_mask(cols, int(cols.max()) + 1), narrow.k, narrow.v, cols)
            cols4 = torch.tensor(full.lengths[:3] + [0])
            tok4 = torch.cat([tok, torch.zeros(1, 1, dtype=torch.long)])
            b = decode_step(model, tok4, cols4[:, None], step_mask(cols4, 32), full.k, full.v, cols4)[:3]
            assert torch.allclose(a, b, atol=1e-5), t
            for cache in (full, narrow):
                cache.lengths[:3] = [n + 1 for n in cache.lengths[:3]]


def test_prefill_past_the_cache_width_is_a_clear_error():
    model = make(**VARIANTS["modern"])
    cache = KVCache(model.config, 1, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="holds 8 positions per row: a prefill of 9 does not fit"):
        model(torch.randint(1, 97, (1, 9)), cache=cache.prefill(0))


def test_compile_needs_the_cache_and_a_compiler(monkeypatch):
    model = make(**VARIANTS["modern"])
    x = torch.randint(1, 97, (1, 4))
    with pytest.raises(ValueError, match="needs use_cache=True"):
        model.generate(x, 4, compile=True, use_cache=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler.*apt install g\\+\\+"):
        model.generate(x, 4, compile=True)


@needs_compiler
@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_compiled_decode_equals_eager(name):
    # Greedy past block_size (the cache is refilled from the last half), then sampling with every setting on a
    # left-padded batch: the same tokens, and one graph for all of it.
    model = make(**VARIANTS[name])
    x = torch.randint(1, 97, (2, 5))
    assert torch.equal(model.generate(x, 40, temperature=0, compile=True), model.generate(x, 40, temperature=0))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.5, seed=3, attention_mask=mask, eos_id=7)
    assert torch.equal(model.generate(x, 25, compile=True, **kw), model.generate(x, 25, **kw))
    assert graphs_compiled() == 1  # padded or not, refilled or not: the same shapes


@needs_compiler
def test_compiled_decode_with_a_new_batch_size_and_length_adds_a_graph():
    model = make(**VARIANTS["modern"])
    x = torch.randint(1, 97, (3, 4))
    for rows, new in ((3, 10), (1, 10), (1, 12), (1, 50)):  # 4 + 10 and 4 + 12 share the 64-slot bucket (32 here)
        assert torch.equal(model.generate(x[:rows], new, temperature=0, compile=True),
                           model.generate(x[:rows], new, temperature=0))
    assert graphs_compiled() == 2  # batch 3 and batch 1; every length rounds up to the 32-token block


@needs_compiler
@pytest.mark.parametrize("weights", ["bf16", "int8", "w8a8"])
def test_compiled_decode_with_quantized_weights(weights):
    # Fused kernels may round the activations' int8 scales differently from eager in the last bit: the logits are
    # compared with a tolerance (1e-3 of their largest), the greedy text exactly (make()'s random weights keep the
    # logits far apart).
    model = use_weights(make(**VARIANTS["modern"]), weights)
    cfg = model.config
    x = torch.randint(1, 97, (1, 8))
    assert torch.equal(model.generate(x, 24, temperature=0, compile=True), model.generate(x, 24, temperature=0))
    cache = KVCache(cfg, 1, 32, "cpu", torch.float32)  # the graph generate() made
    with torch.no_grad():
        model(x, cache=cache.prefill(0))
        cols = torch.tensor([8])
        args = (torch.randint(1, 97, (1, 1)), cols[:, None], step_mask(cols, 32), cache.k, cache.v, cols)
        a = decode_step(model, *args)
        b = graphs_for(model).run(model, (1, 32, weights), *args)
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()


@needs_compiler
def test_sample_cli_compile_prints_the_same_text(tiny_run, capsys):
    # The trained tiny run, in w8a8, with sampling, a stop string and eos: --compile changes only the speed.
    from minilm import sample

    args = ["--out_dir", str(tiny_run), "--prompt", "def ", "--max_new_tokens", "60", "--weights", "w8a8",
            "--num_samples", "2", "--stop", "\n\n\n"]
    assert sample.main(args) == 0
    eager = capsys.readouterr().out
    assert sample.main(args + ["--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert graphs_compiled() == 1
