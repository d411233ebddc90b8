"""What the notebooks share: the repository root, a scratch dir, a data dir and a trained run for FAST or full mode.

    from course import nb
    data_dir = nb.data_dir(FAST)            # FAST: a small stdlib subset under out/nb/; else data/installed-32k
    run_dir = nb.trained_run(FAST)          # FAST: a tiny model trained for 500 steps (~30 s); else out/mini_lm

Both are cached: a notebook that finds the data dir or a run with the same config reuses it, so the week's
notebooks build them once. Everything FAST mode writes goes under out/nb/ (gitignored).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FAST_FILES = 120  # stdlib modules in the FAST data dir: enough text for a tokenizer and a tiny model
FAST_VOCAB = 512  # small: a tiny model learns its statistics in a few hundred steps


def repo_root() -> Path:
    """The repository root: the nearest folder above the working directory (or this file) with pyproject.toml."""
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for p in (start, *start.parents):
            if (p / "pyproject.toml").is_file() and (p / "minilm").is_dir():
                return p
    return Path.cwd()


def scratch(name: str = "") -> Path:
    """out/nb/<name> in the repository (created): where FAST mode writes."""
    p = repo_root() / "out" / "nb" / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def data_dir(fast: bool = True, vocab_size: int | None = None) -> Path:
    """A data dir to train on. FAST: a subset of the built-in corpus (a few seconds); else the installed-packages
    corpus the small and mini_lm presets train on (data/installed-32k: the standard library plus the licence-checked
    installed packages)."""
    if fast:
        out = repo_root() / "out" / "nb" / "data-fast"
        recipe = {"recipe": "builtin", "vocab_size": vocab_size or FAST_VOCAB, "max_files": FAST_FILES,
                  "val_fraction": 0.1}  # a bigger validation share: a small corpus still gets ~100k val tokens
    else:
        vocab_size = vocab_size or 32000
        out = repo_root() / "data" / ("installed-32k" if vocab_size == 32000 else f"installed-{vocab_size}")
        recipe = {"recipe": "installed", "vocab_size": vocab_size}
    if (out / "meta.json").is_file():
        return out
    from dataset_curation.pipeline import build

    kw = {k: v for k, v in recipe.items() if k != "recipe"}
    return Path(build(recipe=recipe["recipe"], out=out, num_proc=2, progress=True, **kw))


def run_config(fast: bool = True, data: Path | None = None, **overrides):
    """The RunConfig the notebooks train: a 0.14M-parameter model for FAST, the mini_lm preset otherwise."""
    from minilm.config import apply_overrides, get_preset

    data = data or data_dir(fast)
    if fast:
        cfg = get_preset("tiny")
        apply_overrides(cfg, {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "batch_size": 16,
                              "max_iters": 500, "lr_decay_iters": 500, "warmup_iters": 20, "lr": 1e-2, "min_lr": 1e-3,
                              "eval_interval": 100, "eval_iters": 5, "log_interval": 25, "sample_tokens": 24,
                              "tensorboard": True, "progress": True, "seed": 0})
    else:
        cfg = get_preset("mini_lm")
    from minilm.data import read_meta

    # The data dir decides the vocabulary (training does the same), so the config matches the checkpoint's.
    apply_overrides(cfg, {"data_dir": str(data), "vocab_size": read_meta(data)["vocab_size"], **overrides})
    if "out_dir" not in overrides:
        key = hashlib.sha1(json.dumps(cfg.to_dict()["model"] | {"it": cfg.train.max_iters, "lr": cfg.train.lr,
                                                                  "data": cfg.train.data_dir},
                                      sort_keys=True).encode()).hexdigest()[:8]
        out = repo_root() / "out" / ("nb" if fast else "") / (f"run-fast-{key}" if fast else "mini_lm")
        cfg.train.out_dir = str(out)
    return cfg


def trained_run(fast: bool = True, **overrides) -> Path:
    """A run dir with ckpt.pt: reused when a finished run with the same config exists, else trained now."""
    from minilm.checkpoint import load_checkpoint
    from minilm.train import train

    cfg = run_config(fast, **overrides)
    out = Path(cfg.train.out_dir)
    if (out / "ckpt.pt").is_file():
        ckpt = load_checkpoint(out)
        if ckpt.get("step") == cfg.train.max_iters and ckpt["config"]["model"] == cfg.to_dict()["model"]:
            return out
    train(cfg)
    return out


def show() -> None:
    """Display the current figure inline, even after a package switched matplotlib to Agg to save files."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    fig = plt.gcf()
    fig.tight_layout()
    display(fig)
    plt.close(fig)
