"""Generate text from a trained run.

    python -m minilm.sample --out_dir out/tiny --prompt "def " --max_new_tokens 200 --temperature 0.8 --top_k 50
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from minilm.checkpoint import CheckpointError, model_from_checkpoint
from minilm.data import DataError, load_tokenizer
from minilm.device import pick_device  # lives in minilm.device; importable from here as before
from minilm.inference import CompilerMissing, check_sampling_args, generate_stream
from minilm.quantize import WEIGHTS, use_weights


def load_run(out_dir: str | Path, device: str = "cpu", data_dir: str | Path | None = None, best: bool = False,
             weights: str = "fp32"):
    """(model, tokenizer, checkpoint) for a run dir; the tokenizer is the run's copy, else its data dir's.

    weights "bf16", "int8" or "w8a8" converts the model for faster generation (see minilm.quantize).
    """
    out_dir = Path(out_dir)
    path = out_dir / ("ckpt_best.pt" if best else "ckpt.pt") if out_dir.is_dir() else out_dir
    model, ckpt = model_from_checkpoint(path, device)
    model = use_weights(model, weights)
    # train copies the tokenizer into the run dir, so a run is self-contained
    has_copy = (path.parent / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(path.parent if has_copy else data_dir or ckpt["config"]["train"]["data_dir"])
    return model, tokenizer, ckpt


def encode_prompt(tokenizer, prompt: str, model, eos_id: int | None) -> list[int]:
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    ids = tokenizer.encode(prompt).ids
    if not ids:
        if eos_id is None:
            raise ValueError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [eos_id]  # an empty prompt starts a fresh document
    if len(ids) > model.config.block_size:
        ids = ids[-model.config.block_size :]
    return ids


def eos_of(tokenizer, ckpt: dict | None = None) -> int | None:
    meta = (ckpt or {}).get("meta") or {}
    if meta.get("eot_id") is not None:
        return int(meta["eot_id"])
    return tokenizer.token_to_id("<|endoftext|>")


class TextStream:
    """Sampled token ids in, text pieces out; the pieces only ever extend the text.

    Bytes of a partial UTF-8 character, and a tail that could be the start of a stop string, are held back
    until known. `done` turns True at eos_id or when a stop string appears (the stop string is not included).
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, eos_id: int | None = None):
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.new: list[int] = []
        self.sent = 0  # characters already handed out
        self.done = False

    def push(self, token: int) -> str:
        """The text that became final with this token ("" when none did)."""
        if self.done:
            return ""
        if self.eos_id is not None and token == self.eos_id:
            return self.finish()
        self.new.append(token)
        text = self.tokenizer.decode(self.new)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.done = True
            return text[self.sent : cut] if cut > self.sent else ""
        ready = len(text) - self.hold  # a stop string could still begin in the last `hold` characters
        if ready <= self.sent:
            return ""
        piece, self.sent = text[self.sent : ready], ready
        return piece

    def finish(self) -> str:
        """The held-back rest, once no more tokens will come."""
        if self.done:
            return ""
        self.done = True
        text = self.tokenizer.decode(self.new)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        return text[self.sent : cut] if cut > self.sent else ""


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                top_k: int | None = 50, top_p: float | None = None, repetition_penalty: float = 1.0,
                seed: int | None = None, stop: list[str] | None = None, eos_id: int | None = None,
                device: str | None = None, stats: dict | None = None, compile: bool = False) -> Iterator[str]:
    """Yield the continuation's text piece by piece as tokens are sampled (one forward pass per token).

    Pieces only ever extend the text (see TextStream). Generation ends at eos_id, after max_new_tokens, or when
    a stop string appears (not included). If `stats` is given, stats["completion_tokens"] counts the sampled
    tokens. compile=True decodes with the compiled step (minilm.inference.compiled).
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, model.config.vocab_size,
                        eos_id)
    device = device or next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, model, eos_id)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    stats = stats if stats is not None else {}
    stats["prompt_tokens"], stats["completion_tokens"] = len(ids), 0
    text = TextStream(tokenizer, stop, eos_id)
    for tok in generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                               eos_id, seed, compile=compile):
        stats["completion_tokens"] += 1
        piece = text.push(int(tok[0]))
        if piece:
            yield piece
        if text.done:
            return
    piece = text.finish()
    if piece:
        yield piece


def generate_text(model, tokenizer, prompt: str, **kwargs) -> dict:
    """Whole continuation plus counts and timings: {"text", "prompt_tokens", "completion_tokens", ...}."""
    t0 = time.perf_counter()
    first = None
    pieces = []
    stats: dict = {}
    for piece in stream_text(model, tokenizer, prompt, stats=stats, **kwargs):
        first = first or time.perf_counter()
        pieces.append(piece)
    dt = time.perf_counter() - t0
    n_new = stats.get("completion_tokens", 0)
    return {
        "text": "".join(pieces),
        "prompt_tokens": stats.get("prompt_tokens", 0),
        "completion_tokens": n_new,
        "time_to_first_token_s": (first - t0) if first else None,
        "total_time_s": dt,
        "tokens_per_s": n_new / dt if dt > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Sample text from a minilm run")
    p.add_argument("--out_dir", required=True, help="run directory holding ckpt.pt")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data_dir", default=None, help="override the data dir the run was trained on")
    p.add_argument("--best", action="store_true", help="use ckpt_best.pt instead of the last checkpoint")
    p.add_argument("--weights", default="fp32", choices=WEIGHTS,
                   help="weight format for generation: bf16 or int8 read 2x or ~4x fewer bytes per token; "
                        "w8a8 also rounds activations to int8 (the fastest on x86 CPUs)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd step: faster per token after a first call that compiles "
                        "(tens of seconds on a CPU; needs a C++ compiler there)")
    a = p.parse_args(argv)
    try:
        model, tok, ckpt = load_run(a.out_dir, pick_device(a.device), a.data_dir, a.best, a.weights)
        eos = eos_of(tok, ckpt)
        for i in range(a.num_samples):
            print(f"--- sample {i + 1} (step {ckpt.get('step')}) ---")
            print(a.prompt, end="", flush=True)
            for piece in stream_text(model, tok, a.prompt, a.max_new_tokens, a.temperature, a.top_k or None,
                                     a.top_p, a.repetition_penalty, a.seed + i, a.stop, eos,
                                     compile=a.compile):
                print(piece, end="", flush=True)
            print()
    except (CheckpointError, DataError, ValueError, CompilerMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
