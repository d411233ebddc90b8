"""Batched decoding with one cache row per sequence: what generate(), minilm.sample, minilm.evaluate,
minilm.bench and minilm.serve all run.

    decoder = Decoder(model, max_rows=8)
    decoder.add(seq)                       # any object with a `tokens` list (prompt + generated so far)
    for seq, logits in decoder.step():     # logits (T, vocab) of the positions this step ran for seq
        seq.tokens.append(sample_token(logits[-1:], seq.tokens, ...))

Every sequence gets the forward passes it would get alone: its prompt (its last block_size tokens) is prefilled
alone from position 0; once its row holds block_size positions it is refilled alone from its last
block_size // 2 tokens; otherwise it gets its last token at its own position, in one pass with every other such
sequence. So a short prompt beside a long one keeps its context, and the same seed and settings give the same
tokens batched or alone. Sequences occupy rows 0..n-1 of the cache; a step moves the ones being prefilled to the
end, so the others decode as one slice, and when one leaves the last row moves into its place.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from minilm.inference.cache import KVCache, step_mask
from minilm.inference.compiled import batch_bucket, check_compiler, decode_step, graphs_for, length_bucket, weights_of
from minilm.inference.sampling import check_sampling_args, sample_token


class Decoder:
    """Forward passes for a changing set of sequences (at most max_rows), each with its own cache row and length.

    compile=True runs the decode steps compiled (minilm.inference.compiled): the cache then has batch_bucket rows
    and length_bucket(tokens) columns, tokens being the longest sequence the caller will make. use_cache=False
    recomputes every sequence's last block_size tokens alone at every step (the reference the cache is tested on).
    """

    def __init__(self, model, max_rows: int, compile: bool = False, tokens: int | None = None,
                 use_cache: bool = True):
        cfg = model.config
        self.model, self.block_size, self.use_cache = model, cfg.block_size, use_cache
        self.device = next(model.parameters()).device
        self.graphs = graphs_for(model) if compile else None
        if self.graphs is not None and self.graphs.backend == "inductor":
            check_compiler(self.device)
        rows = batch_bucket(max_rows) if compile else max_rows
        width = length_bucket(cfg.block_size, tokens or cfg.block_size) if compile else cfg.block_size
        dtype = model.transformer.wte.weight.dtype
        kind = self.device.type
        if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):  # the sample at an eval during training
            dtype = torch.get_autocast_dtype(kind)  # the keys and values the layers make under autocast
        self.cache = KVCache(cfg, rows, width, self.device, dtype) if use_cache else None
        self.max_rows = max_rows
        self.seqs: list = []  # seqs[i] owns cache row i
        self.decode_steps = self.decode_rows = self.prefills = 0

    def add(self, seq) -> None:
        if len(self.seqs) >= self.max_rows:
            raise RuntimeError(f"the decoder is full ({self.max_rows} sequences)")
        self.seqs.append(seq)
        if self.cache is not None:
            self.cache.lengths[len(self.seqs) - 1] = 0  # to be prefilled

    def remove(self, seq) -> None:
        row, last = self.seqs.index(seq), len(self.seqs) - 1
        if row != last:
            if self.cache is not None:
                self.cache.move(last, row)
            self.seqs[row] = self.seqs[last]
        self.seqs.pop()

    @torch.no_grad()
    def step(self) -> list[tuple[object, torch.Tensor | Exception]]:
        """One forward pass's worth for every sequence: (seq, logits (T, vocab)) or (seq, the error it raised)."""
        if self.cache is None:
            return [(s, self._run(self._recompute, s)) for s in list(self.seqs)]
        alone = self._alone_to_the_end()
        n = len(self.seqs) - len(alone)
        out = []
        if n:
            try:
                logits = self._decode(n)
                out = [(s, logits[i]) for i, s in enumerate(self.seqs[:n])]
            except Exception as e:  # noqa: BLE001 - the caller decides what one failed pass means
                out = [(s, e) for s in self.seqs[:n]]
        return out + [(s, self._run(self._prefill, s)) for s in alone]

    def _run(self, fn, seq):
        try:
            return fn(seq)
        except Exception as e:  # noqa: BLE001 - this sequence fails, the others go on
            return e

    def _alone_to_the_end(self) -> list:
        """Reorder rows so the sequences that need a prefill or refill come last; return them."""
        lengths = self.cache.lengths
        alone = lambda i: lengths[i] == 0 or lengths[i] >= self.block_size
        i, j = 0, len(self.seqs) - 1
        while i < j:
            if not alone(i):
                i += 1
            elif alone(j):
                j -= 1
            else:
                self.cache.swap(i, j)
                self.seqs[i], self.seqs[j] = self.seqs[j], self.seqs[i]
        return [s for r, s in enumerate(self.seqs) if alone(r)]

    def _prefill(self, seq) -> torch.Tensor:
        row = self.seqs.index(seq)
        first = self.cache.lengths[row] == 0
        window = seq.tokens[-self.block_size :] if first else seq.tokens[-(self.block_size // 2) :]
        idx = torch.tensor([window], dtype=torch.long, device=self.device)
        logits, _ = self.model(idx, cache=self.cache.prefill(row))
        self.cache.lengths[row] = len(window)
        self.prefills += 1
        return logits[0]

    def _recompute(self, seq) -> torch.Tensor:
        idx = torch.tensor([seq.tokens[-self.block_size :]], dtype=torch.long, device=self.device)
        return self.model(idx)[0][0]

    def _decode(self, n: int) -> torch.Tensor:
        """Logits (n, 1, vocab): rows 0..n-1 each fed its last token at its own position, in one pass."""
        lengths = self.cache.lengths[:n]
        rows = self.cache.rows if self.graphs is not None else n  # compiled: every row (the padding ones idle)
        last = [s.tokens[-1] for s in self.seqs[:n]] + [0] * (rows - n)
        idx = torch.tensor(last, dtype=torch.long, device=self.device)[:, None]
        cols = torch.tensor(lengths + [0] * (rows - n), dtype=torch.long, device=self.device)
        width = self.cache.max_len if self.graphs is not None else max(lengths) + 1
        args = (idx, cols[:, None], step_mask(cols, width), self.cache.k, self.cache.v, cols)
        if self.graphs is not None:
            logits = self.graphs.run(self.model, (rows, width, weights_of(self.model)), *args)[:n]
        else:
            logits = decode_step(self.model, *args)
        for r in range(n):
            self.cache.lengths[r] += 1
        self.decode_steps += 1
        self.decode_rows += n
        return logits


class _Row:
    def __init__(self, index: int, tokens: list[int], gen: torch.Generator | None):
        self.index, self.tokens, self.gen = index, tokens, gen


@torch.no_grad()
def generate_stream(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                    eos_id: int | None = None, seed: int | None = None, attention_mask: torch.Tensor | None = None,
                    use_cache: bool = True, compile: bool = False) -> Iterator[torch.Tensor]:
    """Continue each row of idx (B, T), yielding each new token column (B,) as soon as it is sampled.

    temperature 0 is greedy. Prompts of different lengths are left-padded, with attention_mask (B, T) holding 1
    for real tokens and 0 for padding; each row is decoded as it would be alone. With a seed, row i samples with
    its own generator seeded seed + i (so row 0 of a batch equals the same prompt alone with the same seed).
    Rows that emit eos_id are padded with eos_id while the others go on; it stops when every row has finished.
    compile=True runs the decode steps compiled (minilm.inference.compiled): same tokens, faster per step
    after a first call that compiles.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, model.config.vocab_size,
                        eos_id)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be a (batch, length) tensor with length >= 1, got shape {tuple(idx.shape)}")
    if compile and not use_cache:
        raise ValueError("compile=True compiles the cached decode step: it needs use_cache=True")
    mask = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != idx.shape or not bool(mask.any(dim=1).all()):
        raise ValueError(f"attention_mask must have idx's shape {tuple(idx.shape)} and at least one 1 per row")
    rows = []
    for i in range(idx.size(0)):
        gen = None if seed is None else torch.Generator(device=idx.device).manual_seed(seed + i)
        rows.append(_Row(i, idx[i][mask[i]].tolist(), gen))
    longest = max(len(r.tokens) for r in rows) + max_new_tokens
    decoder = Decoder(model, len(rows), compile=compile, tokens=longest, use_cache=use_cache)
    for row in rows:
        decoder.add(row)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            column = torch.full((len(rows),), eos_id or 0, dtype=torch.long)
            for row, logits in decoder.step():
                if isinstance(logits, Exception):
                    raise logits
                tok = sample_token(logits[-1:].float(), row.tokens, temperature, top_k, top_p, repetition_penalty,
                                   row.gen)
                row.tokens.append(tok)
                column[row.index] = tok
                if tok == eos_id:
                    decoder.remove(row)
            yield column.to(idx.device)
            if not decoder.seqs:
                break
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float = 1.0, eos_id: int | None = None,
             seed: int | None = None, attention_mask: torch.Tensor | None = None, use_cache: bool = True,
             compile: bool = False) -> torch.Tensor:
    """idx (B, T) continued by up to max_new_tokens tokens: (B, T + new). Arguments as generate_stream."""
    steps = generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id, seed,
                            attention_mask, use_cache, compile)
    new = [t[:, None] for t in steps]
    return torch.cat([idx, *new], dim=1) if new else idx
