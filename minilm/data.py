"""Read a data dir (train.bin, val.bin, meta.json, tokenizer.json) and serve random training windows."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """The data dir is missing, empty or does not match the config; the message says how to fix it."""


def how_to_make() -> str:
    return ("make one with `python -m dataset_curation build --recipe builtin --out data/builtin-8k` "
            "(or run `python -m minilm.train`, which builds the built-in corpus when its data dir is missing)")


def read_meta(data_dir: str | Path) -> dict:
    d = Path(data_dir)
    path = d / "meta.json"
    if not d.is_dir():
        raise DataError(f"data dir {d} does not exist; {how_to_make()}")
    if not path.is_file():
        raise DataError(f"{path} is missing: {d} is not a data dir; {how_to_make()}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); rebuild the data dir: {how_to_make()}") from None
    for key in ("vocab_size", "dtype"):
        if key not in meta:
            raise DataError(f"{path} has no {key!r}; rebuild the data dir: {how_to_make()}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {meta['dtype']!r} must be 'uint16' or 'uint32'")
    if meta["dtype"] == "uint16" and meta["vocab_size"] > 65535:
        raise DataError(f"{path}: vocab_size {meta['vocab_size']} does not fit uint16 token ids; "
                        "rebuild with uint32 shards (dataset_curation picks it automatically)")
    return meta


class TokenData:
    """One split of a data dir as a read-only memmap of token ids.

        data = TokenData("data/builtin-8k", "train")
        x, y = data.get_batch(16, 128, "cpu")   # inputs and next-token targets, (16, 128) int64 each
    """

    def __init__(self, data_dir: str | Path, split: str, vocab_size: int | None = None,
                 block_size: int | None = None, seed: int = 0):
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        self.split = split
        path = self.data_dir / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path} is missing; {how_to_make()}")
        dtype = np.dtype(self.meta["dtype"])
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{path} is empty: no tokens to train on; rebuild the data dir with more input text")
        if size % dtype.itemsize:
            raise DataError(f"{path} has {size} bytes, not a whole number of {dtype.name} tokens: "
                            "the file is truncated or meta.json names the wrong dtype; rebuild the data dir")
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        expected = self.meta.get("tokens", {}).get(split) if isinstance(self.meta.get("tokens"), dict) else None
        if expected is not None and expected != len(self.tokens):
            raise DataError(f"{path} holds {len(self.tokens)} tokens but meta.json says {expected}: "
                            "the shard is incomplete or stale; rebuild the data dir")
        self._check_ids(str(path), self.meta["vocab_size"], vocab_size, block_size)
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_tokens(cls, tokens, split: str = "train", vocab_size: int | None = None,
                    block_size: int | None = None, seed: int = 0) -> TokenData:
        """A TokenData over token ids already in memory or in a memmap (1-D, integer), with no data dir.

            data = TokenData.from_tokens(np.memmap("train.bin", dtype=np.uint16, mode="r"), vocab_size=8192)
            x, y = data.get_batch(16, 128, "cpu")

        vocab_size bounds the ids (default: the largest id + 1, which reads the whole stream once); block_size,
        when given, must be shorter than the stream. The ids are used as they are: a memmap stays one, no copy.
        """
        ids = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"tokens must be a 1-D array of integer ids, got shape {ids.shape} dtype {ids.dtype}")
        if ids.size == 0:
            raise DataError("tokens is empty: no tokens to train on")
        if np.issubdtype(ids.dtype, np.signedinteger) and int(ids.min()) < 0:
            raise DataError(f"tokens holds the negative id {int(ids.min())}")
        vocab = int(vocab_size) if vocab_size is not None else int(ids.max()) + 1
        data = cls.__new__(cls)  # the data-dir reading in __init__ is skipped; every attribute is set here
        data.data_dir, data.split, data.tokens = None, split, ids
        data.meta = {"vocab_size": vocab, "dtype": ids.dtype.name, "tokens": {split: int(ids.size)}}
        data._check_ids(f"the {split} tokens", vocab, None, block_size)
        data.rng = np.random.default_rng(seed)
        return data

    def _check_ids(self, where: str, vocab: int, model_vocab: int | None, block_size: int | None) -> None:
        if model_vocab is not None and vocab > model_vocab:
            raise DataError(f"the data dir's tokenizer has {vocab} tokens but the model's vocab_size is "
                            f"{model_vocab}; set --vocab_size={vocab} or use a data dir built for this model")
        # A cheap sanity check on a prefix: ids beyond the vocabulary mean the wrong dtype or tokenizer.
        head = np.asarray(self.tokens[: 1 << 16])
        if head.size and int(head.max()) >= vocab:
            raise DataError(f"{where} holds token id {int(head.max())} >= vocab_size {vocab}: "
                            "the shard was written with another tokenizer or dtype; rebuild the data dir")
        if block_size is not None and len(self.tokens) <= block_size:
            raise DataError(f"{where} holds {len(self.tokens)} tokens, not more than block_size={block_size}: "
                            f"use --block_size={max(8, len(self.tokens) // 4)} or more data")

    def __len__(self) -> int:
        return len(self.tokens)

    def get_batch(self, batch_size: int, block_size: int, device: str | torch.device = "cpu",
                  rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x = tokens[i : i+T], y = tokens[i+1 : i+1+T] for batch_size random i."""
        if len(self.tokens) <= block_size:
            raise DataError(f"{self.split}.bin holds {len(self.tokens)} tokens, not more than block_size={block_size}")
        rng = rng or self.rng
        starts = rng.integers(0, len(self.tokens) - block_size, size=batch_size)
        # The int64 copy detaches the batch from the memmap so the page cache can be dropped.
        x = torch.from_numpy(np.stack([self.tokens[i : i + block_size] for i in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([self.tokens[i + 1 : i + 1 + block_size] for i in starts]).astype(np.int64))
        device = torch.device(device)
        if device.type == "cuda":
            # Pinned host memory lets the copy to the GPU run asynchronously with compute.
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def load_tokenizer(data_dir: str | Path):
    """The data dir's Hugging Face tokenizer (tokenizer.json, or the file meta.json names)."""
    from tokenizers import Tokenizer

    d = Path(data_dir)
    name = "tokenizer.json"
    if (d / "meta.json").is_file():
        name = read_meta(d).get("tokenizer", name)
    path = d / name
    if not path.is_file():
        raise DataError(f"{path} is missing: the data dir has no tokenizer; {how_to_make()}")
    return Tokenizer.from_file(str(path))


# ----------------------------------------------------------------------------- the final val loss and its baselines
# One definition, shared by minilm.train (end of training) and minilm.evaluate: every position of the whole val
# split is scored once, in non-overlapping block_size windows, and the count baselines score the same tokens.


@torch.no_grad()
def whole_split_loss(model: torch.nn.Module, tokens, block_size: int, device: str | torch.device = "cpu",
                     batch_size: int = 16, ctx=None) -> float:
    """Mean next-token loss (nats/token) of `model` over all of `tokens` (e.g. TokenData(d, "val").tokens).

    The stream is cut into non-overlapping block_size windows (metrics.perplexity with window = stride =
    block_size), so every token after the first is scored exactly once. model(ids) must return logits first.
    ctx: an autocast context to run the forward passes in (None: as the model is).
    """
    from metrics.perplexity import perplexity

    was_training = model.training
    model.eval()
    try:
        with ctx or contextlib.nullcontext():
            r = perplexity(lambda ids: model(ids)[0], np.asarray(tokens), window=block_size, stride=block_size,
                           batch_size=batch_size, device=device)
    finally:
        model.train(was_training)
    return r.nll


def baseline_losses(data_dir: str | Path, vocab_size: int | None = None) -> dict:
    """Add-k unigram and bigram losses (nats/token) counted on the whole train split, scored on the whole val split.

    k is tuned on held-out training text (metrics.baselines.fit_add_k). The numbers are cached in
    data_dir/baselines.json, keyed by meta.json, so a rebuilt data dir is counted again.
    Returns {"unigram": {"val_loss", "k"}, "bigram": {"val_loss", "k"}}.
    """
    from metrics.baselines import bigram_perplexity, fit_add_k, unigram_perplexity

    d = Path(data_dir)
    meta_text = (d / "meta.json").read_text()
    key = hashlib.sha256(f"{meta_text}|{vocab_size}".encode()).hexdigest()
    cache = d / "baselines.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return {name: cached[name] for name in ("unigram", "bigram")}
    except (OSError, ValueError, KeyError):
        pass
    vocab = vocab_size or json.loads(meta_text)["vocab_size"]
    train = np.asarray(TokenData(d, "train").tokens, dtype=np.int64)
    val = np.asarray(TokenData(d, "val").tokens, dtype=np.int64)
    k1, k2 = fit_add_k(train, vocab, 1), fit_add_k(train, vocab, 2)
    out = {"unigram": {"val_loss": unigram_perplexity(train, val, vocab, k=k1).nll, "k": k1},
           "bigram": {"val_loss": bigram_perplexity(train, val, vocab, k=k2).nll, "k": k2}}
    from minilm.checkpoint import atomic_write

    try:
        atomic_write(json.dumps({"key": key, **out}, indent=1), cache)
    except OSError:
        pass  # a read-only data dir: count again next time
    return out
