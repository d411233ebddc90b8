# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/llm-course/llm-training-from-scratch/blob/main/notebooks/week18/06_evaluation.ipynb)
#
# # Week 18 · 06 — Evaluating the model
#
# `minilm.evaluate` turns a run into a report: validation perplexity and bits per byte, the counting baselines, a
# code-completion task (`metrics.completion`) with cluster-bootstrap intervals, generation metrics and decoding
# speed.
# Day 12 of the course ([week18.md](../../course/week18.md)).

# %%
# Setup. On Colab only: clone the course repository and install it (Colab's own torch is kept, never
# replaced). Locally, install once with `pip install -e ".[dev]"` from the repository root (see README).
import os
import subprocess
import sys
from pathlib import Path

if "google.colab" in sys.modules:
    if not Path("/content/llm-training-from-scratch").is_dir():
        subprocess.run(["git", "clone", "--depth", "1", "https://github.com/llm-course/llm-training-from-scratch", "/content/llm-training-from-scratch"],
                       check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/llm-training-from-scratch[metrics,serve]"],
                       check=True)
    os.chdir("/content/llm-training-from-scratch/notebooks/week18")
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the packages import even without an editable install
print("repository:", ROOT)

# %%
FAST = True  # True: small and quick on a 2-core CPU, downloads nothing. False: the full run (use a GPU).
SEED = 0

import random

import matplotlib.pyplot as plt
import numpy as np
import torch

random.seed(SEED)
np.random.seed(SEED)
torch.manual_seed(SEED)
if FAST:  # the Hugging Face libraries fail at once instead of trying the network
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# %matplotlib inline
from course.nb import show  # displays the current figure inline, even after a package switched matplotlib to Agg

print(f"FAST={FAST}, device={DEVICE}, torch {torch.__version__}")

# %%
from course import nb
from minilm.evaluate import evaluate

run_dir = nb.trained_run(FAST)  # the run from notebook 05 (trained now if it is missing)
# 40 prompts: enough source files that a cluster bootstrap differs from a per-example one (section 2)
kwargs = dict(max_tokens=4_000, num_prompts=40, max_train_tokens=400_000, speed_tokens=32) if FAST else {}
results = evaluate(run_dir, **kwargs)
print("wrote", sorted(p.name for p in run_dir.glob("eval*")), f"in {results['seconds']:.0f} s")
print("sections:", list(results))

# %% [markdown]
# ## 1. Perplexity against the baselines
#
# The first question is whether the transformer beats counting. Bits per byte makes runs with different
# tokenizers comparable. (In `FAST` mode a 0.14M-parameter model has trained for 500 steps: it beats both add-k
# baselines and ends near the Kneser-Ney 5-gram, `results["baselines"]["kn_full"]`; the `mini_lm` run should beat
# all three by a wide margin.)

# %%
ppl, base = results["perplexity"], results["baselines"]
table = {"unigram (add-k)": base["unigram"], "bigram (add-k)": base["bigram"],
         "GPT, non-overlapping": ppl["non_overlapping"], "GPT, sliding window": ppl["sliding"]}
for name, r in table.items():
    print(f"{name:22s} perplexity {r['perplexity']:9.2f}   bits/byte {r['bits_per_byte']:.3f}")
fig, ax = plt.subplots(1, 2, figsize=(11, 3))
ax[0].barh(list(table), [r["bits_per_byte"] for r in table.values()], color=["C0", "C1", "C2", "C3"])
ax[0].set_xlabel("bits per byte (lower is better)")
ax[1].plot(results["loss_by_position"])
ax[1].set_xlabel("position in the context window"); ax[1].set_ylabel("mean loss")
ax[1].set_title("loss by position: falls once the model uses its context")
show()

# %% [markdown]
# ### Your own baseline: an add-k bigram
#
# A model earns its keep only against the simplest thing that counts. Write the add-k bigram: count the adjacent
# pairs of `train_ids`, smooth with P(b | a) = (c(a,b) + k) / (c(a) + k·V), choose k from `ks` by the loss on
# `heldout_ids` (never on the eval split: that would tune the baseline on the test), and report the mean negative
# log-likelihood (nats per token) over the pairs inside `eval_ids`. With V in the tens of thousands a V×V table
# does not fit: keep the pair counts sparse.

# %%
from course import check

# %%
# YOUR CODE: my_addk_bigram
def my_addk_bigram(train_ids, heldout_ids, eval_ids, vocab_size, ks):
    """(best k by the held-out loss, eval loss in nats/token) of an add-k bigram counted on train_ids."""
    raise NotImplementedError("count pairs c(a, b) and contexts c(a) on train; for each k the mean -log P over the "
                              "held-out pairs; score eval with the best k")


# %%
r_addk = check.addk_bigram(my_addk_bigram)
addk_bigram = check.pick(r_addk, my_addk_bigram)

# %% [markdown]
# Now put it beside a real run: your task-4 run in `out/my_run` when it exists, else this notebook's run. Both
# numbers are nats per token over the whole validation split of the run's data dir. The bigram counts on the first
# 90% of the training tokens and fits k on the last 10%.

# %%
import json

import yaml

from course.status import resolve  # a path relative to the repository root, as the run recorded it
from minilm.data import TokenData, read_meta


def run_val_loss(out: Path) -> float:
    """The run's loss over its whole val split (the final row of metrics.jsonl), else its last periodic val loss."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r["final_val_loss"] for r in rows if "final_val_loss" in r]
    return final[-1] if final else [r["val_loss"] for r in rows if "val_loss" in r][-1]


mine = resolve("out/my_run")  # task 4: your own loop's run
base_run = mine if (mine / "ckpt.pt").is_file() and (mine / "metrics.jsonl").is_file() else run_dir
saved = yaml.safe_load((base_run / "config.yaml").read_text())  # minilm.train nests it under train; my_train: flat
run_data = resolve(saved["train"]["data_dir"] if "train" in saved else saved["data_dir"])
train_ids = np.asarray(TokenData(run_data, "train").tokens, dtype=np.int64)
val_ids = np.asarray(TokenData(run_data, "val").tokens, dtype=np.int64)
cut = int(0.9 * len(train_ids))
ks = [1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001]
best_k, bigram_val = addk_bigram(train_ids[:cut], train_ids[cut:], val_ids, read_meta(run_data)["vocab_size"], ks)
model_val = run_val_loss(base_run)
print(f"run {base_run.name} on {run_data.name}: "
      f"{len(train_ids):,} train, {len(val_ids):,} val tokens")
print(f"  {f'your add-k bigram (k={best_k:g})':28s} val loss {bigram_val:.4f} nats/token")
print(f"  {'the run' + chr(39) + 's model':28s} val loss {model_val:.4f} nats/token  "
      f"({'beats' if model_val < bigram_val else 'does not beat yet'} the bigram by {bigram_val - model_val:+.4f})")

# %% [markdown]
# ## 2. The code-completion task
#
# The prompts are built from Python files of the validation split only, in two kinds. A **function** example gives
# the decorators, signature and docstring; the answer is the body, and it ends where a line returns to column 0.
# A **line** example gives 8 lines of code; the answer is the next line, and it ends at its first newline. An example
# is dropped when its prompt (or a function body of 3+ lines) also occurs in a training file, or when the reference
# does not fit the token cap (`caps`: new tokens per kind). Every system decodes greedily under the same stop rules:
# the model, Kneser-Ney counted on the whole train split (`kn_full`) and on the tokens the model saw (`kn_seen`),
# the bigram and the unigram. Scores: exact match, edit similarity, BLEU and ROUGE-L over code tokens, chrF, and
# whether prompt + answer parses (`ast_valid`), each with a 95% interval that resamples the source files. The
# default run takes up to 360 prompts (160 of them functions); `FAST` takes 40, all functions. Compare the model
# with the baselines on the same prompts, not with 100: a short run rarely gets a body exactly right.

# %%
t = results["task"]
print(f"{t['prompts']} prompts from {t.get('documents', 0)} validation files; token caps {t['caps']}")
for kind, n in t["counts"].items():
    print(f"  {kind:8s} {n['candidates']} candidates, dropped: prompt in train {n['prompt_in_train']}, body in "
          f"train {n['body_in_train']}, too long {n['too_long']}; chosen {n.get('chosen', 0)}")
shown = ["exact", "edit_sim", "bleu", "chrf", "rougeL", "ast_valid"]
print(f"{'':9s}" + "".join(f"{m:>24s}" for m in shown))
for name, sys_ in t.get("systems", {}).items():
    a = sys_["all"]
    cells = [f"{a[m]['value']:.3g} [{a[m]['low']:.3g}, {a[m]['high']:.3g}]" if a.get(m) else "-" for m in shown]
    print(f"{name:9s}" + "".join(f"{c:>24s}" for c in cells))
for ex in results["examples"][:2]:
    print("\n--- prompt ---\n" + ex["prompt"][-200:])
    print("--- reference ---\n" + ex["reference"][:200])
    print("--- model, cut by the stop rule ---\n" + ex["greedy"][:200])

# %% [markdown]
# ### Your own interval: a cluster bootstrap
#
# The completion task's prompts come from a few validation files, and one file's prompts succeed or fail together,
# so the examples are not independent. Write the percentile cluster bootstrap of a mean: draw as many clusters as
# there are, with replacement, keep every example of each drawn cluster, take the mean of those examples, and return
# the `alpha/2` and `1 - alpha/2` percentiles of `n_resamples` such means.

# %%
# YOUR CODE: my_bootstrap_ci
def my_bootstrap_ci(values, clusters, n_resamples, seed, alpha):
    """(low, high): percentile cluster-bootstrap interval of mean(values); clusters[i] is example i's cluster."""
    raise NotImplementedError("per cluster: sum and count; resample cluster indices with replacement; mean = drawn "
                              "sums / drawn counts; percentiles")


# %%
r_boot = check.bootstrap_ci(my_bootstrap_ci)
bootstrap_ci = check.pick(r_boot, my_bootstrap_ci)

# %% [markdown]
# Applied to the model's per-example edit similarity in `eval_examples.jsonl`, with the source file (`doc`) as the
# cluster, next to the interval `minilm.evaluate` reported. The per-example interval (every example its own
# cluster) is shown too: it is narrower, and wrongly so when a file's examples move together.

# %%
ex_rows = [json.loads(line) for line in (run_dir / "eval_examples.jsonl").read_text().splitlines() if line.strip()]
sims = [r["model"]["edit_sim"] for r in ex_rows]
docs = [r["doc"] for r in ex_rows]
theirs = results["task"]["systems"]["model"]["all"]["edit_sim"]
ours = bootstrap_ci(sims, docs, 1000, SEED, 0.05)
iid = bootstrap_ci(sims, list(range(len(sims))), 1000, SEED, 0.05)
print(f"edit similarity of the model over {len(sims)} prompts from {len(set(docs))} files: {np.mean(sims):.3f}")
print(f"  yours, by file          [{ours[0]:.3f}, {ours[1]:.3f}]")
print(f"  minilm.evaluate's       [{theirs['low']:.3f}, {theirs['high']:.3f}]")
print(f"  yours, by example       [{iid[0]:.3f}, {iid[1]:.3f}]  (ignores the clusters)")

# %% [markdown]
# ## 3. Generated text: diversity, loops, copying
#
# Generation metrics of the model's task answers (greedy, after the stop rule), next to the same metrics of the
# references. `copy_rate` is the share of answers that repeat 16+ training tokens verbatim (memorisation).

# %%
g = results["generation"]
kinds = [k for k in g if isinstance(g[k], dict)]
fields = ["distinct_1", "distinct_2", "repetition_4", "self_bleu", "copy_rate"]
print(f"{'':24s}" + "".join(f"{f:>14s}" for f in fields))
for k in kinds:
    print(f"{k:24s}" + "".join(f"{g[k][f]:14.3f}" for f in fields))
sp = results["speed"]
print(f"\nspeed: {sp['tokens_per_s']:.0f} tokens/s, first token {sp['time_to_first_token_ms']:.0f} ms, "
      f"{sp['ms_per_token']:.1f} ms/token")

# %% [markdown]
# ## 4. The report
#
# `eval.md` and its dashboard figure `eval_dashboard.png` put it all on one page:

# %%
from IPython.display import Image, Markdown, display

png = run_dir / "eval_dashboard.png"
if png.is_file():
    display(Image(filename=str(png)))
display(Markdown((run_dir / "eval.md").read_text()[:3000]))

# %% [markdown]
# **Task 5** (first half): run `python -m minilm.evaluate --out_dir out/<your run>` on your project run and
# compare it with the tiny run and the baselines in a table of your own. `python -m course status` then finds
# `eval.json`. The cell below does it for your task-4 run, `out/my_run`, with this notebook's settings.

# %%
mine = resolve("out/my_run")
if (mine / "ckpt.pt").is_file():
    my_eval = evaluate(mine, **kwargs)
    print(f"{mine.relative_to(ROOT)}: val perplexity {my_eval['perplexity']['non_overlapping']['perplexity']:.1f}, "
          f"wrote {sorted(p.name for p in mine.glob('eval*'))}")
else:
    print("no out/my_run yet: train it in notebook 05 (section 4b), then run this cell again")

# %% [markdown]
# Next: [07_serving.ipynb](07_serving.ipynb).
