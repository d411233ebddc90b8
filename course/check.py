"""Self-checks for the course exercises: your function next to the reference, on fresh random inputs.

    from course import check
    assert check.attention(my_attention)     # prints PASS or FAIL with the input, what was expected and what came out

Every check draws new random inputs each time it runs (the seed is printed, pass `seed=` to repeat one), runs
your code and the reference on them, and returns a Result that is truthy when your code agreed everywhere. The
verdict is appended to a log (out/course/checks.jsonl in the repository, or $COURSE_LOG) that
`python -m course status` reads to mark tasks done.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- verdicts and the log


@dataclass
class Result:
    """A check's verdict: truthy when it passed; message says what was tried and, on failure, what differed."""

    name: str
    passed: bool
    message: str
    seed: int
    uses_reference: bool = False  # the function handed in calls the reference: the pass is not the learner's

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"<check.{self.name}: {'PASS' if self.passed else 'FAIL'}>"


def log_path() -> Path:
    """Where verdicts are logged: $COURSE_LOG, else out/course/checks.jsonl at the repository root (or cwd)."""
    if os.environ.get("COURSE_LOG"):
        return Path(os.environ["COURSE_LOG"])
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():  # installed without the repository around it
        root = Path.cwd()
    return root / "out" / "course" / "checks.jsonl"


def read_log(path: str | Path | None = None) -> list[dict]:
    """All logged verdicts, oldest first; an absent log is an empty list, a damaged line is skipped."""
    p = Path(path) if path else log_path()
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _calls_reference(fn, names: set[str], objects: tuple = ()) -> bool:
    """Whether fn is one of the reference objects, or its code names one of them (the notebooks' shipped cells)."""
    if any(fn is o for o in objects):
        return True
    seen, todo = set(), [getattr(fn, "__code__", None)]
    if isinstance(fn, type):  # a class: look at the code of the methods it defines itself
        todo = [getattr(v, "__code__", None) for v in vars(fn).values()]
        if any(issubclass(fn, o) for o in objects if isinstance(o, type)) and not any(todo):
            return True  # a subclass that changes nothing
    while todo:
        code = todo.pop()
        if code is None or id(code) in seen:
            continue
        seen.add(id(code))
        if names & (set(code.co_names) | set(code.co_freevars)):  # globals, attributes and closure variables
            return True
        todo += [c for c in code.co_consts if hasattr(c, "co_names")]
    return False


def _finish(name: str, passed: bool, message: str, seed: int, log: bool, uses_reference: bool = False) -> Result:
    verdict = "PASS" if passed else "FAIL"
    if passed and uses_reference:
        message += ("\nnote: your function calls the reference implementation, so this pass is the package's: "
                    "replace it with your own code and run the check again (course status counts it then)")
    print(f"check.{name}: {verdict} (seed={seed})\n  " + message.replace("\n", "\n  "))
    if log:
        try:
            p = log_path()
            p.parent.mkdir(parents=True, exist_ok=True)
            row = {"check": name, "passed": passed, "seed": seed, "reference": uses_reference,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with open(p, "a", encoding="utf-8") as f:  # one short line per verdict: appends do not interleave
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a read-only checkout must not break the exercise
            print(f"  (could not log the verdict to {log_path()}: {e})")
    return Result(name, passed, message, seed, uses_reference)


def _seed(seed: int | None) -> int:
    return random.SystemRandom().randrange(2**31) if seed is None else int(seed)


def _crash(e: BaseException, what: str) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (line {tb[-1].lineno} in {tb[-1].name})" if tb else ""
    return f"your code raised {type(e).__name__}: {e}{where}\n  on input: {what}"


def _tensor_brief(t: torch.Tensor, n: int = 6) -> str:
    flat = t.detach().flatten()[:n].tolist()
    more = ", ..." if t.numel() > n else ""
    return "[" + ", ".join(f"{v:.5g}" for v in flat) + more + "]"


# ----------------------------------------------------------------------------- attention


def _attention_ref(q, k, v, causal=True, scale=None):
    d = q.size(-1)
    att = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(d) if scale is None else scale)
    if causal:
        t = q.size(-2)
        att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return att.softmax(dim=-1) @ v


def _attention_hint(q, k, v, got) -> str:
    """Name the usual mistake when the output matches a known wrong variant."""
    d = q.size(-1)
    variants = {
        "the causal mask is missing (each position also attends to later ones)": _attention_ref(q, k, v, False),
        "the scores are not scaled by 1/sqrt(head_dim)": _attention_ref(q, k, v, True, 1.0),
        "the scores are scaled by 1/head_dim instead of 1/sqrt(head_dim)": _attention_ref(q, k, v, True, 1.0 / d),
    }
    for hint, y in variants.items():
        if got.shape == y.shape and torch.allclose(got.float(), y, atol=1e-5, rtol=1e-4):
            return f"\n  hint: your output equals attention where {hint}."
    return ""


def attention(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(q, k, v) -> y: causal scaled dot-product attention on (B, n_head, T, head_dim) float32 tensors.

    Reference: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True); tolerance 1e-5 absolute
    plus 1e-4 relative.
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        b, h, t, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 4), (1, 5), (1, 18), (2, 17)))
        q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
        what = f"trial {trial}: q, k, v of shape (B={b}, n_head={h}, T={t}, head_dim={d}), standard normal"
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        try:
            got = fn(q.clone(), k.clone(), v.clone())
        except Exception as e:
            return _finish("attention", False, _crash(e, what), s, log)
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return _finish("attention", False, f"{what}\n  expected a tensor of shape {tuple(expected.shape)}, "
                           f"got {shape}", s, log)
        err = (got.float() - expected).abs()
        if not torch.allclose(got.float(), expected, atol=1e-5, rtol=1e-4):
            i = np.unravel_index(int(err.argmax()), err.shape)
            msg = (f"{what}\n  largest difference at [b={i[0]}, head={i[1]}, t={i[2]}, dim={i[3]}]: "
                   f"expected {float(expected[i]):.6g}, got {float(got[i]):.6g} (|diff| {float(err.max()):.3g})"
                   + _attention_hint(q, k, v, got))
            return _finish("attention", False, msg, s, log)
    return _finish("attention", True, f"{trials} random (B, n_head, T, head_dim) inputs, T from 1 to 17: "
                   "equal to scaled_dot_product_attention(is_causal=True) within 1e-5", s, log,
                   uses_reference=_calls_reference(fn, {"scaled_dot_product_attention"}))


def _csa_hint(x: torch.Tensor, attn, got: torch.Tensor) -> str:
    """Name the mistake when the output equals the layer computed with a known wrong step."""
    b, t, c = x.shape
    h, d = attn.n_head, c // attn.n_head
    with torch.no_grad():
        q, k, v = attn.c_attn(x).split(c, dim=2)
        heads = [z.view(b, t, h, d).transpose(1, 2) for z in (q, k, v)]
        right = F.scaled_dot_product_attention(*heads, is_causal=True).transpose(1, 2).reshape(b, t, c)
        no_mask = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(b, t, c)
        wrong_split = F.scaled_dot_product_attention(*[z.reshape(b, h, t, d) for z in (q, k, v)], is_causal=True)
        variants = {
            "the causal mask is missing: position t attends to later positions too": attn.c_proj(no_mask),
            "the heads are cut with reshape(B, n_head, T, head_dim); use view(B, T, n_head, head_dim).transpose(1, 2)":
                attn.c_proj(wrong_split.reshape(b, t, c)),
            "the output projection c_proj is not applied": right,
        }
    for hint, y in variants.items():
        if torch.allclose(got.float(), y, atol=1e-5, rtol=1e-4):
            return f"\n  hint: {hint}"
    return ""


def causal_self_attention(fn: Callable, trials: int = 5, seed: int | None = None, log: bool = True) -> Result:
    """fn(x, attn) -> y: the whole attention layer, written with attn's weights, for x of shape (B, T, n_embd).

    attn is a minilm.model.CausalSelfAttention in eval mode: use attn.c_attn (the q, k, v projection, in that
    order along the last dim), attn.n_head and attn.c_proj. Reference: attn(x); tolerance 1e-5 abs + 1e-4 rel.
    """
    from minilm.config import ModelConfig
    from minilm.model import CausalSelfAttention

    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    calls: list[int] = []
    for trial in range(trials):
        n_head = int(torch.randint(1, 5, (1,), generator=g))
        n_embd = n_head * int(torch.randint(2, 9, (1,), generator=g)) * 2
        bias = bool(torch.randint(0, 2, (1,), generator=g))
        b, t = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        attn = CausalSelfAttention(ModelConfig(n_embd=n_embd, n_head=n_head, bias=bias, block_size=32)).eval()
        with torch.no_grad():
            for p in attn.parameters():
                p.normal_(0.0, 0.3, generator=g)
        x = torch.randn(b, t, n_embd, generator=g)
        what = f"trial {trial}: x of shape (B={b}, T={t}, n_embd={n_embd}), n_head={n_head}, bias={bias}"
        with torch.no_grad():
            expected = attn(x)
            hook = attn.register_forward_hook(lambda *_: calls.append(1))  # notices fn calling the layer itself
            try:
                got = fn(x.clone(), attn)
            except Exception as e:
                return _finish("causal_self_attention", False, _crash(e, what), s, log)
            finally:
                hook.remove()
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return _finish("causal_self_attention", False,
                           f"{what}\n  expected a tensor of shape {tuple(expected.shape)}, got {shape}", s, log)
        if not torch.allclose(got.float(), expected, atol=1e-5, rtol=1e-4):
            err = (got.float() - expected).abs()
            tol = 1e-5 + 1e-4 * expected.abs().amax(dim=(0, 2))
            bad_t = [tt for tt in range(t) if float(err[:, tt].max()) > float(tol[tt])]
            msg = (f"{what}\n  expected y[0, {bad_t[0]}, :] = {_tensor_brief(expected[0, bad_t[0]])}\n"
                   f"  got      y[0, {bad_t[0]}, :] = {_tensor_brief(got[0, bad_t[0]])}\n"
                   f"  positions that differ: {bad_t[:10]}{' ...' if len(bad_t) > 10 else ''} of T={t}")
            variant = _csa_hint(x, attn, got)
            if variant:
                msg += variant
            elif bad_t and bad_t[0] > 0 and t > 1:
                msg += ("\n  hint: the first position is right and later ones are not: look at the causal mask "
                        "(position t may attend to 0..t only)")
            elif n_head > 1:
                msg += ("\n  hint: wrong from the first position: check the head split "
                        "(view(B, T, n_head, head_dim).transpose(1, 2)) and the merge back before c_proj")
            return _finish("causal_self_attention", False, msg, s, log)
    return _finish("causal_self_attention", True, f"{trials} random layers (1-4 heads, with and without bias) "
                   "and inputs: equal to minilm's CausalSelfAttention within 1e-5", s, log,
                   uses_reference=bool(calls))


# ----------------------------------------------------------------------------- sampling


def sampling(fn: Callable, rows: int = 512, seed: int | None = None, log: bool = True) -> Result:
    """fn(logits, temperature, top_k, top_p) -> probs: the distribution a sampler draws the next token from.

    logits is (B, vocab) float32; temperature > 0; top_k None or an int (keep the k largest logits); top_p None
    or a float in (0, 1] (keep the smallest set of most likely tokens whose probability reaches top_p, after
    temperature and top-k). Return (B, vocab) probabilities, zero for removed tokens, rows summing to 1.
    The check draws one token per row from your probabilities with torch.multinomial and from
    minilm.model.sample_next with the same random generator: equal distributions pick the same tokens.
    """
    from minilm.model import sample_next

    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    settings = [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.9), (0.9, 20, 0.6), (1.0, 1, None),
                (2.0, None, 0.3)]
    for temperature, top_k, top_p in settings:
        vocab = int(torch.randint(8, 80, (1,), generator=g))
        logits = torch.randn(rows, vocab, generator=g) * 2.5
        what = (f"logits of shape ({rows}, {vocab}) ~ N(0, 2.5^2), temperature={temperature}, top_k={top_k}, "
                f"top_p={top_p}")
        try:
            probs = fn(logits.clone(), temperature, top_k, top_p)
        except Exception as e:
            return _finish("sampling", False, _crash(e, what), s, log)
        if not isinstance(probs, torch.Tensor) or probs.shape != logits.shape:
            shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
            return _finish("sampling", False, f"{what}\n  expected probabilities of shape {tuple(logits.shape)}, "
                           f"got {shape}", s, log)
        probs = probs.detach().float()
        sums = probs.sum(dim=-1)
        broken = ~torch.isfinite(probs).all(dim=-1) | (probs < 0).any(dim=-1) | ~((sums - 1).abs() <= 1e-4)
        if bool(broken.any()):
            r = int(broken.nonzero()[0])
            finite = bool(torch.isfinite(probs[r]).all())
            nan = "" if finite else " and holds NaN/inf (everything filtered out, then divided by 0?)"
            return _finish("sampling", False, f"{what}\n  row {r} is not a probability distribution: sum "
                           f"{float(sums[r]):.6g}, min {float(probs[r].min()):.3g}{nan} (expected >= 0, summing "
                           "to 1; did you forget the softmax, or renormalising after the filter? top-p must keep at "
                           "least the most likely token)", s, log)
        draw = int(torch.randint(0, 2**31, (1,), generator=g))
        seen = torch.zeros(rows, 1, dtype=torch.long)
        ref = sample_next(logits.clone(), seen, torch.ones_like(seen, dtype=torch.bool), temperature, top_k, top_p,
                          1.0, torch.Generator().manual_seed(draw))
        yours = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(draw)).squeeze(1)
        bad = (ref != yours).nonzero().flatten()
        if len(bad):
            r = int(bad[0])
            rank = torch.argsort(torch.argsort(logits[r], descending=True))  # 0 = largest logit
            kept = int((probs[r] > 0).sum())
            msg = (f"{what}\n  {len(bad)} of {rows} rows drew a different token with the same random numbers; "
                   f"first: row {r}\n  minilm drew token {int(ref[r])} (logit rank {int(rank[ref[r]])}), your "
                   f"probability for it is {float(probs[r, ref[r]]):.4g}\n  from yours came token {int(yours[r])} "
                   f"(logit rank {int(rank[yours[r]])}); you keep {kept} of {vocab} tokens in that row")
            return _finish("sampling", False, msg, s, log)
    return _finish("sampling", True, f"{len(settings)} settings of temperature/top-k/top-p, {rows} random rows each: "
                   "every draw from your distribution equals minilm.model.sample_next's with the same generator",
                   s, log,
                   uses_reference=_calls_reference(fn, {"sample_next", "filtered_probs"}))


# ----------------------------------------------------------------------------- mixed precision


def loss_scaler(scaler_cls: Callable, trials: int = 3, seed: int | None = None, log: bool = True) -> Result:
    """scaler_cls(init_scale, growth_factor, backoff_factor, growth_interval): a dynamic loss scaler class.

    It needs GradScaler's interface: scale(loss), unscale_(optimizer), step(optimizer), update(), get_scale().
    The check trains a small MLP under bf16 autocast with your scaler and with torch.amp.GradScaler, injecting inf
    and NaN gradients at random steps (in one parameter only), and compares the scale before every step, which
    steps were skipped, and the final parameters (tolerance 1e-7). The harness is efficient_training.amp's.
    """
    from efficient_training.amp import LossScaler, compare_with_grad_scaler

    s = _seed(seed)
    rng = random.Random(s)
    for trial in range(trials):
        steps = rng.randint(10, 16)
        bad = rng.sample(range(steps), rng.randint(2, 4))
        overflow, nan = tuple(sorted(bad[:-1])), (bad[-1],)
        kw = dict(init_scale=2.0 ** rng.randint(4, 16), growth_interval=rng.randint(2, 4),
                  backoff_factor=rng.choice([0.5, 0.25]))
        what = (f"trial {trial}: {steps} steps, inf gradient at steps {list(overflow)}, NaN at step {nan[0]}, "
                f"init_scale={kw['init_scale']:g}, growth_interval={kw['growth_interval']}, "
                f"backoff_factor={kw['backoff_factor']}")
        try:
            r = compare_with_grad_scaler(scaler_cls, steps=steps, overflow_steps=overflow, nan_steps=nan,
                                         seed=rng.randrange(10_000), **kw)
        except Exception as e:
            return _finish("loss_scaler", False, _crash(e, what), s, log)
        if r["ok"]:
            continue
        ours, ref = r["ours"], r["torch"]
        if not r["same_skips"]:
            i = next(i for i, (a, b) in enumerate(zip(ours["skipped"], ref["skipped"])) if a != b)
            did = "skipped" if ref["skipped"][i] else "took"
            yours = "skipped" if ours["skipped"][i] else "took"
            cause = "an inf/NaN gradient" if i in overflow + nan else "only finite gradients"
            msg = f"{what}\n  step {i} had {cause}: GradScaler {did} the optimizer step, your scaler {yours} it"
        elif not r["same_scales"]:
            i = next(i for i, (a, b) in enumerate(zip(ours["scales"], ref["scales"])) if a != b)
            msg = (f"{what}\n  scale before step {i}: GradScaler {ref['scales'][i]:g}, yours {ours['scales'][i]:g}"
                   f"\n  GradScaler's scales: {ref['scales'][: i + 1]}"
                   f"\n  yours:               {ours['scales'][: i + 1]}")
        else:
            msg = (f"{what}\n  same scales and skipped steps, but the parameters differ by up to "
                   f"{r['max_param_diff']:.3g} (tolerance 1e-7): are the gradients divided by the scale exactly "
                   "once before optimizer.step()?")
        return _finish("loss_scaler", False, msg, s, log)
    return _finish("loss_scaler", True, f"{trials} scripted runs with injected inf/NaN gradients: same scale sequence, "
                   "same skipped steps and the same parameters as torch.amp.GradScaler", s, log,
                   uses_reference=_calls_reference(scaler_cls, {"LossScaler", "GradScaler"},
                                                   (LossScaler, torch.amp.GradScaler)))


# ----------------------------------------------------------------------------- metrics

_WORDS = ("the a model token data train loss rate value layer head sample text word code file line test run "
          "batch step time size list name type call return").split()


def _random_sentence(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))]


def _perturb(rng: random.Random, words: list[str]) -> list[str]:
    """A noisy copy: some words replaced, dropped or inserted, as a system output differs from its reference."""
    out = []
    for w in words:
        r = rng.random()
        if r < 0.15:
            continue
        out.append(rng.choice(_WORDS) if r < 0.3 else w)
        if rng.random() < 0.05:
            out.append(rng.choice(_WORDS))
    return out


def _score_of(x, field: str):
    """Accept a number, an object with the field (e.g. .score, .fmeasure), or a dict holding it."""
    if isinstance(x, dict):
        x = x.get(field, x)
    return float(getattr(x, field, x))


def _bleu_hint(got: float, expected, hyps: list[str], refs: list[list[str]]) -> str:
    from metrics.bleu import sentence_bleu

    if expected.bp < 1 and abs(got - expected.score / expected.bp) <= 1e-6:
        return "your score equals the reference's without the brevity penalty (hypotheses shorter than references)"
    mean = np.mean([sentence_bleu(h, [r[i] for r in refs], smooth_method="none", use_effective_order=False).score
                    for i, h in enumerate(hyps)])
    if abs(got - mean) <= 1e-6:
        return "that is the mean of sentence BLEUs: corpus BLEU sums clipped counts over all segments, then divides"
    return ("compare your clipped n-gram counts (max count over references), totals, sys_len and ref_len "
            "with the pieces above")


def bleu(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(hypotheses, references) -> corpus BLEU on a 0-100 scale (a number, or an object with .score).

    hypotheses is a list of strings; references a list of reference streams (references[k][i] is the k-th
    reference of segment i), sacrebleu's order. Texts are lowercase words separated by single spaces, so
    splitting on spaces tokenizes them. No smoothing, n-grams up to 4, brevity penalty on the corpus lengths.
    Reference: metrics.bleu.corpus_bleu(..., smooth_method="none"), itself equal to sacrebleu; tolerance 1e-6.
    """
    from metrics.bleu import corpus_bleu

    s = _seed(seed)
    rng = random.Random(s)
    for trial in range(trials):
        n_seg, n_refs = rng.randint(5, 30), rng.randint(1, 3)
        refs = [[_random_sentence(rng, 6, 25) for _ in range(n_seg)] for _ in range(n_refs)]
        short = trial % 2 == 1  # every other corpus is shorter than its references: the brevity penalty bites
        hyps = [_perturb(rng, refs[0][i][: len(refs[0][i]) * 2 // 3] if short else refs[0][i]) for i in range(n_seg)]
        hyps_s = [" ".join(h) for h in hyps]
        refs_s = [[" ".join(r) for r in stream] for stream in refs]
        what = (f"trial {trial}: {n_seg} segments, {n_refs} reference stream(s); e.g. hypothesis 0 = "
                f"{hyps_s[0]!r}, reference 0 = {refs_s[0][0]!r}")
        expected = corpus_bleu(hyps_s, refs_s, smooth_method="none")
        try:
            got = _score_of(fn(list(hyps_s), [list(r) for r in refs_s]), "score")
        except Exception as e:
            return _finish("bleu", False, _crash(e, what), s, log)
        if not abs(got - expected.score) <= 1e-6:
            prec = ", ".join(f"{p:.4g}" for p in expected.precisions)
            msg = (f"{what}\n  expected BLEU {expected.score:.6f}, got {got:.6f}\n  the reference's pieces: "
                   f"precisions (%) [{prec}], brevity penalty {expected.bp:.6f}, sys_len {expected.sys_len}, "
                   f"ref_len {expected.ref_len} (closest reference length per segment, summed)\n  hint: "
                   + _bleu_hint(got, expected, hyps_s, refs_s))
            return _finish("bleu", False, msg, s, log)
    return _finish("bleu", True, f"{trials} random corpora (1-3 references, with and without the brevity penalty): "
                   "equal to metrics.bleu.corpus_bleu within 1e-6", s, log,
                   uses_reference=_calls_reference(fn, {"corpus_bleu", "sacrebleu", "BLEU"}))


def rouge(fn: Callable, pairs: int = 40, seed: int | None = None, log: bool = True) -> Result:
    """fn(prediction, reference) -> {"rouge1": F, "rouge2": F, "rougeL": F} for two strings.

    Texts are lowercase words separated by spaces (no stemming, no sentence splitting). Values are F-measures
    (numbers, or objects with .fmeasure). Reference: metrics.rouge.rouge_pair, equal to rouge-score; tolerance 1e-9.
    """
    from metrics.rouge import rouge_pair

    s = _seed(seed)
    rng = random.Random(s)
    for i in range(pairs):
        ref = _random_sentence(rng, 1, 20)
        pred = _perturb(rng, ref) if i % 4 else _random_sentence(rng, 0, 12)  # some unrelated, some empty
        p, r = " ".join(pred), " ".join(ref)
        what = f"pair {i}: prediction {p!r}, reference {r!r}"
        expected = rouge_pair(p, r, ["rouge1", "rouge2", "rougeL"])
        try:
            got = fn(p, r)
            got = {k: _score_of(got[k], "fmeasure") for k in ("rouge1", "rouge2", "rougeL")}
        except Exception as e:
            return _finish("rouge", False, _crash(e, what), s, log)
        for k in ("rouge1", "rouge2", "rougeL"):
            if not abs(got[k] - expected[k].fmeasure) <= 1e-9:
                e = expected[k]
                hint = {"rouge1": "unigram matches are min(count in prediction, count in reference) per word",
                        "rouge2": "bigram matches are clipped the same way; a one-word text has no bigrams",
                        "rougeL": "rouge-L uses the longest common subsequence (gaps allowed), not substring"}[k]
                msg = (f"{what}\n  {k}: expected F {e.fmeasure:.6f} (precision {e.precision:.6f}, recall "
                       f"{e.recall:.6f}), got {got[k]:.6f}\n  hint: {hint}")
                return _finish("rouge", False, msg, s, log)
    return _finish("rouge", True, f"{pairs} random pairs (noisy copies, unrelated and empty predictions): rouge1, "
                   "rouge2 and rougeL F equal to metrics.rouge within 1e-9", s, log,
                   uses_reference=_calls_reference(fn, {"rouge_pair", "rouge_scores", "rouge_scorer", "RougeScorer"}))


# ----------------------------------------------------------------------------- data curation


def _set_pair(rng: random.Random, j: float, size: int, start: int) -> tuple[set[str], set[str], float]:
    """Two shingle sets with Jaccard close to j (exact value returned), drawn from fresh shingle names."""
    union = size
    inter = round(j * union)
    only = union - inter
    a_only = only // 2
    names = [f"s{start + k} w{rng.randrange(10**6)}" for k in range(union)]
    common, rest = names[:inter], names[inter:]
    a = set(common) | set(rest[:a_only])
    b = set(common) | set(rest[a_only:])
    return a, b, len(a & b) / len(a | b)


def minhash(fn: Callable, num_perm: int = 256, seed: int | None = None, log: bool = True) -> Result:
    """fn(shingle_sets, num_perm, seed) -> signatures: a numpy array of shape (len(shingle_sets), num_perm).

    shingle_sets is a list of sets of strings. Signature rows of two sets agree in a fraction of positions that
    estimates their Jaccard similarity. The check builds pairs with known Jaccard from 0 to 1 and compares your
    estimates and dataset_curation.minhash.minhash_signatures' with the exact values: every estimate of yours
    within 0.2 of the truth (over 6 standard errors at num_perm=256) and a mean error under 0.05.
    """
    from dataset_curation.minhash import minhash_signatures

    s = _seed(seed)
    rng = random.Random(s)
    sets, exact = [], []
    for k in range(33):
        a, b, j = _set_pair(rng, (k % 11) / 10, rng.randint(40, 200), 1000 * k)
        sets += [a, b]
        exact.append(j)
    exact = np.array(exact)
    what = f"{len(sets)} shingle sets in {len(exact)} pairs, exact Jaccard 0.0 .. 1.0, num_perm={num_perm}, seed={s}"
    try:
        sig = np.asarray(fn([set(x) for x in sets], num_perm, s))
        again = np.asarray(fn([set(x) for x in sets], num_perm, s))
    except Exception as e:
        return _finish("minhash", False, _crash(e, what), s, log)
    if sig.shape != (len(sets), num_perm):
        return _finish("minhash", False, f"{what}\n  expected signatures of shape {(len(sets), num_perm)}, got "
                       f"{sig.shape}", s, log)
    if not np.array_equal(sig, again):
        return _finish("minhash", False, f"{what}\n  two calls with the same seed gave different signatures: the "
                       "hash functions must come from the seed alone (Python's hash() of str is salted per process; "
                       "use a fixed hash such as zlib.crc32)", s, log)
    ref = minhash_signatures(sets, num_perm=num_perm, seed=s)
    est = (sig[0::2] == sig[1::2]).mean(axis=1)
    est_ref = (ref[0::2] == ref[1::2]).mean(axis=1)
    err, err_ref = np.abs(est - exact), np.abs(est_ref - exact)
    worst = int(err.argmax())
    summary = (f"mean |estimate - Jaccard|: yours {err.mean():.4f}, reference {err_ref.mean():.4f}; worst pair "
               f"{worst}: exact {exact[worst]:.3f}, yours {est[worst]:.3f}, reference {est_ref[worst]:.3f}")
    if err.max() > 0.2 or err.mean() > 0.05:
        hint = ""
        if np.all(sig == sig[:, :1]):
            hint = "\n  hint: every column of a row is equal: each of the num_perm hash functions must differ"
        elif est.std() < 0.05:
            hint = "\n  hint: your estimates hardly vary with the true similarity: keep the MINIMUM hash per function"
        return _finish("minhash", False, f"{what}\n  {summary}{hint}", s, log)
    return _finish("minhash", True, f"{what}\n  {summary}", s, log,
                   uses_reference=_calls_reference(fn, {"minhash_signatures", "signatures_from_hashes", "MinHash"}))


def _all_targets_ppl(model_fn, ids: torch.Tensor, window: int, stride: int) -> float:
    """A classic mistake: every window scores all of its targets, so overlapping tokens count several times."""
    nll, n, b = 0.0, 0, 0
    while True:
        e = min(b + window, len(ids) - 1)
        logits = model_fn(ids[None, b:e])
        nll += float(F.cross_entropy(logits[0].float(), ids[b + 1 : e + 1], reduction="sum"))
        n += e - b
        if e == len(ids) - 1:
            return math.exp(nll / n)
        b += stride


def perplexity(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(model_fn, token_ids, window, stride) -> perplexity (a number, or an object with .perplexity).

    model_fn maps a (1, T) LongTensor of ids to logits (1, T, vocab), T <= window; token_ids is a 1-D LongTensor.
    Windows start at b = 0, stride, 2*stride, ...; a window feeds ids[b : b+window] (cut so the last input is
    ids[-2]) and predicts the next token at every position; it scores only targets no earlier window scored,
    and the last window is the one that scores the stream's last token. Every token but the first is scored
    exactly once; perplexity = exp(total NLL / scored tokens). The model is a small random GPT with sharp
    predictions, so the context each token gets matters. Reference: metrics.perplexity.perplexity; relative
    tolerance 1e-4.
    """
    from metrics.perplexity import perplexity as ref_perplexity
    from minilm.config import ModelConfig
    from minilm.model import GPT

    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    model = GPT(ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.25, generator=g)

    def model_fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids)[0]

    for trial in range(trials):
        n = int(torch.randint(30, 100, (1,), generator=g))
        window = int(torch.randint(4, 33, (1,), generator=g))
        stride = window if trial == 0 else int(torch.randint(max(1, window // 4), window, (1,), generator=g))
        ids = torch.randint(0, 50, (n,), generator=g)
        what = (f"trial {trial}: {n} random token ids (vocab 50), window={window}, stride={stride}; "
                f"ids start {ids[:8].tolist()}")
        expected = ref_perplexity(model_fn, ids, window, stride).perplexity
        try:
            got = _score_of(fn(model_fn, ids.clone(), window, stride), "perplexity")
        except Exception as e:
            return _finish("perplexity", False, _crash(e, what), s, log)
        if not abs(got - expected) <= 1e-4 * expected:
            hint = ""
            if stride < window and abs(got - _all_targets_ppl(model_fn, ids, window, stride)) <= 1e-4 * got:
                hint = ("\n  hint: your windows score all their targets; with stride < window a window must "
                        "score only the tokens no earlier window scored")
            elif stride < window and abs(got - ref_perplexity(model_fn, ids, window, window).perplexity) <= 1e-4 * got:
                hint = "\n  hint: that is the non-overlapping result (stride = window): the stride is ignored"
            else:
                hint = "\n  hint: add up NLL sums and token counts over windows; divide once at the end"
            return _finish("perplexity", False, f"{what}\n  expected perplexity {expected:.6f}, got {got:.6f}{hint}",
                           s, log)
    return _finish("perplexity", True, f"{trials} random streams, windows and strides (one non-overlapping): equal to "
                   "metrics.perplexity.perplexity within 1e-4 (relative)", s, log,
                   uses_reference=_calls_reference(fn, {"perplexity", "ref_perplexity"}))


_SYLLABLES = ("th", "e", "an", "in", "er", "s", "ing", "re", "on", "at", "é", "ü", "x", "qu", "o", "a")


def _random_text(rng: random.Random, words: int) -> str:
    out = []
    for _ in range(words):
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        out.append(w.capitalize() if rng.random() < 0.1 else w)
        out.append(rng.choice([" "] * 12 + [", ", ". ", "\n", "  ", " 42 ", "'s "]))
    return "".join(out)


def _pair_counts(words: Counter, merges: list[tuple[int, int]]) -> Counter:
    """Pair counts over pre-tokens (weighted by frequency) after applying merges in order."""
    counts: Counter = Counter()
    for w, f in words.items():
        seq = list(w.encode("utf-8"))
        for r, (a, b) in enumerate(merges):
            out, i = [], 0
            while i < len(seq):  # left to right, non-overlapping
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(256 + r)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seq = out
        for p in zip(seq, seq[1:]):
            counts[p] += f
    return counts


def _bpe_mismatch(text: str, got: list, expected: list, what: str) -> str:
    """Where the learner's merges first differ, with both pairs' bytes and counts at that step."""
    from dataset_curation.bpe import pretokenize

    r = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    counts = _pair_counts(Counter(pretokenize(text)), expected[:r])
    vocab = [bytes([i]) for i in range(256)]
    for a, b in expected:
        vocab.append(vocab[a] + vocab[b])

    def show(p):
        try:
            return f"{p} = {(vocab[p[0]] + vocab[p[1]]).decode('utf-8', 'replace')!r} (count {counts.get(p, 0)})"
        except (IndexError, TypeError):
            return f"{p} (ids outside the vocabulary so far)"

    if r >= len(got):
        return (f"{what}\n  you returned {len(got)} merges; the reference learns {len(expected)}: "
                f"the next is {show(expected[r])}")
    if r >= len(expected):
        return f"{what}\n  the reference stops after {len(expected)} merges (no pair occurs twice); you go on"
    msg = f"{what}\n  merge {r} (new id {256 + r}): expected {show(expected[r])}, got {show(got[r])}"
    if counts.get(got[r], 0) == 0:
        msg += ("\n  hint: your pair never occurs inside a pre-token: count and merge within the pieces of "
                "pretokenize(text) only, never across them")
    elif counts.get(got[r], 0) == counts.get(expected[r], 0):
        msg += "\n  hint: a tie in counts: break it by taking the smallest pair of ids"
    elif counts.get(got[r], 0) < counts.get(expected[r], 0):
        msg += ("\n  hint: the expected pair occurs more often: count pairs in every pre-token, weighted by how "
                "often it occurs, after applying all earlier merges")
    return msg


def bpe(fn: Callable, trials: int = 3, seed: int | None = None, log: bool = True) -> Result:
    """fn(text, num_merges) -> merges: a byte-level BPE trainer, a list of (id, id) pairs in the order learned.

    Split text into pre-tokens with dataset_curation.bpe.pretokenize (merges never cross a pre-token), start from
    the UTF-8 bytes (ids 0..255), count every adjacent pair in every pre-token (weighted by how often the
    pre-token occurs), merge the most frequent pair into the new id 256 + r everywhere (left to right), repeat.
    Ties go to the smallest pair (compare the id tuples); stop early when no pair occurs twice.
    Reference: dataset_curation.bpe.train_bpe, compared merge by merge (exact).
    """
    from dataset_curation.bpe import train_bpe

    s = _seed(seed)
    rng = random.Random(s)
    for trial in range(trials):
        text = _random_text(rng, rng.randint(150, 400))
        n = rng.randint(20, 60)
        what = f"trial {trial}: {len(text)} characters of random syllables, num_merges={n}; text starts {text[:60]!r}"
        expected = train_bpe(text, vocab_size=256 + n + 1).merges
        try:
            got = [tuple(int(i) for i in m) for m in fn(text, n)]
        except Exception as e:
            return _finish("bpe", False, _crash(e, what), s, log)
        if got == expected:
            continue
        if len(got) != len(expected) and got == expected[: len(got)]:
            return _finish("bpe", False, f"{what}\n  your first {len(got)} merges are right, but the reference "
                           f"learns {len(expected)} (stop only when no pair occurs twice)", s, log)
        msg = _bpe_mismatch(text, got, expected, what)
        return _finish("bpe", False, msg, s, log)
    return _finish("bpe", True, f"{trials} random texts (with multi-byte characters), 20-60 merges each: every merge "
                   "equal to dataset_curation.bpe.train_bpe's, in order", s, log,
                   uses_reference=_calls_reference(fn, {"train_bpe"}))
