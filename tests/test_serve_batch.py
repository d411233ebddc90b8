"""Continuous batching (minilm.serve.batch over minilm.inference.Decoder): requests decoding together give each
one's text alone, same seeds."""

from __future__ import annotations

import threading

import pytest

from minilm.sample import encode_prompt, eos_of, load_run, stream_text
from minilm.serve.batch import Engine, Sequence


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
    # Greedy, and checked to run all 400 tokens alone: it cannot end by itself before the cancel, however slowly
    # this thread gets to set it on a loaded machine.
    long = params(400, temperature=0.0, top_k=None)
    assert alone(model, tok, eos, "def ", long)[1] == 400
    engine = Engine(model, tok, eos, max_batch=4, threads=1).start()
    a, b = Collect(), Collect()
    engine.submit(Sequence(encode_prompt(tok, "def ", model, eos), long, a))
    engine.submit(Sequence(encode_prompt(tok, "x", model, eos), params(8, seed=4), b))
    assert b.done.wait(30) and b.outcome == "ok"
    a.cancel.set()
    assert a.done.wait(30) and a.outcome == "cancelled" and a.tokens < 400
    assert b.text == alone(model, tok, eos, "x", params(8, seed=4))[0]
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
