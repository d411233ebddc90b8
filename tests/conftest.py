"""Shared fixtures: a small real data dir and a briefly trained run, built once per test session."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


def stdlib_documents(limit: int = 60) -> list[str]:
    """A fixed handful of standard-library modules as documents (text every machine has)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p for p in (root / "json").glob("*.py")) + sorted((root / "email").glob("*.py"))
    names += sorted(root.glob("[a-f]*.py"))
    docs = []
    for p in names[:limit]:
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(text)
    return docs


def write_data_dir(out: Path, docs: list[str], vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on docs and write the data-dir contract (train/val split by document)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.save(str(out / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    splits = {"val": docs[::10], "train": [d for i, d in enumerate(docs) if i % 10]}
    meta = {"vocab_size": tok.get_vocab_size(), "dtype": "uint16", "eot_id": eot, "eot_token": "<|endoftext|>",
            "tokenizer": "tokenizer.json", "tokens": {}, "documents": {}, "bytes": {},
            "manifest": {"sources": ["tests: stdlib sample"], "n_docs": len(docs)}}
    for split, split_docs in splits.items():
        ids = []
        for enc in tok.encode_batch(split_docs):
            ids.extend(enc.ids)
            ids.append(eot)
        np.array(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
        meta["tokens"][split] = len(ids)
        meta["documents"][split] = len(split_docs)
        meta["bytes"][split] = sum(len(d.encode("utf-8")) for d in split_docs)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def tiny_run_config(data_dir: Path, out_dir: Path, **overrides):
    """A RunConfig small enough to train in seconds on 2 cores."""
    from minilm.config import apply_overrides, get_preset

    cfg = get_preset("tiny")
    apply_overrides(cfg, {"data_dir": str(data_dir), "out_dir": str(out_dir), "n_layer": 2, "n_head": 2,
                          "n_embd": 64, "block_size": 64, "batch_size": 8, "max_iters": 40, "lr_decay_iters": 40,
                          "warmup_iters": 5, "lr": 3e-3, "eval_interval": 20, "eval_iters": 4, "log_interval": 5,
                          "sample_tokens": 16, "progress": False, "tensorboard": False,
                          "dtype": "float32",  # auto picks bf16 on CPUs with native bf16; tests compare exact numbers
                          "optimizer": "adamw",  # the preset's modern block, with the optimizer most tests reason about
                          **overrides})
    return cfg


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("data") / "tiny", stdlib_documents())


@pytest.fixture(scope="session")
def tiny_run(tiny_data_dir, tmp_path_factory) -> Path:
    """A run dir (ckpt.pt, ckpt_best.pt, config.yaml, metrics.jsonl, tokenizer.json) of a 40-step tiny model."""
    from minilm.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_run_config(tiny_data_dir, out))
    return out
