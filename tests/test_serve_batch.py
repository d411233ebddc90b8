"""Continuous batching (minilm.serve.batch): requests decoding together give each one's text alone, same seeds."""

from __future__ import annotations

import threading

import pytest
import torch

from minilm.config import ModelConfig
from minilm.model import GPT
from minilm.sample import encode_prompt, eos_of, load_run, stream_text
from minilm.serve.batch import DecodeView, Engine, RowView, Sequence, SlotCache


class Collect:
    """A sink that keeps what the engine sends."""

    def __init__(self):
        self.pieces, self.cancel, self.outcome, self.error, self.tokens = [], threading.Event(), None, None, None
        self.done = threading.Event()

    def on_start(self):
        pass

    def on_piece(self, piece: str):
        self.pieces.append(piece)

    def on_end(self, outcome: str, error, seq):
        self.outcome, self.error, self.tokens, self.finish_reason = outcome, error, seq.generated, seq.finish_reason
        self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def params(max_new_tokens=24, temperature=0.8, top_k=50, top_p=None, repetition_penalty=1.0, seed=0, stop=None):
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty, seed=seed, stop=stop)


# Mixed settings: greedy, top-k, nucleus + penalty, a stop string, and one that runs past block_size (64) so its
# row is refilled from the last half window while the others keep decoding.
MIXED = [
    ("def read(self, path):\n    ", params(30, temperature=0.0, top_k=None)),
    ("import ", params(40, temperature=1.0, top_k=50, seed=7)),
    ("class Parser:\n", params(36, temperature=1.0, top_k=None, top_p=0.8, repetition_penalty=1.3, seed=11)),
    ("    return ", params(50, temperature=0.8, top_k=40, seed=3, stop=["\n"])),
    ("# The json module\n", params(120, temperature=1.2, top_k=None, seed=5)),
    ("x = ", params(20, temperature=0.9, top_k=20, seed=1)),
]


@pytest.fixture(scope="module")
def run(tiny_run):
    model, tok, ckpt = load_run(tiny_run, "cpu")
    return model, tok, eos_of(tok, ckpt)


def alone(model, tok, eos, prompt, p) -> tuple[str, int]:
    stats: dict = {}
    text = "".join(stream_text(model, tok, prompt, eos_id=eos, stats=stats, **p))
    return text, stats["completion_tokens"]


def test_mixed_requests_joining_and_leaving_equal_each_alone(run):
    model, tok, eos = run
    want = [alone(model, tok, eos, prompt, p) for prompt, p in MIXED]
    engine = Engine(model, tok, eos, max_batch=3)  # the other three wait until a row frees up
    sinks = [Collect() for _ in MIXED]
    submit = lambda i: engine.submit(Sequence(encode_prompt(tok, MIXED[i][0], model, eos), MIXED[i][1], sinks[i]))
    submit(0)
    submit(1)
    engine.step()
    engine.step()  # 0 and 1 decode together now
    for i in range(2, len(MIXED)):
        submit(i)  # 2 joins mid-way, 3-5 queue
    sizes = []
    while engine.busy():
        engine.step()
        sizes.append(len(engine.running))
    assert max(sizes) == 3 and 2 in sizes  # they did run together, and the batch changed size
    for sink, (text, n), (prompt, _) in zip(sinks, want, MIXED):
        assert sink.outcome == "ok", sink.error
        assert sink.text == text, prompt
        assert sink.tokens == n
    assert want[4][1] > model.config.block_size  # the long one really went past block_size (a refill)
    assert "\n" not in sinks[3].text
    for sink, (_, p) in zip(sinks, MIXED):
        ran_out = sink.tokens == p["max_new_tokens"]
        assert sink.finish_reason in (("length", "stop") if ran_out else ("stop",))
    assert sinks[3].finish_reason == "stop"  # its stop string


def test_engine_thread_cancel_and_stop(run):
    model, tok, eos = run
    engine = Engine(model, tok, eos, max_batch=4, threads=1).start()
    long = params(400, temperature=1.0, top_k=None, seed=2)
    a, b = Collect(), Collect()
    engine.submit(Sequence(encode_prompt(tok, "def ", model, eos), long, a))
    engine.submit(Sequence(encode_prompt(tok, "x", model, eos), params(8, seed=4), b))
    assert b.done.wait(30) and b.outcome == "ok"
    assert b.text == alone(model, tok, eos, "x", params(8, seed=4))[0]
    a.cancel.set()
    assert a.done.wait(30) and a.outcome == "cancelled" and a.tokens < 400
    c = Collect()
    engine.submit(Sequence(encode_prompt(tok, "def ", model, eos), long, c))
    engine.stop()
    assert c.done.is_set() and c.outcome in ("cancelled", "ok")
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(Sequence([1], params(), Collect()))


def test_a_failing_request_does_not_take_the_batch_down(run):
    model, tok, eos = run
    engine = Engine(model, tok, eos, max_batch=2)
    good, bad = Collect(), Collect()
    engine.submit(Sequence(encode_prompt(tok, "def ", model, eos), params(10, seed=1), good))
    engine.submit(Sequence([model.config.vocab_size + 5], params(10, seed=1), bad))  # an id outside the vocab
    while engine.busy():
        engine.step()
    assert bad.outcome == "error" and "generation failed" in bad.error
    assert good.outcome == "ok" and good.text == alone(model, tok, eos, "def ", params(10, seed=1))[0]


def test_decode_view_writes_each_row_at_its_own_column():
    cfg = ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8)
    cache = SlotCache(cfg, 3, "cpu", torch.float32)
    view = DecodeView(cache, [2, 5, 0])
    k = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 1, 4)
    keys, _ = view.update(0, k, k)
    assert keys.shape == (3, 2, 6, 4)
    for row, col in enumerate([2, 5, 0]):
        assert torch.equal(cache.k[0, row, :, col], k[row, :, 0])
    mask = view.mask()
    assert mask.shape == (3, 1, 1, 6)
    assert mask[:, 0, 0].tolist() == [[c <= n for c in range(6)] for n in (2, 5, 0)]
    assert DecodeView(cache, [3, 3]).mask() is None


def test_batched_logits_match_single_sequence_logits():
    """The engine's batched decode is the model's own forward with per-row positions and masks: close to fp32."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 9, 5)]

    engine = Engine(model, None, None, max_batch=3)
    cache = engine.cache
    with torch.no_grad():
        for row, ids in enumerate(prompts):
            model(torch.tensor([ids]), cache=RowView(cache, row))
            cache.lengths[row] = len(ids)
        nxt = [[7], [8], [9]]
        view = DecodeView(cache, cache.lengths[:3])
        batched, _ = model(torch.tensor(nxt), cache=view, pos=view.cols[:, None], attn_mask=view.mask())
        for row, ids in enumerate(prompts):
            single, _ = model(torch.tensor([ids + nxt[row]]))
            torch.testing.assert_close(batched[row, -1], single[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights", ["bf16", "int8", "w8a8"])
def test_batched_equals_alone_with_converted_weights(tiny_run, weights):
    model, tok, ckpt = load_run(tiny_run, "cpu", weights=weights)
    eos = eos_of(tok, ckpt)
    jobs = MIXED[:4]
    want = [alone(model, tok, eos, prompt, p) for prompt, p in jobs]
    engine = Engine(model, tok, eos, max_batch=4)
    sinks = [Collect() for _ in jobs]
    for (prompt, p), sink in zip(jobs, sinks):
        engine.submit(Sequence(encode_prompt(tok, prompt, model, eos), p, sink))
    while engine.busy():
        engine.step()
    assert [(s.text, s.tokens) for s in sinks] == want


def test_zero_new_tokens_emits_nothing(run):
    model, tok, eos = run
    engine = Engine(model, tok, eos, max_batch=2)
    sink = Collect()
    engine.submit(Sequence(encode_prompt(tok, "def ", model, eos), params(0), sink))
    while engine.busy():
        engine.step()
    assert sink.outcome == "ok" and sink.tokens == 0 and sink.text == "" and sink.finish_reason == "length"
    assert engine.prefills == 0 and engine.decode_steps == 0  # no forward pass either
