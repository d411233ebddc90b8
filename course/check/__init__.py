"""Self-checks for the course exercises: your function next to the reference, on fresh random inputs.

    from course import check
    assert check.attention(my_attention)     # prints PASS or FAIL with the input, what was expected and what came out
    check.hint("attention")                  # the idea and the invariant to check; check.hint("attention", 2): more

Every check draws new random inputs each time it runs (the seed is printed, pass `seed=` to repeat one), runs
your code and the reference on them, and returns a Result that is truthy when your code agreed everywhere. The
verdict is appended to a log (out/course/checks.jsonl in the repository, or $COURSE_LOG) that
`python -m course status` reads to mark tasks done. While your function runs, the reference (the package's
version and torch's own) is watched: a pass that called it is logged as the reference's and does not count.

The notebooks ship every exercise as a stub that raises NotImplementedError. A check handed a stub says "not
implemented yet" (nothing is logged, the notebook goes on) and `check.pick(result, yours, reference)` hands the
following cells the reference until yours passes. With COURSE_STRICT=1 (the solution run in CI) any check that
does not pass raises AssertionError, so a notebook run fails on it.

One module per topic (attention, norms, model, optim, training, sampling, amp, metrics, curation, tokenization,
decontamination, scaling, stack: the learner's training stack, ablation: their own ablation)
over a shared harness (course/check/_harness.py, whose docstring says how to write a check).
"""

from course.check._harness import Result, hint, log_path, pick, read_log, salted_hash_calls, watching
from course.check.ablation import ablation
from course.check.amp import loss_scaler
from course.check.attention import attention, causal_self_attention, rope
from course.check.baselines import addk_bigram, bootstrap_ci
from course.check.curation import band_cost, best_bands, choose_bands, clusters, dup_lines, lsh_candidates, minhash
from course.check.decontamination import decontaminate
from course.check.distributed import ddp_all_reduce
from course.check.flash import flash_attention
from course.check.generate import generate
from course.check.memory import activation_checkpoint
from course.check.metrics import _all_targets_ppl, bleu, perplexity, rouge
from course.check.model import MODERN_RECIPES, block, cross_entropy, gpt, mlp
from course.check.norms import layer_norm, rms_norm
from course.check.optim import adamw, clip_grad_norm, lr_schedule
from course.check.reference import reference
from course.check.sampling import filtered_probs, sampling
from course.check.scaling import scaling_fit
from course.check.stack import (
    adamw_optimizer,
    checkpoint_resume,
    get_batch,
    muon,
    newton_schulz,
    optimizer_groups,
    train_loop,
)
from course.check.tokenization import bpe, bpe_encode, bpe_incremental
from course.check.training import accumulate, overfit

__all__ = [
    "ablation", "accumulate", "activation_checkpoint", "adamw", "adamw_optimizer", "addk_bigram", "_all_targets_ppl",
    "attention",
    "band_cost", "best_bands", "bleu", "block", "bootstrap_ci", "bpe", "bpe_encode", "bpe_incremental",
    "causal_self_attention", "checkpoint_resume", "choose_bands", "clip_grad_norm", "clusters", "cross_entropy",
    "ddp_all_reduce", "decontaminate", "dup_lines", "filtered_probs", "flash_attention", "generate", "get_batch", "gpt",
    "hint", "layer_norm", "log_path", "loss_scaler", "lr_schedule", "lsh_candidates", "minhash", "mlp",
    "MODERN_RECIPES", "muon", "newton_schulz", "optimizer_groups", "overfit", "perplexity", "pick", "read_log",
    "reference", "Result", "rms_norm", "rope", "rouge", "salted_hash_calls", "sampling", "scaling_fit", "train_loop",
    "watching",
]
