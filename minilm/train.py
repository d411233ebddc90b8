"""Train a GPT on a data dir.

    python -m minilm.train                                  # tiny on CPU, mini_lm on CUDA
    python -m minilm.train --preset=small --max_iters=2000 --dtype=bfloat16
    python -m minilm.train --config configs/tiny.yaml --resume
    torchrun --standalone --nproc_per_node=4 -m minilm.train --preset=mini_lm

train() reads in three phases, each in its own module: the set-up (minilm.run_setup: device, data, model,
optimizers; on --resume the rules of minilm.resume), the loop (minilm.loop: micro-batches, skip a non-finite loss,
clip, update, EMA, evaluation and checkpoints), and the end here (a final val loss over the whole val split
beside counting baselines, the learning curve, the summary).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import time
from pathlib import Path

import torch

from minilm.checkpoint import CheckpointError, atomic_write
from minilm.config import ConfigError, RunConfig, parse_args
from minilm.data import DataError, baseline_losses, whole_split_loss
from minilm.device import resolve_dtype, setup_distributed
from minilm.loop import TrainingAborted, ema_weights, estimate_loss, record, run_loop
from minilm.optim import get_lr
from minilm.resume import RESUME_SOURCE, resume_config
from minilm.run_setup import TrainProgress, TrainRun, count_params, set_up

__all__ = ["RESUME_SOURCE", "TrainingAborted", "estimate_loss", "get_lr", "main", "plot_curves", "resolve_dtype",
           "resume_config", "set_up", "setup_distributed", "train"]

log = logging.getLogger("minilm.train")


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, so notebooks keep inline plots

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss (per log step)", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"Learning curve: {metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(buf.getvalue(), png_path)


def final_losses(run: TrainRun) -> dict:
    """Val loss over the whole val split (non-overlapping block_size windows) beside count baselines (rank 0)."""
    t, m = run.cfg.train, run.cfg.model
    out = {"final_val_loss": whole_split_loss(run.raw_model, run.val_data.tokens, m.block_size, run.device,
                                              batch_size=t.batch_size, ctx=run.ctx)}
    base = baseline_losses(Path(t.data_dir), run.meta["vocab_size"])
    out["bigram_val_loss"], out["unigram_val_loss"] = base["bigram"]["val_loss"], base["unigram"]["val_loss"]
    return out


def weights_digest(run: TrainRun) -> str:
    digest = hashlib.sha256()
    for p in list(run.raw_model.parameters()) + (run.ema or []):
        digest.update(p.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def end_of_run(run: TrainRun, progress: TrainProgress) -> dict:
    """The result of a run: final losses over the whole val split (rank 0), the curve, the summary in the log,
    and under DDP the check that every rank holds the same weights."""
    t = run.cfg.train
    if progress.stopped_by == "interrupted":
        log.info(f"interrupted at step {progress.step}: saved {run.out_dir / 'ckpt.pt'}. Continue with: python -m "
                 f"minilm.train --out_dir={run.out_dir} --resume (plus the same options as this run)")
    result = {"step": progress.step, "best_val_loss": progress.best_val, "stopped_by": progress.stopped_by,
              "n_params": count_params(run.raw_model), **progress.last_eval}
    if run.master and progress.stopped_by != "interrupted" and t.final_eval:
        t0 = time.perf_counter()
        with ema_weights(run.raw_model, run.ema):
            result.update(final_losses(run))
        record(run, {"step": progress.step, **{k: result[k] for k in ("final_val_loss", "bigram_val_loss",
                                                                      "unigram_val_loss")}})
        log.info(f"final: val loss {result['final_val_loss']:.3f} | bigram {result['bigram_val_loss']:.3f} | "
                 f"unigram {result['unigram_val_loss']:.3f} (nats/token over all {len(run.val_data):,} val tokens; "
                 f"{time.perf_counter() - t0:.1f} s)")
    if run.master and run.metrics_path.exists():
        plot_curves(run.metrics_path, run.out_dir / "learning_curve.png")
    last = progress.last_eval
    if run.master and last:
        log.info(f"done at step {progress.step}: val loss {last['val_loss']:.4f}, val perplexity "
                 f"{last['val_ppl']:.2f} (best val loss {progress.best_val:.4f})")
        log.info(f"checkpoints: {run.out_dir / 'ckpt.pt'} (last), {run.out_dir / 'ckpt_best.pt'} (best); "
                 f"curve: {run.out_dir / 'learning_curve.png'}")
        if last.get("sample"):
            log.info("sample:\n" + last["sample"])
    if run.world > 1:
        # DDP's promise, checked: every rank ends with bit-identical weights (and EMA weights).
        digests = [None] * run.world
        torch.distributed.all_gather_object(digests, weights_digest(run))
        result["ranks_identical"] = len(set(digests)) == 1
        log.info(f"weights on all {run.world} ranks identical: {result['ranks_identical']} "
                 f"(sha256 {digests[0][:16]})")
        torch.distributed.destroy_process_group()
    return result


def train(cfg: RunConfig, why: str = "", model: torch.nn.Module | None = None) -> dict:
    """Run training to max_iters (or early stop / a stop signal); returns the final metrics.

    model: your own nn.Module instead of GPT(cfg.model), with forward(idx, targets) -> (logits, loss);
    it is sampled from at evals only if it has .generate.
    """
    run, progress = set_up(cfg, why, model)
    run_loop(run, progress)
    return end_of_run(run, progress)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, why = parse_args(argv)
        result = train(cfg, why)
    except (ConfigError, DataError, CheckpointError, TrainingAborted) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, nothing saved since the last checkpoint
        print("\ninterrupted twice: stopped without saving", file=sys.stderr)
        return 130
    return 130 if result["stopped_by"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
