"""Continuous batching for the server: requests join and leave one minilm.inference.Decoder.

    engine = Engine(model, tokenizer, eos_id, max_batch=8)
    engine.start()                          # a background thread runs step() while there is work
    engine.submit(Sequence(ids, params, sink))

Each step admits waiting requests into free rows and runs the decoder once: every request gets the forward
passes it would get alone (its prefill, a one-token decode batched with the others, its own refill at
block_size; see minilm.inference.engine), then its token is sampled with its own settings, stop strings and
torch.Generator. So a seed gives the same text batched or not. This module is the part that is the server's:
the queue, the thread, cancelling, text pieces, log-probabilities and errors, reported to each request's sink.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from minilm.inference import Decoder, sample_token
from minilm.inference.sampling import top_alternatives
from minilm.sample import TextStream


@dataclass(eq=False)
class Sequence:
    """One request. `sink` receives the text: sink.on_start(), sink.on_piece(text), sink.on_end(outcome, error,
    seq) with outcome "ok" | "cancelled" | "error"; a set sink.cancel (threading.Event) stops it.

    params: max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop (as minilm.sample), and
    optionally logprobs (k: the sink's on_token(id, logprob, top k) gets each sampled token's raw log-probability
    and the k likeliest alternatives) and echo (the sink's on_prompt(logprobs, tops) gets the prompt's, from its
    prefill; the first token's is None).
    """

    ids: list[int]  # the prompt, already encoded and cut to block_size (minilm.sample.encode_prompt)
    params: dict
    sink: object
    tokens: list[int] = field(default_factory=list)  # prompt + generated, what the decoder and the penalty read
    generated: int = 0  # tokens sampled (a final end-of-text included)
    finish_reason: str | None = None  # "stop" (end-of-text or a stop string) or "length" (max_new_tokens)
    started: bool = False
    prefilled: bool = False
    text: TextStream | None = None
    gen: torch.Generator | None = None


class Engine:
    """Runs the batch; thread-safe submit(). One thread (start()) or the caller (step()) drives it."""

    def __init__(self, model, tokenizer, eos_id: int | None, max_batch: int = 8, threads: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.eos_id, self.max_batch = model, tokenizer, eos_id, max_batch
        self.threads = threads
        self.device = next(model.parameters()).device
        self.decoder = Decoder(model, max_batch)
        self.waiting: deque[Sequence] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> list[Sequence]:
        return self.decoder.seqs

    # the counters /metrics shows
    decode_steps = property(lambda self: self.decoder.decode_steps)
    decode_rows = property(lambda self: self.decoder.decode_rows)
    prefills = property(lambda self: self.decoder.prefills)

    # ---- called from any thread
    def submit(self, seq: Sequence) -> None:
        with self.wake:
            if self.stopping:
                raise RuntimeError("the engine is stopped")
            self.waiting.append(seq)
            self.wake.notify()

    def start(self) -> Engine:
        self.thread = threading.Thread(target=self._loop, name="minilm-batch", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is running or waiting, and end the thread."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout)
        else:
            self._cancel_all()

    def busy(self) -> bool:
        with self.wake:
            return bool(self.running or self.waiting)

    # ---- the engine thread
    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # this thread's intra-op threads
        while True:
            with self.wake:
                while not (self.stopping or self.running or self.waiting):
                    self.wake.wait()
                if self.stopping:
                    break
            try:
                self.step()
            except Exception as e:  # a bug rather than one request's fault: fail the batch instead of hanging it
                for seq in list(self.running):
                    self._leave(seq, "error", f"generation failed: {type(e).__name__}: {e}")
        self._cancel_all()

    def _cancel_all(self) -> None:
        with self.wake:
            pending = list(self.waiting)
            self.waiting.clear()
        for seq in self.running + pending:
            self._end(seq, "cancelled")
        self.running.clear()

    def step(self) -> None:
        """Admit waiting sequences, run the decoder once, sample each sequence's next token."""
        with self.wake:
            while self.waiting and len(self.running) < self.max_batch:
                self._begin(self.waiting.popleft())
        for seq in list(self.running):
            if seq.sink.cancel.is_set():
                self._leave(seq, "cancelled")
        for seq, logits in self.decoder.step():
            if isinstance(logits, Exception):  # this request fails; the others go on
                self._leave(seq, "error", f"generation failed: {type(logits).__name__}: {logits}")
                continue
            if not seq.prefilled:
                seq.prefilled = True
                if seq.params.get("echo"):
                    self._score_prompt(seq, logits)
            if seq.params["max_new_tokens"] == 0:  # scored, nothing to sample
                seq.finish_reason = "length"
                self._leave(seq, "ok")
                continue
            self._sample(seq, logits[-1:].float())

    def _begin(self, seq: Sequence) -> None:
        seq.started = True
        seq.tokens = list(seq.ids)
        seq.text = TextStream(self.tokenizer, seq.params.get("stop"), self.eos_id)
        if seq.params.get("seed") is not None:
            seq.gen = torch.Generator(device=self.device)
            seq.gen.manual_seed(seq.params["seed"])
        seq.sink.on_start()
        if seq.params["max_new_tokens"] == 0 and not seq.params.get("echo"):
            seq.finish_reason = "length"  # nothing to sample or score: no forward pass, no token
            self._end(seq, "ok")
            return
        self.decoder.add(seq)

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor) -> None:
        """The prompt's own log-probabilities from its prefill logits (T, vocab): token i given tokens < i."""
        k = seq.params.get("logprobs")
        if k is None:
            seq.sink.on_prompt(None, None)
            return
        lp = logits[:-1].float().log_softmax(dim=-1)
        chosen = lp.gather(1, torch.tensor(seq.ids[1:], device=lp.device)[:, None])[:, 0].tolist()
        tops = top_alternatives(lp, k)
        seq.sink.on_prompt([None, *chosen], [None, *tops])

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        p = seq.params
        try:
            tok = sample_token(logits, seq.tokens, p["temperature"], p["top_k"], p["top_p"], p["repetition_penalty"],
                               seq.gen)
        except Exception as e:  # e.g. logits that are not finite: this request fails, the batch goes on
            self._leave(seq, "error", f"sampling failed: {type(e).__name__}: {e}")
            return
        seq.tokens.append(tok)
        seq.generated += 1
        if p.get("logprobs") is not None:  # the raw model's, from the logits this token was sampled from
            lp = logits.log_softmax(dim=-1)
            seq.sink.on_token(tok, float(lp[0, tok]), top_alternatives(lp, p["logprobs"])[0])
        piece = seq.text.push(tok)
        if piece:
            seq.sink.on_piece(piece)
        if seq.text.done:
            seq.finish_reason = "stop"
        elif seq.generated >= p["max_new_tokens"]:
            seq.finish_reason = "length"
            piece = seq.text.finish()
            if piece:
                seq.sink.on_piece(piece)
        if seq.text.done:
            self._leave(seq, "ok")

    def _leave(self, seq: Sequence, outcome: str, error: str | None = None) -> None:
        """Remove seq from the batch and tell its sink."""
        self.decoder.remove(seq)
        self._end(seq, outcome, error)

    def _end(self, seq: Sequence, outcome: str, error: str | None = None) -> None:
        seq.sink.on_end(outcome, error, seq)
