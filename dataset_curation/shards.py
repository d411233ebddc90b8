"""Stages 9 and 10: train the byte-level BPE tokenizer (Hugging Face `tokenizers`) and write the token shards.

Shards are flat arrays of token ids, one file per split, with EOT after every document. They are written chunk by
chunk (a few MB of text at a time, encoded by num_proc worker processes), so the corpus's tokens are never all in
memory, and land under their final name only when complete.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset_curation.files import atomic_open

EOT = "<|endoftext|>"


def mp_context():
    """fork on Linux (cheap, no re-import); spawn elsewhere, where fork is unsafe or missing."""
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None,
                    progress: bool = False):
    """A byte-level BPE tokenizer (any text encodes, decode(encode(t)) == t) with EOT as its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens + EOT")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def dtype_for(vocab_size: int) -> str:
    """uint16 when every id fits (vocab_size <= 65,535 keeps the largest id at 65,534), else uint32."""
    return "uint16" if vocab_size <= 65535 else "uint32"


def _chunks(texts: list[str], max_chars: int = 2_000_000) -> Iterator[list[str]]:
    batch, size = [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_worker_tok = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tok
    from tokenizers import Tokenizer

    _worker_tok = Tokenizer.from_file(tokenizer_path)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in _worker_tok.encode_batch(texts)]


def write_split(texts: list[str], path: Path, tokenizer_path: Path, eot_id: int, dtype: str, num_proc: int = 1,
                progress: bool = False, desc: str = "tokenize", max_tokens: int | None = None) -> np.ndarray:
    """Encode texts (EOT after each) into the flat token file `path`; returns tokens per written document
    (incl. its EOT). With max_tokens, stops after the document that reaches it (never inside a document)."""
    counts: list[int] = []
    total = 0
    bar = tqdm(total=len(texts), desc=desc, unit="doc", disable=not progress, leave=False)
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    pool = None
    try:
        if num_proc > 1:
            # the parent's tokenizer threads are not inherited by forked workers: they run single-threaded
            ctx = mp_context()
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            pool = ctx.Pool(num_proc, _init_worker, (str(tokenizer_path),))
            encoded = pool.imap(_encode_chunk, _chunks(texts))
        else:
            _init_worker(str(tokenizer_path))
            encoded = map(_encode_chunk, _chunks(texts))
        with atomic_open(path) as f:  # a failure (e.g. an id too large for dtype) leaves neither file behind
            for ids in encoded:
                flat: list[int] = []
                for doc in ids:
                    flat.extend(doc)
                    flat.append(eot_id)
                    counts.append(len(doc) + 1)
                    total += len(doc) + 1
                    if max_tokens is not None and total >= max_tokens:
                        break
                np.asarray(flat, dtype=dtype).tofile(f)
                bar.update(len(ids))
                if max_tokens is not None and total >= max_tokens:
                    break
    finally:
        if pool is not None:
            pool.terminate()
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
        bar.close()
    return np.array(counts, dtype=np.int64)
