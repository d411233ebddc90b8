"""Tokens/s of the learner's stack (course/solutions.py: MyGPT, my_optimizers, my_train) against
`python -m minilm.train` at the same shape, steps and dtype, alternating runs in one process.

    python -m course.bench_stack --data_dir data/builtin-8k --steps 60 --repeats 2

Each run's figure is the median tokens_per_s of its metrics.jsonl rows after the first (warm-up). The issue asks
the learner's loop to be within 15% of the package's on the CPU at the `tiny` shape.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch


def _rate(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return statistics.median(rates[1:] or rates)


def package_run(data_dir: str, out: Path, steps: int, dtype: str) -> float:
    from minilm.config import apply_overrides, get_preset
    from minilm.train import train

    cfg = get_preset("tiny")
    apply_overrides(cfg, {"data_dir": data_dir, "out_dir": str(out), "max_iters": steps, "lr_decay_iters": steps,
                          "eval_interval": steps, "eval_iters": 1, "log_interval": 10, "sample_tokens": 0,
                          "tensorboard": False, "progress": False, "final_eval": False, "dtype": dtype,
                          "device": "cpu"})
    train(cfg)
    return _rate(out)


def learner_run(data_dir: str, out: Path, steps: int, dtype: str) -> float:
    from course.solutions import MyGPT, my_optimizers, my_train
    from minilm.config import get_preset
    from minilm.data import read_meta

    cfg = get_preset("tiny")
    cfg.model.vocab_size = read_meta(data_dir)["vocab_size"]
    t = cfg.train
    torch.manual_seed(t.seed)
    model = MyGPT(cfg.model)
    opts = my_optimizers(model, t.lr, t.muon_lr, t.weight_decay, (t.beta1, t.beta2), t.muon_momentum)
    my_train(model, opts, data_dir, out, max_iters=steps, batch_size=t.batch_size, grad_accum=t.grad_accum, lr=t.lr,
             min_lr=t.min_lr, warmup_iters=t.warmup_iters, grad_clip=t.grad_clip, eval_interval=steps, eval_iters=1,
             log_interval=10, seed=t.seed, dtype=dtype, final_eval=False)
    return _rate(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", default="data/builtin-8k")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    a = ap.parse_args(argv)
    rates: dict[str, list[float]] = {"package": [], "learner": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench_stack_"))
    try:
        for i in range(a.repeats):  # alternate, so a change in machine load hits both
            rates["package"].append(package_run(a.data_dir, tmp / f"pkg{i}", a.steps, a.dtype))
            rates["learner"].append(learner_run(a.data_dir, tmp / f"mine{i}", a.steps, a.dtype))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pkg, mine = statistics.median(rates["package"]), statistics.median(rates["learner"])
    print(json.dumps({"steps": a.steps, "dtype": a.dtype, "threads": torch.get_num_threads(), "package_tok_s": rates[
        "package"], "learner_tok_s": rates["learner"], "ratio": mine / pkg}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
