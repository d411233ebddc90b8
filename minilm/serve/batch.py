"""Continuous batching: requests decode together, one forward pass per step for all of them.

    engine = Engine(model, tokenizer, eos_id, max_batch=8)
    engine.start()                          # a background thread runs step() while there is work
    engine.submit(Sequence(ids, params, sink))

Each step admits waiting sequences (each prompt is prefilled alone, as minilm.sample does), then feeds every
other running sequence its last token in one batched forward. A sequence leaves the batch when it finishes, is
cancelled or fails; the next step can admit another in its place. Each sequence keeps its own sampling settings,
stop strings and torch.Generator, and goes through exactly the forward passes (prefill, one-token decodes, the
refill at block_size) and sampling calls that GPT.generate_stream makes for it alone, so a seed gives the same
text batched or not.

The KV cache is one tensor with a row per running sequence. Rows have different lengths: each step writes row i's
new key/value at its own column, and an attention mask hides the columns past each row's length. Running
sequences occupy rows 0..n-1, so a step reads plain slices of the cache (no gather); when one leaves, the last
row moves into its place.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from minilm.model import sample_next
from minilm.sample import TextStream


class SlotCache:
    """Keys and values for up to `slots` sequences: (n_layer, slots, n_head, max_len, head_dim), own lengths."""

    def __init__(self, config, slots: int, device, dtype: torch.dtype):
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, slots, config.n_head, config.block_size, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * slots

    def move(self, src: int, dst: int) -> None:
        """Copy row src's filled columns to row dst (a sequence changing rows)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n


class RowView:
    """A `cache` for forward(): one sequence's prefill into row r from column 0 (like a fresh KVCache)."""

    static = False

    def __init__(self, cache: SlotCache, row: int):
        self.cache, self.row, self.length = cache, row, 0
        self.max_len = cache.k.size(3)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.size(2)
        r = slice(self.row, self.row + 1)
        self.cache.k[layer, r, :, self.length : end] = k
        self.cache.v[layer, r, :, self.length : end] = v
        return self.cache.k[layer, r, :, :end], self.cache.v[layer, r, :, :end]


class DecodeView:
    """A `cache` for forward(): one new token for each of rows 0..n-1, row i written at column lengths[i].

    forward() reads `length` only to check the block size (so it is the longest row's) and adds 1 after the
    step; the per-row lengths are the engine's to advance.
    """

    static = False

    def __init__(self, cache: SlotCache, lengths: list[int]):
        self.cache = cache
        self.max_len = cache.k.size(3)
        self.length = max(lengths)
        self.rows = torch.arange(len(lengths), device=cache.k.device)
        self.cols = torch.tensor(lengths, device=cache.k.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        n, end = k.size(0), self.length + 1
        self.cache.k[layer, self.rows, :, self.cols] = k[:, :, 0]
        self.cache.v[layer, self.rows, :, self.cols] = v[:, :, 0]
        return self.cache.k[layer, :n, :, :end], self.cache.v[layer, :n, :, :end]

    def mask(self) -> torch.Tensor | None:
        """(n, 1, 1, S) True where a row may attend: its filled columns and the new one. None if all equal."""
        if bool((self.cols == self.length).all()):
            return None  # same as a single sequence's decode step (no mask needed)
        cols = torch.arange(self.length + 1, device=self.cols.device)
        return (cols[None, :] <= self.cols[:, None])[:, None, None, :]


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
    tokens: list[int] = field(default_factory=list)  # prompt + generated, the `seen` of repetition_penalty
    generated: int = 0  # tokens sampled (a final end-of-text included)
    finish_reason: str | None = None  # "stop" (end-of-text or a stop string) or "length" (max_new_tokens)
    started: bool = False
    text: TextStream | None = None
    gen: torch.Generator | None = None


def top_alternatives(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The k likeliest (id, logprob) of each row of logprobs (rows, vocab), likeliest first."""
    if k == 0:
        return [[] for _ in range(logprobs.size(0))]
    values, ids = torch.topk(logprobs, min(k, logprobs.size(-1)), dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


class Engine:
    """Runs the batch; thread-safe submit(). One thread (start()) or the caller (step()) drives it."""

    def __init__(self, model, tokenizer, eos_id: int | None, max_batch: int = 8, threads: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.eos_id, self.max_batch = model, tokenizer, eos_id, max_batch
        self.threads = threads
        self.block_size = model.config.block_size
        self.device = next(model.parameters()).device
        dtype = model.transformer.wte.weight.dtype  # the cache dtype GPT.generate uses
        self.cache = SlotCache(model.config, max_batch + 1, self.device, dtype)  # + a spare row for swaps
        self.running: list[Sequence] = []  # running[i] owns cache row i
        self.waiting: deque[Sequence] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.decode_steps = self.decode_rows = self.prefills = 0  # for /metrics

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

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting sequences, decode the running ones together, prefill or refill the others alone."""
        with self.wake:
            while self.waiting and len(self.running) < self.max_batch:
                self.running.append(self.waiting.popleft())
                self.cache.lengths[len(self.running) - 1] = 0
        for seq in list(self.running):
            if seq.sink.cancel.is_set():
                self._leave(seq, "cancelled")
        # A new sequence is prefilled, and a full row refilled from its last half window, alone: the forward
        # passes GPT.generate_stream makes. Those rows go to the end, so rows 0..m-1 decode as one slice.
        alone = lambda s: not s.started or self.cache.lengths[self.running.index(s)] >= self.block_size
        i, j = 0, len(self.running) - 1
        while True:
            while i < j and not alone(self.running[i]):
                i += 1
            while i < j and alone(self.running[j]):
                j -= 1
            if i >= j:
                break
            self._swap(i, j)
        solo = [s for s in self.running if alone(s)]
        together = self.running[: len(self.running) - len(solo)]
        if together:
            self._decode(together)
        for seq in solo:
            self._prefill(seq)

    def _swap(self, i: int, j: int) -> None:
        spare = self.max_batch  # the cache's extra row
        self.cache.move(i, spare)
        self.cache.move(j, i)
        self.cache.move(spare, j)
        self.running[i], self.running[j] = self.running[j], self.running[i]

    def _prefill(self, seq: Sequence) -> None:
        try:
            first = not seq.started
            if first:
                self._begin(seq)
                if seq.params["max_new_tokens"] == 0 and not seq.params.get("echo"):
                    seq.finish_reason = "length"  # nothing to sample or score: no forward pass, no token
                    self._leave(seq, "ok")
                    return
                window = seq.ids
            else:
                window = seq.tokens[-(self.block_size // 2) :]
            row = self.running.index(seq)
            idx = torch.tensor([window], dtype=torch.long, device=self.device)
            pos = torch.arange(len(window), device=self.device)[None]
            logits, _ = self.model(idx, cache=RowView(self.cache, row), pos=pos)
            self.cache.lengths[row] = len(window)
            self.prefills += 1
            if first and seq.params.get("echo"):
                self._score_prompt(seq, logits[0])
        except Exception as e:  # this request fails; the others go on
            self._leave(seq, "error", f"generation failed: {type(e).__name__}: {e}")
            return
        if seq.params["max_new_tokens"] == 0:  # scored, nothing to sample
            seq.finish_reason = "length"
            self._leave(seq, "ok")
            return
        self._sample(seq, logits[:, -1, :].float())

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

    def _begin(self, seq: Sequence) -> None:
        seq.started = True
        seq.tokens = list(seq.ids)
        seq.text = TextStream(self.tokenizer, seq.params.get("stop"), self.eos_id)
        if seq.params.get("seed") is not None:
            seq.gen = torch.Generator(device=self.device)
            seq.gen.manual_seed(seq.params["seed"])
        seq.sink.on_start()

    def _decode(self, batch: list[Sequence]) -> None:
        """One forward pass for rows 0..len(batch)-1, each fed its last token at its own position."""
        n = len(batch)
        view = DecodeView(self.cache, self.cache.lengths[:n])
        idx = torch.tensor([[s.tokens[-1]] for s in batch], dtype=torch.long, device=self.device)
        try:
            logits, _ = self.model(idx, cache=view, pos=view.cols[:, None], attn_mask=view.mask())
        except Exception as e:
            for seq in batch:
                self._leave(seq, "error", f"generation failed: {type(e).__name__}: {e}")
            return
        for row in range(n):
            self.cache.lengths[row] += 1
        self.decode_steps += 1
        self.decode_rows += n
        logits = logits[:, -1, :].float()
        for i, seq in enumerate(batch):  # logits rows follow `batch`, whatever _leave moves meanwhile
            self._sample(seq, logits[i : i + 1])

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        p = seq.params
        seen = seen_mask = None  # only the repetition penalty looks at the context
        if p["repetition_penalty"] != 1.0:
            seen = torch.tensor([seq.tokens], dtype=torch.long, device=self.device)
            seen_mask = torch.ones_like(seen, dtype=torch.bool)
        try:
            tok = int(sample_next(logits, seen, seen_mask, p["temperature"], p["top_k"], p["top_p"],
                                  p["repetition_penalty"], seq.gen)[0])
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
        """Remove seq from the batch (the last row moves into its place) and tell its sink."""
        row = self.running.index(seq)
        last = len(self.running) - 1
        if row != last:
            self.cache.move(last, row)
            self.running[row] = self.running[last]
        self.running.pop()
        self._end(seq, outcome, error)

    def _end(self, seq: Sequence, outcome: str, error: str | None = None) -> None:
        seq.sink.on_end(outcome, error, seq)
