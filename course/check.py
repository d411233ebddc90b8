"""Self-checks for the course exercises: your function next to the reference, on fresh random inputs.

    from course import check
    assert check.attention(my_attention)     # prints PASS or FAIL with the input, what was expected and what came out

Every check draws new random inputs each time it runs (the seed is printed, pass `seed=` to repeat one), runs
your code and the reference on them, and returns a Result that is truthy when your code agreed everywhere. The
verdict is appended to a log (out/course/checks.jsonl in the repository, or $COURSE_LOG) that
`python -m course status` reads to mark tasks done.

The notebooks ship every exercise as a stub that raises NotImplementedError. A check handed a stub says "not
implemented yet" (nothing is logged, the notebook goes on) and `check.pick(result, yours, reference)` hands the
following cells the reference until yours passes. With COURSE_STRICT=1 (the solution run in CI) any check that
does not pass raises AssertionError, so a notebook run fails on it.
"""

from __future__ import annotations

import functools
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
    not_implemented: bool = False  # the function handed in is still the shipped stub

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        verdict = "not implemented yet" if self.not_implemented else ("PASS" if self.passed else "FAIL")
        return f"<check.{self.name}: {verdict}>"


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


class _Stub(Exception):
    """Raised inside a check when the learner's code raised NotImplementedError: the exercise is not done yet."""


def _check(fn: Callable) -> Callable:
    """Wrap a check: a stub gets "not implemented yet", not a failure; COURSE_STRICT=1 turns a miss into an error."""

    @functools.wraps(fn)
    def run(*args, **kwargs) -> Result:
        name = fn.__name__
        try:
            r = fn(*args, **kwargs)
        except _Stub as e:
            print(f"check.{name}: not implemented yet ({e}); the cells below use the reference until yours passes")
            r = Result(name, False, f"not implemented yet: {e}", -1, not_implemented=True)
        if os.environ.get("COURSE_STRICT") == "1" and not r:
            raise AssertionError(f"check.{name} did not pass (COURSE_STRICT=1):\n{r.message}")
        return r

    return run


def pick(result: Result, yours, reference=None):
    """yours when its check passed, else the reference (so the rest of the notebook still runs), saying which.

    The reference defaults to check.reference(result.name): the package's version with the exercise's signature.
    """
    if result:
        print(f"using your {getattr(yours, '__name__', 'code')} from here on")
        return yours
    print(f"check.{result.name} has not passed: the cells below use the reference until yours does")
    return reference if reference is not None else globals()["reference"](result.name)


def _crash(e: BaseException, what: str) -> str:
    if isinstance(e, NotImplementedError):
        raise _Stub(str(e) or "the exercise still raises NotImplementedError") from e
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


@_check
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


@_check
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


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The next-token distribution minilm samples from: temperature, then top-k, then top-p (nucleus), (B, vocab)."""
    z = logits / temperature
    if top_k:
        kth = torch.topk(z, min(top_k, z.size(-1)), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))  # ties with the k-th logit stay in
    if top_p is not None and top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=True, dim=-1)
        p = sorted_z.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p: the one that crosses the threshold stays.
        drop = p.cumsum(dim=-1) - p >= top_p
        z = torch.full_like(z, float("-inf")).scatter(1, order, sorted_z.masked_fill(drop, float("-inf")))
    return z.softmax(dim=-1)


@_check
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


@_check
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


@_check
def bleu(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(hypotheses, references) -> corpus BLEU on a 0-100 scale (a number, or an object with .score).

    hypotheses is a list of strings; references a list of reference streams (references[k][i] is the k-th
    reference of segment i), sacrebleu's order. Texts are lowercase words separated by single spaces, so
    splitting on spaces tokenizes them. No smoothing, n-grams up to 4, brevity penalty on the corpus lengths;
    a corpus with no match at some order scores 0.
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
            msg = _crash(e, what)
            if isinstance(e, (ValueError, ZeroDivisionError)):
                msg += ("\n  hint: when some n-gram order has no match its precision is 0 and log(0) is undefined; "
                        "without smoothing BLEU is then 0 (sacrebleu returns 0.0)")
            return _finish("bleu", False, msg, s, log)
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


@_check
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


@_check
def minhash(fn: Callable, num_perm: int = 256, seed: int | None = None, log: bool = True) -> Result:
    """fn(shingle_sets, num_perm, seed) -> signatures: a numpy array of shape (len(shingle_sets), num_perm).

    shingle_sets is a list of sets of strings. Signature rows of two sets agree in a fraction of positions that
    estimates their Jaccard similarity. The check builds pairs with known Jaccard from 0 to 1 and compares your
    estimates and dataset_curation.minhash.minhash_signatures' with the exact values: every estimate of yours
    within 6 standard errors of the truth (the worst case, Jaccard 0.5: 0.2 at num_perm=256, 0.375 at 64) and a
    mean error under 0.45 / sqrt(num_perm), at least 0.05 (a correct one averages ~0.28 / sqrt(num_perm)).
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
    # Bounds in standard errors of a num_perm-sample estimate, so a correct function fails about once in 10^6
    # runs whatever num_perm the learner picks (a fixed 0.2 was only 3.2 standard errors at num_perm=64).
    worst_ok, mean_ok = max(0.2, 3.0 / math.sqrt(num_perm)), max(0.05, 0.45 / math.sqrt(num_perm))
    if err.max() > worst_ok or err.mean() > mean_ok:
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


@_check
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


@_check
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


# ----------------------------------------------------------------------------- shared by the model and training checks


def _mismatch(what: str, got, expected: torch.Tensor, atol: float, rtol: float, name: str = "y") -> str | None:
    """None when got equals expected within atol + rtol * |expected|; else where and by how much they differ."""
    if not isinstance(got, torch.Tensor):
        return f"{what}\n  expected a tensor of shape {tuple(expected.shape)}, got {type(got).__name__}"
    if got.shape != expected.shape:
        return f"{what}\n  expected {name} of shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    g, e = got.detach().double(), expected.detach().double()
    if not torch.isfinite(g).all():
        bad = tuple(int(i) for i in (~torch.isfinite(g)).nonzero()[0])
        return (f"{what}\n  {name}{list(bad)} is {float(g[bad])} (expected {float(e[bad]):.6g}): an overflow? "
                "exp() of a large number is inf in float32")
    err = (g - e).abs()
    if bool((err <= atol + rtol * e.abs()).all()):
        return None
    i = tuple(int(k) for k in np.unravel_index(int(err.argmax()), err.shape))
    return (f"{what}\n  largest difference at {name}{list(i)}: expected {float(e[i]):.6g}, got {float(g[i]):.6g} "
            f"(|diff| {float(err[i]):.3g}; tolerance {atol:g} + {rtol:g}*|expected|)\n"
            f"  expected {name} starts {_tensor_brief(e)}\n  got      {name} starts {_tensor_brief(g)}")


def _which_variant(got, variants: dict, atol: float = 1e-5, rtol: float = 1e-4) -> str:
    """The hint of the first known-wrong variant that got equals, as a message line (or "")."""
    for hint, y in variants.items():
        if isinstance(got, torch.Tensor) and got.shape == y.shape and torch.allclose(
                got.detach().double(), y.detach().double(), atol=atol, rtol=rtol):
            return f"\n  hint: {hint}"
    return ""


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi, (1,), generator=g))


def _perturbed(module: torch.nn.Module, g: torch.Generator, std: float = 0.3) -> torch.nn.Module:
    """The module with every parameter redrawn from N(0, std^2) (LayerNorm weights near 1), in eval mode."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0.0, std, generator=g)
            if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.add_(1.0)
    return module.eval()


def _model_config(**kw):
    """A minilm ModelConfig; fields this version of minilm does not have yet are dropped."""
    from dataclasses import fields

    from minilm.config import ModelConfig

    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in kw.items() if k in known})


def _has_config_field(name: str) -> bool:
    from dataclasses import fields

    from minilm.config import ModelConfig

    return name in {f.name for f in fields(ModelConfig)}


# ----------------------------------------------------------------------------- normalisation layers


def _layer_norm_variants(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    unbiased = xc / torch.sqrt(x.var(-1, keepdim=True, unbiased=True) + eps)
    outside = xc / (torch.sqrt(xc.pow(2).mean(-1, keepdim=True)) + eps)
    no_center = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    affine = (lambda z: z * w + (b if b is not None else 0))
    return {
        "you divide by the unbiased variance (n - 1); LayerNorm uses the biased one: mean((x - mean)^2)":
            affine(unbiased),
        "eps is added to the standard deviation; it belongs inside the square root: sqrt(var + eps)": affine(outside),
        "the mean is not subtracted (that is RMSNorm)": affine(no_center),
        "weight and bias are not applied": xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps),
    }


@_check
def layer_norm(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(x, weight, bias, eps) -> y: LayerNorm over the last dim of x, bias may be None.

    y = (x - mean) / sqrt(var + eps) * weight + bias, with the biased variance mean((x - mean)^2).
    Reference: torch.nn.functional.layer_norm; tolerance 1e-5 abs + 1e-4 rel.
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        b, t, c = _randint(g, 1, 4), _randint(g, 1, 12), _randint(g, 2, 65)
        eps = [1e-5, 1e-5, 0.5, 1e-6, 0.1, 1e-5][trial % 6]  # large eps shows where it is added
        shift, scale = float(torch.randn(1, generator=g)) * 3, float(torch.rand(1, generator=g)) * 3 + 0.2
        x = torch.randn(b, t, c, generator=g) * scale + shift
        w = 1 + 0.5 * torch.randn(c, generator=g)
        bias = None if trial == 2 else 0.5 * torch.randn(c, generator=g)
        what = (f"trial {trial}: x of shape {(b, t, c)} (mean {shift:.3g}, std {scale:.3g}), eps={eps:g}, "
                f"bias {'None' if bias is None else 'given'}")
        expected = F.layer_norm(x, (c,), w, bias, eps)
        try:
            got = fn(x.clone(), w.clone(), None if bias is None else bias.clone(), eps)
        except Exception as e:
            return _finish("layer_norm", False, _crash(e, what), s, log)
        msg = _mismatch(what, got, expected, 1e-5, 1e-4)
        if msg:
            return _finish("layer_norm", False, msg + _which_variant(got, _layer_norm_variants(x, w, bias, eps)), s,
                           log)
    return _finish("layer_norm", True, f"{trials} random inputs (shifted, scaled, eps up to 0.5, with and without "
                   "bias): equal to torch.nn.functional.layer_norm within 1e-5", s, log,
                   uses_reference=_calls_reference(fn, {"layer_norm", "LayerNorm"}))


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """minilm.model.RMSNorm when this minilm has it, else its formula: in float32, cast back to x's dtype."""
    try:
        from minilm.model import RMSNorm
    except ImportError:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    m = RMSNorm(x.size(-1), eps=eps)
    with torch.no_grad():
        m.weight.copy_(weight)
        return m(x)


@_check
def rms_norm(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(x, weight, eps) -> y: RMSNorm over the last dim, y = x / sqrt(mean(x^2) + eps) * weight.

    Compute in float32 and return x's dtype (one trial gives bfloat16 x). Reference: minilm.model.RMSNorm;
    tolerance 1e-5 abs + 1e-4 rel in float32, 1e-2 rel in bfloat16.
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        b, t, c = _randint(g, 1, 4), _randint(g, 1, 12), _randint(g, 2, 65)
        eps = [1e-6, 0.5, 1e-5, 0.1, 1e-6, 1e-6][trial % 6]
        dtype = torch.bfloat16 if trial == trials - 1 else torch.float32
        x = (torch.randn(b, t, c, generator=g) * (float(torch.rand(1, generator=g)) * 2 + 0.2) + 0.5).to(dtype)
        w = 1 + 0.5 * torch.randn(c, generator=g)
        what = f"trial {trial}: x of shape {(b, t, c)}, dtype {str(dtype).replace('torch.', '')}, eps={eps:g}"
        expected = _rms_norm_ref(x, w, eps)
        try:
            got = fn(x.clone(), w.clone(), eps)
        except Exception as e:
            return _finish("rms_norm", False, _crash(e, what), s, log)
        if isinstance(got, torch.Tensor) and got.dtype != x.dtype:
            return _finish("rms_norm", False, f"{what}\n  expected the output in x's dtype {x.dtype}, got {got.dtype} "
                           "(compute in float32, then .to(x.dtype))", s, log)
        tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 1e-2)
        msg = _mismatch(what, got, expected, *tol)
        if msg:
            xf = x.float()
            variants = {
                "the mean is subtracted: that is LayerNorm, RMSNorm only divides by the root mean square":
                    F.layer_norm(xf, (c,), w, None, eps),
                "eps is missing or outside the square root: sqrt(mean(x^2) + eps)":
                    xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True)) * w,
                "weight is not applied": xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps),
                "you divide by the root of the SUM of squares; RMSNorm uses the mean":
                    xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps) * w,
            }
            return _finish("rms_norm", False, msg + _which_variant(got, variants, *tol), s, log)
    return _finish("rms_norm", True, f"{trials} random inputs (eps up to 0.5, one in bfloat16): equal to "
                   "minilm's RMSNorm", s, log, uses_reference=_calls_reference(fn, {"RMSNorm", "rms_norm"}))


# ----------------------------------------------------------------------------- MLP, block, the whole GPT


class _Holder(torch.nn.Module):
    """Named sub-modules and no forward of its own: the weights a learner's function reads."""

    def __init__(self, **modules):
        super().__init__()
        for k, v in modules.items():
            self.add_module(k, v)


def _mlp_case(kind: str, c: int, bias: bool, g: torch.Generator):
    """(module with c_fc and c_proj, reference function): minilm's MLP when it knows `kind`, else the formula."""
    if kind == "gelu" or _has_config_field("mlp"):
        from minilm.model import MLP

        m = _perturbed(MLP(_model_config(n_embd=c, n_head=1, bias=bias, mlp=kind)), g)
        return m, m
    hidden = 4 * c
    m = _perturbed(_Holder(c_fc=torch.nn.Linear(c, hidden * (2 if kind == "swiglu" else 1), bias=bias),
                           c_proj=torch.nn.Linear(hidden, c, bias=bias)), g)
    if kind == "relu2":
        return m, lambda x: m.c_proj(torch.relu(m.c_fc(x)) ** 2)
    return m, lambda x: m.c_proj(F.silu(m.c_fc(x).chunk(2, dim=-1)[0]) * m.c_fc(x).chunk(2, dim=-1)[1])


@_check
def mlp(fn: Callable, kinds: tuple[str, ...] = ("gelu",), trials: int = 3, seed: int | None = None,
        log: bool = True) -> Result:
    """fn(x, mlp, kind) -> y: the feed-forward layer, with mlp's weights mlp.c_fc and mlp.c_proj (nn.Linear).

    kind "gelu": c_proj(gelu(c_fc(x))) with the exact (erf) GELU; "relu2": c_proj(relu(c_fc(x))**2);
    "swiglu": gate, up = c_fc(x).chunk(2, dim=-1); c_proj(silu(gate) * up). Pass kinds=("gelu", "relu2",
    "swiglu") to check all three. Reference: minilm.model.MLP; tolerance 1e-5 abs + 1e-4 rel.
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    for kind in kinds:
        if kind not in ("gelu", "relu2", "swiglu"):
            raise ValueError(f"kind {kind!r} is not one of gelu, relu2, swiglu")
        for trial in range(trials):
            c, bias = _randint(g, 2, 33), trial != 1
            m, ref = _mlp_case(kind, c, bias, g)
            x = torch.randn(_randint(g, 1, 4), _randint(g, 1, 10), c, generator=g)
            what = f"kind={kind!r}, trial {trial}: x of shape {tuple(x.shape)}, bias={bias}"
            with torch.no_grad():
                expected = ref(x)
                try:
                    got = fn(x.clone(), m, kind)
                except Exception as e:
                    return _finish("mlp", False, _crash(e, what), s, log)
                msg = _mismatch(what, got, expected, 1e-5, 1e-4)
                if msg:
                    h = m.c_fc(x)
                    if kind == "gelu":
                        variants = {"you use the tanh approximation of GELU; minilm uses the exact one (erf)":
                                    m.c_proj(F.gelu(h, approximate="tanh")),
                                    "that is ReLU, not GELU": m.c_proj(torch.relu(h)),
                                    "c_proj is not applied": F.gelu(h)}
                    elif kind == "swiglu":
                        a, u = h.chunk(2, dim=-1)
                        variants = {"gate and up are swapped: the first half goes through silu":
                                    m.c_proj(F.silu(u) * a),
                                    "silu is applied to the product": m.c_proj(F.silu(a * u))}
                    elif kind == "relu2":
                        variants = {"the ReLU is not squared": m.c_proj(torch.relu(h)),
                                    "the square comes before the ReLU (negative inputs come back)": m.c_proj(h ** 2)}
                    return _finish("mlp", False, msg + _which_variant(got, variants), s, log)
    return _finish("mlp", True, f"{trials} random layers per kind {list(kinds)}: equal to minilm's MLP within 1e-5",
                   s, log, uses_reference=_calls_reference(fn, {"MLP"}))


@_check
def block(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(x, block) -> y: one pre-LayerNorm transformer block with block's weights (a minilm Block, eval mode).

    x = x + attention(ln_1(x)); y = x + mlp(ln_2(x)). Use block.ln_1 / block.ln_2 (LayerNorm weight, bias, eps),
    block.attn (c_attn, n_head, c_proj, as in check.causal_self_attention) and block.mlp (c_fc, c_proj, GELU).
    Reference: block(x); tolerance 1e-4 abs + 1e-4 rel.
    """
    from minilm.model import Block

    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    calls: list[int] = []
    for trial in range(trials):
        n_head = _randint(g, 1, 4)
        c, bias = n_head * 2 * _randint(g, 1, 6), trial != 1
        blk = _perturbed(Block(_model_config(n_embd=c, n_head=n_head, bias=bias, block_size=32)), g, 0.2)
        x = torch.randn(_randint(g, 1, 3), _randint(g, 1, 16), c, generator=g)
        what = f"trial {trial}: x of shape {tuple(x.shape)}, n_head={n_head}, bias={bias}"
        with torch.no_grad():
            expected = blk(x)
            hook = blk.register_forward_hook(lambda *_: calls.append(1))
            try:
                got = fn(x.clone(), blk)
            except Exception as e:
                return _finish("block", False, _crash(e, what), s, log)
            finally:
                hook.remove()
            msg = _mismatch(what, got, expected, 1e-4, 1e-4)
            if msg:
                a = x + blk.attn(blk.ln_1(x))
                variants = {
                    "post-LN: you normalise after adding (x = ln(x + f(x))); GPT-2 normalises the branch input":
                        blk.ln_2(blk.ln_1(x + blk.attn(x)) + blk.mlp(blk.ln_1(x + blk.attn(x)))),
                    "the attention branch has no residual (x + ...)": blk.attn(blk.ln_1(x))
                    + blk.mlp(blk.ln_2(blk.attn(blk.ln_1(x)))),
                    "ln_1 is used before the MLP too; the MLP branch has its own ln_2": a + blk.mlp(blk.ln_1(a)),
                    "the MLP reads the block input x instead of x + attention": a + blk.mlp(blk.ln_2(x)),
                }
                return _finish("block", False, msg + _which_variant(got, variants, 1e-4, 1e-4), s, log)
    return _finish("block", True, f"{trials} random blocks (1-3 heads, with and without bias): equal to minilm's "
                   "Block within 1e-4", s, log, uses_reference=bool(calls))


# The modern recipe's switches, one setting per extra trial of check.gpt(..., modern=True).
MODERN_RECIPES = (
    dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False, bias=False),
    dict(pos="rope", norm="layernorm", mlp="relu2", qk_norm=False, tie_embeddings=True, bias=True, rope_theta=500.0),
    dict(pos="learned", norm="rmsnorm", mlp="gelu", qk_norm=True, tie_embeddings=True, bias=False),
)


@_check
def gpt(model_cls: Callable, trials: int = 3, modern: bool = False, seed: int | None = None,
        log: bool = True) -> Result:
    """model_cls(config) -> an nn.Module with forward(idx, targets=None) -> (logits, loss or None).

    Its parameter names must be minilm's (transformer.wte/wpe/h.N.ln_1/attn.c_attn/attn.c_proj/ln_2/mlp.c_fc/
    mlp.c_proj/ln_f, lm_head), so minilm.model.GPT's state_dict loads into it (strict). The check loads random
    weights of a minilm GPT into your model and compares logits (tolerance 1e-4 abs + 1e-4 rel) and the mean
    cross-entropy loss over targets, where targets equal to -1 are ignored (1e-5 rel). The first `trials` models
    are GPT-2 blocks; modern=True adds one per setting in check.MODERN_RECIPES (config.pos "rope" with no wpe,
    config.norm "rmsnorm", config.mlp "swiglu"/"relu2", config.qk_norm with attn.q_norm/k_norm, untied lm_head).
    """
    from minilm.model import GPT

    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    recipes = [{}] * trials + (list(MODERN_RECIPES) if modern and _has_config_field("pos") else [])
    for trial, recipe in enumerate(recipes):
        n_head = _randint(g, 1, 4)
        cfg = _model_config(**{"vocab_size": _randint(g, 20, 90), "block_size": _randint(g, 8, 33),
                               "n_layer": _randint(g, 1, 4), "n_head": n_head, "n_embd": n_head * 2 * _randint(g, 1, 6),
                               "bias": trial != 1, "dropout": 0.0, **recipe})
        ref = _perturbed(GPT(cfg), g, 0.15)
        b, t = _randint(g, 1, 4), _randint(g, 1, cfg.block_size + 1)
        idx = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
        targets = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
        drop = torch.rand(b, t, generator=g) < 0.2
        drop.view(-1)[0] = False  # at least one target counts: the mean loss over none is nan, equal to nothing
        targets[drop] = -1
        what = (f"trial {trial}: vocab_size={cfg.vocab_size}, block_size={cfg.block_size}, n_layer={cfg.n_layer}, "
                f"n_head={cfg.n_head}, n_embd={cfg.n_embd}, bias={cfg.bias}"
                + "".join(f", {k}={v!r}" for k, v in recipe.items() if k != "bias")
                + f"; idx of shape {(b, t)}, {int((targets == -1).sum())} targets = -1 (ignored)")
        try:
            mine = model_cls(cfg)
            missing, unexpected = mine.load_state_dict(ref.state_dict(), strict=False)
        except Exception as e:
            return _finish("gpt", False, _crash(e, what), s, log)
        if missing or unexpected:
            return _finish("gpt", False, f"{what}\n  minilm's weights do not load into your model: missing "
                           f"{list(missing)[:6]}, unexpected {list(unexpected)[:6]}; name the modules as minilm does "
                           "(see `GPT(config).state_dict().keys()`)", s, log)
        mine.eval()
        with torch.no_grad():
            exp_logits, exp_loss = ref(idx, targets)
            try:
                got_logits, got_loss = mine(idx.clone(), targets.clone())
                plain = mine(idx.clone())
            except Exception as e:
                return _finish("gpt", False, _crash(e, what), s, log)
            msg = _mismatch(what, got_logits, exp_logits, 1e-4, 1e-4, "logits")
            if msg and recipe:
                return _finish("gpt", False, msg + "\n  hint: the GPT-2 trials passed: look at the switches of this "
                               "one (check.rope, check.rms_norm and check.mlp test the pieces)", s, log)
            if msg:
                tr = ref.transformer
                h = tr.wte(idx)
                for blk in tr.h:
                    h = blk(h)
                pos = tr.wte(idx) + tr.wpe(torch.arange(t))
                h2 = pos
                for blk in tr.h:
                    h2 = blk(h2)
                variants = {"the position embeddings (transformer.wpe) are not added": ref.lm_head(tr.ln_f(h)),
                            "the final LayerNorm (transformer.ln_f) is not applied": ref.lm_head(h2)}
                return _finish("gpt", False, msg + _which_variant(got_logits, variants, 1e-4, 1e-4), s, log)
            if not isinstance(plain, tuple) or len(plain) != 2 or plain[1] is not None:
                return _finish("gpt", False, f"{what}\n  model(idx) without targets must return (logits, None), got "
                               f"{type(plain).__name__}", s, log)
            got_loss = float(got_loss) if isinstance(got_loss, torch.Tensor) and got_loss.numel() == 1 else got_loss
            if not isinstance(got_loss, float) or not abs(got_loss - float(exp_loss)) <= 1e-5 * float(exp_loss):
                lf = exp_logits.view(-1, cfg.vocab_size)
                keep = targets.view(-1) != -1
                all_mean = float(F.cross_entropy(lf[keep], targets.view(-1)[keep], reduction="sum")) / (b * t)
                hint = ""
                if isinstance(got_loss, float) and abs(got_loss - all_mean) <= 1e-5 * all_mean:
                    hint = "\n  hint: you divide by every position; divide by the number of targets that are not -1"
                return _finish("gpt", False, f"{what}\n  expected loss {float(exp_loss):.6f}, got {got_loss}{hint}",
                               s, log)
    return _finish("gpt", True, f"{len(recipes)} random GPTs (1-3 layers; {len(recipes) - trials} with the modern "
                   "switches) with minilm's weights loaded: same logits (1e-4) and loss (1e-5, targets -1 ignored) as "
                   "minilm.model.GPT", s, log,
                   uses_reference=_calls_reference(model_cls, {"GPT", "Block", "CausalSelfAttention", "MLP"},
                                                   (GPT,)))


def _rope_ref(x: torch.Tensor, theta: float) -> torch.Tensor:
    """minilm's apply_rope with rope_tables when this minilm has them, else the same formula (Llama convention)."""
    t, hd = x.size(-2), x.size(-1)
    try:
        from minilm.model import apply_rope, rope_tables
    except ImportError:
        inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        emb = torch.cat([torch.outer(torch.arange(t, dtype=torch.float32), inv)] * 2, dim=-1)
        rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], dim=-1)
        return x * emb.cos() + rot * emb.sin()
    cos, sin = rope_tables(hd, t, theta)
    return apply_rope(x, cos[:t], sin[:t])


@_check
def rope(fn: Callable, trials: int = 5, seed: int | None = None, log: bool = True) -> Result:
    """fn(x, theta) -> x rotated: rotary position embedding of x (B, n_head, T, head_dim) at positions 0..T-1.

    inv_freq = 1 / theta^(arange(0, hd, 2) / hd); angles = outer(positions, inv_freq), repeated: cat(a, a);
    y = x * cos(angles) + rotate_half(x) * sin(angles), rotate_half(x) = cat(-x[..., hd/2:], x[..., :hd/2]) (the
    Hugging Face Llama convention, which pairs dim i with dim i + hd/2). Reference: minilm.model.apply_rope with
    rope_tables; tolerance 1e-5 abs + 1e-4 rel.
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        b, h, t, hd = _randint(g, 1, 3), _randint(g, 1, 4), _randint(g, 2, 40), 2 * _randint(g, 1, 17)
        theta = [10000.0, 500.0, 10000.0, 1e6, 100.0][trial % 5]
        x = torch.randn(b, h, t, hd, generator=g)
        what = f"trial {trial}: x of shape (B={b}, n_head={h}, T={t}, head_dim={hd}), theta={theta:g}"
        expected = _rope_ref(x, theta)
        try:
            got = fn(x.clone(), theta)
        except Exception as e:
            return _finish("rope", False, _crash(e, what), s, log)
        msg = _mismatch(what, got, expected, 1e-5, 1e-4)
        if msg:
            ang = torch.outer(torch.arange(t, dtype=torch.float32), 1.0 / theta ** (torch.arange(0, hd, 2) / hd))
            x1, x2 = x[..., 0::2], x[..., 1::2]
            inter = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).flatten(-2)
            emb = torch.cat([ang, ang], -1)
            rot = torch.cat([x[..., hd // 2:], -x[..., : hd // 2]], dim=-1)
            variants = {"you rotate adjacent pairs (0,1), (2,3), ... (the original RoFormer layout); minilm pairs "
                        "dim i with dim i + head_dim/2 (rotate_half)": inter,
                        "rotate_half has the wrong sign: cat(-x2, x1), not cat(x2, -x1)":
                            x * emb.cos() + rot * emb.sin(),
                        "position 0 is not the identity: positions start at 0": _rope_ref(
                            torch.cat([torch.zeros_like(x[..., :1, :]), x], -2), theta)[..., 1:, :]}
            return _finish("rope", False, msg + _which_variant(got, variants), s, log)
    return _finish("rope", True, f"{trials} random inputs (head_dim 2-32, theta 100 to 1e6): equal to minilm's "
                   "apply_rope within 1e-5", s, log,
                   uses_reference=_calls_reference(fn, {"apply_rope", "rope_tables"}))


# ----------------------------------------------------------------------------- the loss


@_check
def cross_entropy(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(logits, targets, ignore_index=-100) -> mean cross-entropy, a 0-dim tensor.

    logits (N, V) float32, targets (N,) int64; positions whose target is ignore_index do not count (neither in the
    sum nor in the count). Some trials have logits around 1e4: exp() overflows unless you subtract each row's
    max first. Reference: torch.nn.functional.cross_entropy (in float64); tolerance 1e-5 relative.
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        n, v = _randint(g, 2, 60), _randint(g, 2, 200)
        scale, shift = [(1.0, 0.0), (30.0, 0.0), (1e4, 0.0), (3.0, 5e3), (1.0, -2e4), (10.0, 0.0)][trial % 6]
        logits = torch.randn(n, v, generator=g) * scale + shift
        targets = torch.randint(0, v, (n,), generator=g)
        ignore = -100 if trial % 2 else -1
        drop = torch.rand(n, generator=g) < 0.3
        drop[0] = False  # at least one position counts
        targets[drop] = ignore
        what = (f"trial {trial}: logits of shape ({n}, {v}) ~ N({shift:g}, {scale:g}^2), ignore_index={ignore}, "
                f"{int(drop.sum())} of {n} targets ignored")
        expected = F.cross_entropy(logits.double(), targets, ignore_index=ignore)
        try:
            got = fn(logits.clone(), targets.clone(), ignore_index=ignore)
        except Exception as e:
            return _finish("cross_entropy", False, _crash(e, what) + (
                "\n  hint: an ignored target is not a valid index: mask those positions before gathering"
                if isinstance(e, (IndexError, RuntimeError)) else ""), s, log)
        if not isinstance(got, torch.Tensor):
            got = torch.tensor(float(got))
        msg = _mismatch(what, got.reshape(()), expected.reshape(()), 0.0, 1e-5, "loss")
        if msg:
            keep = ~drop
            per = F.cross_entropy(logits.double(), targets.clamp(min=0), reduction="none")
            variants = {"you divide by all N positions; divide by the number that are not ignored":
                        (per * keep).sum() / n,
                        "the ignored positions are counted (with target 0?)": per.mean()}
            return _finish("cross_entropy", False, msg + _which_variant(got.reshape(()), variants, 0, 1e-5), s, log)
    return _finish("cross_entropy", True, f"{trials} random batches (logits up to 2e4 in size, ignore_index -1 and "
                   "-100): equal to F.cross_entropy within 1e-5", s, log,
                   uses_reference=_calls_reference(fn, {"cross_entropy", "log_softmax", "nll_loss", "logsumexp"}))


# ----------------------------------------------------------------------------- the optimizer and the loop


def _adamw_variant(p, g, m, v, t, lr, b1, b2, eps, wd, kind):
    if kind == "coupled":
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh, vh = (m, v) if kind == "no_bias_correction" else (m / (1 - b1**t), v / (1 - b2**t))
    den = torch.sqrt(vh + eps) if kind == "eps_inside" else torch.sqrt(vh) + eps
    p = p if kind == "coupled" else p * (1 - lr * wd)
    return p - lr * mh / den, m, v


@_check
def adamw(fn: Callable, trials: int = 3, steps: int = 20, seed: int | None = None, log: bool = True) -> Result:
    """fn(p, grad, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (p, m, v): one AdamW step, t = 1, 2, ...

    m and v start at zero. Decoupled weight decay (p shrinks by lr * weight_decay * p, not added to the gradient),
    bias correction m / (1 - beta1^t), v / (1 - beta2^t), update lr * m_hat / (sqrt(v_hat) + eps). The check runs
    `steps` steps with fresh random gradients next to torch.optim.AdamW; tolerance 1e-6 abs + 1e-5 rel each step.
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        shape = (_randint(g, 1, 6), _randint(g, 1, 9))
        lr = [1e-2, 3e-3, 0.1][trial % 3]
        b1, b2 = [(0.9, 0.999), (0.8, 0.95), (0.9, 0.98)][trial % 3]
        eps, wd = [1e-8, 1e-3, 1e-6][trial % 3], [0.1, 0.0, 0.5][trial % 3]
        what = (f"trial {trial}: a parameter of shape {shape}, lr={lr:g}, betas=({b1}, {b2}), eps={eps:g}, "
                f"weight_decay={wd:g}")
        p0 = torch.randn(*shape, generator=g)
        ref = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([ref], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False)
        p, m, v = p0.clone(), torch.zeros(shape), torch.zeros(shape)
        kinds = ("coupled", "no_bias_correction", "eps_inside")
        shadow = {k: (p0.clone(), torch.zeros(shape), torch.zeros(shape)) for k in kinds}
        for t in range(1, steps + 1):
            grad = torch.randn(*shape, generator=g) * (0.1 if t % 3 else 2.0)
            ref.grad = grad.clone()
            opt.step()
            shadow = {k: _adamw_variant(*shadow[k][:1], grad, *shadow[k][1:], t, lr, b1, b2, eps, wd, k)
                      for k in kinds}
            try:
                p, m, v = fn(p, grad.clone(), m, v, t, lr, b1, b2, eps, wd)
            except Exception as e:
                return _finish("adamw", False, _crash(e, what + f", step t={t}"), s, log)
            msg = _mismatch(what + f"\n  after step t={t} of {steps}", p, ref.detach(), 1e-6, 1e-5, "p")
            if msg:
                names = {"coupled": "the decay is added to the gradient (Adam + L2); AdamW decays p directly: "
                                    "p -= lr * weight_decay * p",
                         "no_bias_correction": "no bias correction: divide m by (1 - beta1^t) and v by (1 - beta2^t)",
                         "eps_inside": "eps is inside the square root; AdamW uses sqrt(v_hat) + eps"}
                hint = _which_variant(p, {names[k]: shadow[k][0] for k in kinds}, 1e-6, 1e-5)
                return _finish("adamw", False, msg + hint, s, log)
    return _finish("adamw", True, f"{trials} random parameters, {steps} steps each (weight decay 0 to 0.5, eps up to "
                   "1e-3): equal to torch.optim.AdamW after every step within 1e-5", s, log,
                   uses_reference=_calls_reference(fn, {"AdamW", "adamw", "Adam"}))


@_check
def lr_schedule(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(it, warmup_iters, lr_decay_iters, lr, min_lr) -> the learning rate at step it (0-based).

    Warm-up: lr * (it + 1) / (warmup_iters + 1) for it < warmup_iters; then cosine from lr down to min_lr:
    min_lr + 0.5 * (1 + cos(pi * ratio)) * (lr - min_lr), ratio = (it - warmup_iters) / (lr_decay_iters -
    warmup_iters); min_lr from lr_decay_iters on. Reference: minilm.train.get_lr at every step up to
    lr_decay_iters + 20; tolerance 1e-9 * lr.
    """
    from types import SimpleNamespace

    from minilm.train import get_lr

    s = _seed(seed)
    rng = random.Random(s)
    for trial in range(trials):
        warm = [0, rng.randint(1, 30), rng.randint(50, 100), rng.randint(1, 10)][trial % 4]
        decay = warm + rng.randint(20, 300)
        lr = rng.choice([6e-4, 1e-3, 3e-3, 1e-2])
        min_lr = lr * rng.choice([0.0, 0.1, 0.05])
        t = SimpleNamespace(warmup_iters=warm, lr_decay_iters=decay, lr=lr, min_lr=min_lr)
        what = f"trial {trial}: warmup_iters={warm}, lr_decay_iters={decay}, lr={lr:g}, min_lr={min_lr:g}"
        for it in range(decay + 20):
            expected = get_lr(it, t)
            try:
                got = float(fn(it, warm, decay, lr, min_lr))
            except Exception as e:
                return _finish("lr_schedule", False, _crash(e, f"{what}, it={it}"), s, log)
            if not abs(got - expected) <= 1e-9 * lr:
                phase = "warm-up" if it < warm else ("cosine decay" if it < decay else "after lr_decay_iters")
                hint = {"warm-up": "warm-up is linear: lr * (it + 1) / (warmup_iters + 1), so step 0 is not 0",
                        "cosine decay": "the cosine starts at warmup_iters (ratio 0 there) and reaches min_lr, not 0, "
                                        "at lr_decay_iters",
                        "after lr_decay_iters": "from lr_decay_iters on the rate stays at min_lr"}[phase]
                return _finish("lr_schedule", False, f"{what}\n  it={it} ({phase}): expected {expected:.8g}, got "
                               f"{got:.8g}\n  hint: {hint}", s, log)
    return _finish("lr_schedule", True, f"{trials} random schedules (with and without warm-up and min_lr), every step: "
                   "equal to minilm.train.get_lr", s, log, uses_reference=_calls_reference(fn, {"get_lr"}))


@_check
def clip_grad_norm(fn: Callable, trials: int = 6, seed: int | None = None, log: bool = True) -> Result:
    """fn(parameters, max_norm) -> total norm: global-norm gradient clipping, in place.

    total = sqrt(sum of every gradient's squared entries), over all parameters whose .grad is not None; when
    total > max_norm every gradient is multiplied by max_norm / total (never scaled up). Return the norm before
    clipping. Reference: torch.nn.utils.clip_grad_norm_; tolerance 1e-5 relative.
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        k = _randint(g, 1, 6)
        params = [torch.nn.Parameter(torch.randn(_randint(g, 1, 5), _randint(g, 1, 7), generator=g)) for _ in range(k)]
        for i, p in enumerate(params):
            if not (i == 1 and trial % 2):  # some parameters have no gradient
                p.grad = torch.randn(p.shape, generator=g) * float(torch.rand(1, generator=g) * 3)
        total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
        max_norm = float(total) * [0.3, 2.0, 0.05, 0.9, 1.5, 0.5][trial % 6]
        refs = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for r, p in zip(refs, params):
            r.grad = None if p.grad is None else p.grad.clone()
        before = [None if p.grad is None else p.grad.clone() for p in params]
        expected_norm = float(torch.nn.utils.clip_grad_norm_(refs, max_norm))
        what = (f"trial {trial}: {k} parameters ({sum(p.grad is None for p in params)} without .grad), total norm "
                f"{float(total):.4g}, max_norm={max_norm:.4g}")
        try:
            got_norm = float(fn(params, max_norm))
        except Exception as e:
            return _finish("clip_grad_norm", False, _crash(e, what), s, log)
        if not abs(got_norm - expected_norm) <= 1e-5 * expected_norm:
            return _finish("clip_grad_norm", False, f"{what}\n  expected the returned norm {expected_norm:.6g} (before "
                           f"clipping), got {got_norm:.6g}", s, log)
        for i, (p, r, b0) in enumerate(zip(params, refs, before)):
            if r.grad is None:
                continue
            msg = _mismatch(what, p.grad, r.grad, 1e-7, 1e-5, f"param {i} grad")
            if msg:
                per_tensor = b0 * min(1.0, max_norm / float(b0.norm()))
                variants = {"each gradient is clipped by its own norm; scale all of them by max_norm / global norm":
                            per_tensor,
                            "gradients are scaled up when the norm is below max_norm: only ever scale down":
                            b0 * (max_norm / float(total)),
                            "the gradients are not changed": b0}
                return _finish("clip_grad_norm", False, msg + _which_variant(p.grad, variants, 1e-7, 1e-5), s, log)
    return _finish("clip_grad_norm", True, f"{trials} random parameter sets (norms above and below max_norm, some "
                   "without gradients): same norm and gradients as torch.nn.utils.clip_grad_norm_", s, log,
                   uses_reference=_calls_reference(fn, {"clip_grad_norm_", "clip_grad_norm", "clip_grad_value_"}))


def _tiny_gpt(g: torch.Generator, vocab: int = 32, n_embd: int = 16, n_layer: int = 1):
    from minilm.model import GPT

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))  # the model's init draws from the global RNG
    return GPT(_model_config(vocab_size=vocab, block_size=16, n_layer=n_layer, n_head=2, n_embd=n_embd, dropout=0.0))


@_check
def accumulate(fn: Callable, trials: int = 2, seed: int | None = None, log: bool = True) -> Result:
    """fn(model, optimizer, micro_batches) -> mean loss: one optimizer step from several micro-batches.

    micro_batches is a list of (x, y) of equal size; model(x, y) returns (logits, loss). Zero the gradients,
    backward loss / len(micro_batches) for each, then one optimizer.step(). The result must equal one step on
    the concatenated batch. The check calls fn twice (two steps, plain SGD) on a tiny minilm GPT and compares
    the parameters with the big-batch steps; tolerance 1e-6 abs + 1e-5 rel.
    """
    import copy

    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    for trial in range(trials):
        model = _tiny_gpt(g)
        ref = copy.deepcopy(model)
        n = [4, 3][trial % 2]
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
        what = f"trial {trial}: {n} micro-batches of (2, 16) tokens, two steps of SGD(lr=0.5) on a 1-layer GPT"
        for step in range(2):
            batches = [tuple(torch.randint(0, 32, (2, 16), generator=g) for _ in range(2)) for _ in range(n)]
            before = [p.detach().clone() for p in ref.parameters()]
            ref_opt.zero_grad(set_to_none=True)
            _, loss = ref(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
            loss.backward()
            ref_opt.step()
            loss = loss.item()
            try:
                got_loss = float(fn(model, opt, [(x.clone(), y.clone()) for x, y in batches]))
            except Exception as e:
                return _finish("accumulate", False, _crash(e, what), s, log)
            dr = torch.cat([(p.detach() - b).flatten() for p, b in zip(ref.parameters(), before)])
            dy = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
            if not torch.allclose(dy, dr, atol=1e-6, rtol=1e-5):
                ratio = float(dy @ dr / (dr @ dr))
                hint = ""
                if abs(ratio - n) < 0.05 * n:
                    hint = (f"\n  hint: your update is {ratio:.2f}x the big-batch one: divide each micro-batch's "
                            f"loss by the number of micro-batches ({n})")
                elif step == 1 and float(dy.abs().sum()) > 0:
                    hint = "\n  hint: the first step was right: are the gradients zeroed before each step?"
                elif float(dy.abs().max()) == 0:
                    hint = "\n  hint: the parameters did not change: call optimizer.step() once at the end"
                else:
                    hint = ("\n  hint: the update differs from the big batch's: backward every micro-batch, "
                            "step only once after the last (no zero_grad in between)")
                return _finish("accumulate", False, f"{what}\n  after step {step + 1}: parameters differ from the "
                               f"big-batch step by up to {float((dy - dr).abs().max()):.3g}{hint}", s, log)
            if not abs(got_loss - loss) <= 1e-5 * loss:
                return _finish("accumulate", False, f"{what}\n  step {step + 1}: expected the mean loss "
                               f"{loss:.6f} (over all micro-batches), got {got_loss:.6f}", s, log)
    return _finish("accumulate", True, f"{trials} runs of two steps with 3-4 micro-batches: the same parameters as "
                   "the big-batch steps within 1e-5", s, log)


@_check
def overfit(fn: Callable, steps: int = 150, target: float = 0.3, seed: int | None = None, log: bool = True) -> Result:
    """fn(model, x, y, steps) -> the list of losses: train model on the one batch (x, y) for `steps` steps.

    model(x, y) returns (logits, loss); choose the optimizer and learning rate yourself. A correct loop drives a
    tiny GPT's loss on a fixed batch of random tokens (about ln 64 = 4.16 at the start) below `target` in 150
    steps: the check measures the loss on (x, y) itself afterwards.
    """
    s = _seed(seed)
    g = torch.Generator().manual_seed(s)
    model = _tiny_gpt(g, vocab=64, n_embd=32, n_layer=1)
    x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        start = float(model.eval()(x, y)[1])
    model.train()
    what = f"a 1-layer GPT (vocab 64), one batch of (2, 16) random tokens, {steps} steps; loss at the start {start:.3f}"
    try:
        losses = [float(v) for v in fn(model, x.clone(), y.clone(), steps)]
    except Exception as e:
        return _finish("overfit", False, _crash(e, what), s, log)
    with torch.no_grad():
        end = float(model.eval()(x, y)[1])
    if len(losses) != steps:
        return _finish("overfit", False, f"{what}\n  expected {steps} losses (one per step), got {len(losses)}", s, log)
    if not math.isfinite(end) or end >= target:
        changed = any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
        if not changed:
            hint = "the parameters never changed: loss.backward() then optimizer.step() in every step"
        elif not math.isfinite(end):
            hint = "the loss diverged: lower the learning rate"
        elif end > 0.8 * start:
            hint = ("the loss hardly moved: the learning rate is far too low (try AdamW with lr 1e-2), or zero_grad "
                    "is missing")
        else:
            hint = "falling but not fast enough: a larger learning rate (AdamW 1e-2) gets there"
        return _finish("overfit", False, f"{what}\n  loss after training {end:.4f}, needed below {target} (your last "
                       f"logged loss {losses[-1]:.4f})\n  hint: {hint}", s, log)
    return _finish("overfit", True, f"{what}\n  loss after training {end:.4f} (below {target}): the loop learns", s,
                   log)


# ----------------------------------------------------------------------------- LSH, clustering, filters, BPE encoding


def _planted_signatures(rng: np.random.Generator, n: int, num_perm: int, rows: int) -> np.ndarray:
    """Random uint32 signatures where some documents copy whole or partial bands from others."""
    sig = rng.integers(0, 2**32 - 1, (n, num_perm), dtype=np.uint64).astype(np.uint32)
    for _ in range(n):
        i, j = rng.integers(0, n, 2)
        start = int(rng.integers(0, num_perm))
        length = int(rng.integers(1, 2 * rows + 1))
        sig[j, start : start + length] = sig[i, start : start + length]
    return sig


@_check
def lsh_candidates(fn: Callable, trials: int = 4, seed: int | None = None, log: bool = True) -> Result:
    """fn(signatures, bands, rows) -> the candidate pairs: (i, j) with i < j whose signatures agree on a whole band.

    signatures is a uint32 array (n_docs, num_perm); band k is columns k*rows .. (k+1)*rows - 1; columns past
    bands*rows are not used. Return any iterable of pairs. Reference: dataset_curation.minhash.lsh_candidate_pairs
    (compared as sets, exactly).
    """
    from dataset_curation.minhash import lsh_candidate_pairs

    s = _seed(seed)
    rng = np.random.default_rng(s)
    for trial in range(trials):
        bands, rows = int(rng.integers(2, 12)), int(rng.integers(1, 6))
        num_perm = bands * rows + int(rng.integers(0, 5))
        n = int(rng.integers(10, 60))
        sig = _planted_signatures(rng, n, num_perm, rows)
        what = f"trial {trial}: {n} signatures of {num_perm} values, bands={bands}, rows={rows}"
        expected = {tuple(p) for p in lsh_candidate_pairs(sig, bands, rows, max_bucket=10**9).tolist()}
        try:
            got = {tuple(int(i) for i in p) for p in fn(sig.copy(), bands, rows)}
        except Exception as e:
            return _finish("lsh_candidates", False, _crash(e, what), s, log)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            msg = f"{what}\n  expected {len(expected)} pairs, got {len(got)}"
            if missing:
                i, j = missing[0]
                k = next(k for k in range(bands)
                         if (sig[i, k * rows:(k + 1) * rows] == sig[j, k * rows:(k + 1) * rows]).all())
                msg += f"\n  missing {missing[:5]}: e.g. documents {i} and {j} agree on all of band {k} " \
                       f"(columns {k * rows}..{(k + 1) * rows - 1})"
            if extra:
                i, j = extra[0]
                bad = [p for p in extra if p[0] >= p[1]]
                msg += f"\n  not candidates: {extra[:5]}" + (
                    "; pairs must have i < j, each pair once" if bad else
                    f": documents {i} and {j} share no whole band (agreeing columns: "
                    f"{np.flatnonzero(sig[i] == sig[j]).tolist()[:12]})")
            return _finish("lsh_candidates", False, msg, s, log)
    return _finish("lsh_candidates", True, f"{trials} random signature sets with planted shared bands: the same "
                   "candidate pairs as dataset_curation.minhash.lsh_candidate_pairs", s, log,
                   uses_reference=_calls_reference(fn, {"lsh_candidate_pairs", "near_duplicate_clusters"}))


@_check
def clusters(fn: Callable, trials: int = 5, seed: int | None = None, log: bool = True) -> Result:
    """fn(n, pairs) -> clusters: connected components of n documents joined by the pairs (i, j).

    Return a list of lists of indices, only components with at least two members, in any order. Pairs chain:
    (0, 1) and (1, 2) put 0, 1, 2 in one cluster. Reference: dataset_curation.minhash.union_find_clusters.
    """
    from dataset_curation.minhash import union_find_clusters

    s = _seed(seed)
    rng = random.Random(s)
    for trial in range(trials):
        n = rng.randint(5, 80)
        pairs = sorted({tuple(sorted(rng.sample(range(n), 2))) for _ in range(rng.randint(0, n))})
        what = f"trial {trial}: n={n}, {len(pairs)} pairs, first {pairs[:6]}"
        expected = sorted(sorted(c) for c in union_find_clusters(n, np.array(pairs, dtype=np.int64).reshape(-1, 2)))
        try:
            got = sorted(sorted(int(i) for i in c) for c in fn(n, [tuple(p) for p in pairs]))
        except Exception as e:
            return _finish("clusters", False, _crash(e, what), s, log)
        if got != expected:
            hint = ""
            if any(len(c) < 2 for c in got):
                hint = "\n  hint: leave out documents with no near-duplicate (clusters of one)"
            elif len(got) > len(expected):
                hint = "\n  hint: more clusters than expected: pairs chain ((0, 1) and (1, 2) make one cluster)"
            return _finish("clusters", False, f"{what}\n  expected {len(expected)} clusters, first "
                           f"{expected[:3]}\n  got {len(got)}, first {got[:3]}{hint}", s, log)
    return _finish("clusters", True, f"{trials} random graphs: the same clusters as union_find_clusters", s, log,
                   uses_reference=_calls_reference(fn, {"union_find_clusters", "near_duplicate_clusters"}))


def band_cost(bands: int, rows: int, threshold: float, points: int = 401) -> float:
    """False-positive plus false-negative probability mass of LSH with bands x rows around a Jaccard threshold.

    The integral of P(s) = 1 - (1 - s^rows)^bands over s < threshold plus that of 1 - P(s) over s >= threshold
    (trapezoid rule on `points` points per side).
    """
    lo = np.linspace(0.0, threshold, points)
    hi = np.linspace(threshold, 1.0, points)
    p = lambda s: 1.0 - (1.0 - s**rows) ** bands
    return float(np.trapezoid(p(lo), lo) + np.trapezoid(1.0 - p(hi), hi))


def best_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """The (bands, rows) with bands * rows <= num_perm and the least band_cost: check.choose_bands' answer."""
    return min(((b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)),
               key=lambda br: band_cost(*br, threshold))


@_check
def choose_bands(fn: Callable, seed: int | None = None, log: bool = True) -> Result:
    """fn(num_perm, threshold) -> (bands, rows) with bands * rows <= num_perm minimising check.band_cost.

    band_cost(b, r, t) is the probability mass of false positives (pairs below t that become candidates) plus false
    negatives (pairs above t that do not). Yours passes when its cost is within 1e-3 of the best over all (b, r).
    """
    s = _seed(seed)
    rng = random.Random(s)
    settings = [(rng.choice([64, 112, 128, 256]), t) for t in rng.sample([0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9], 4)]
    for num_perm, t in settings:
        what = f"num_perm={num_perm}, threshold={t}"
        best = best_bands(num_perm, t)
        try:
            b, r = (int(v) for v in fn(num_perm, t))
        except Exception as e:
            return _finish("choose_bands", False, _crash(e, what), s, log)
        if b < 1 or r < 1 or b * r > num_perm:
            return _finish("choose_bands", False, f"{what}\n  ({b}, {r}) needs {b * r} permutations; at most "
                           f"{num_perm} (bands and rows >= 1)", s, log)
        cost, best_cost = band_cost(b, r, t), band_cost(*best, t)
        if cost > best_cost + 1e-3:
            hint = ""
            if band_cost(r, b, t) <= best_cost + 1e-3:
                hint = "\n  hint: bands and rows are swapped"
            return _finish("choose_bands", False, f"{what}\n  yours bands={b}, rows={r}: cost {cost:.4f} (S-curve "
                           f"midpoint (1/b)^(1/r) = {(1 / b) ** (1 / r):.3f}); the best is bands={best[0]}, "
                           f"rows={best[1]}: cost {best_cost:.4f}{hint}", s, log)
    return _finish("choose_bands", True, f"{len(settings)} (num_perm, threshold) settings: your bands x rows within "
                   "1e-3 of the least false-positive + false-negative mass", s, log)


def _repeated_text(rng: random.Random) -> str:
    pool = [_random_text(rng, rng.randint(1, 8)).strip() for _ in range(rng.randint(2, 8))]
    lines = []
    for _ in range(rng.randint(1, 30)):
        line = rng.choice(pool)
        lines.append(rng.choice(["", " ", "  "]) + line + rng.choice(["", " "]))
        if rng.random() < 0.15:
            lines.append(rng.choice(["", "   "]))
    return "\n".join(lines)


@_check
def dup_lines(fn: Callable, trials: int = 30, seed: int | None = None, log: bool = True) -> Result:
    """fn(text) -> (fraction of lines that repeat an earlier line, fraction of line characters in those repeats).

    Gopher's repetition rule on lines: split on "\\n", strip each line, drop the empty ones; a line is a repeat
    when an identical (stripped) line came before it; the character fraction is the characters of the repeats over
    the characters of all kept lines. A document with no lines gives (0.0, 0.0). Reference:
    dataset_curation.filters (the rule gopher_repetition applies); tolerance 1e-9.
    """
    from dataset_curation.filters import _dup_fraction

    s = _seed(seed)
    rng = random.Random(s)
    for trial in range(trials):
        text = _repeated_text(rng) if trial else ""
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        expected = _dup_fraction(lines)
        what = f"trial {trial}: {len(lines)} non-empty lines, {len(set(lines))} distinct; text {text[:70]!r}"
        try:
            got = tuple(float(v) for v in fn(text))
        except Exception as e:
            return _finish("dup_lines", False, _crash(e, what), s, log)
        if len(got) != 2 or any(abs(a - b) > 1e-9 for a, b in zip(got, expected)):
            counts = Counter(lines)
            every = sum(c for c in counts.values() if c > 1) / max(len(lines), 1)
            hint = ""
            if got and abs(got[0] - every) <= 1e-9 and every != expected[0]:
                hint = "\n  hint: you count the first occurrence too; only the lines after it are repeats"
            elif len(text.split("\n")) != len(lines):
                hint = "\n  hint: strip each line and leave out the empty ones before counting"
            return _finish("dup_lines", False, f"{what}\n  expected {expected}, got {got}{hint}", s, log)
    return _finish("dup_lines", True, f"{trials} random documents (repeated lines, blank lines, stray spaces, one "
                   "empty): equal to dataset_curation's duplicate-line rule", s, log,
                   uses_reference=_calls_reference(fn, {"_dup_fraction", "gopher_repetition"}))


@_check
def bpe_encode(fn: Callable, trials: int = 3, seed: int | None = None, log: bool = True) -> Result:
    """fn(text, merges) -> token ids: encode text with learned byte-level BPE merges (a list of (id, id) pairs).

    Split text with dataset_curation.bpe.pretokenize; in each piece start from its UTF-8 bytes, then repeatedly
    merge the adjacent pair with the lowest rank (merge r makes id 256 + r) everywhere in the piece, until no
    adjacent pair is a merge. Reference: dataset_curation.bpe.BPETokenizer(merges, special_tokens=()).encode (exact).
    """
    from dataset_curation.bpe import BPETokenizer, pretokenize, train_bpe

    s = _seed(seed)
    rng = random.Random(s)
    for trial in range(trials):
        merges = train_bpe(_random_text(rng, rng.randint(150, 300)), vocab_size=256 + rng.randint(30, 90) + 1,
                           special_tokens=()).merges
        text = _random_text(rng, rng.randint(20, 60))
        tok = BPETokenizer(merges, special_tokens=())
        what = f"trial {trial}: {len(merges)} merges, text of {len(text)} characters starting {text[:50]!r}"
        expected = tok.encode(text)
        try:
            got = [int(i) for i in fn(text, [tuple(m) for m in merges])]
        except Exception as e:
            return _finish("bpe_encode", False, _crash(e, what), s, log)
        if got != expected:
            msg = f"{what}\n  expected {len(expected)} ids, got {len(got)}"
            for piece in pretokenize(text):
                want = tok.encode(piece)
                try:
                    mine = [int(i) for i in fn(piece, [tuple(m) for m in merges])]
                except Exception:
                    break
                if mine != want:
                    vocab = tok.vocab
                    show = lambda ids, vocab=vocab: [vocab[i].decode("utf-8", "replace") if 0 <= i < len(vocab) else i
                                                     for i in ids]
                    msg += (f"\n  first piece that differs: {piece!r}\n  expected {want} = {show(want)}\n"
                            f"  got      {mine} = {show(mine)}\n  hint: among the adjacent pairs that are merges, "
                            "merge the one learned first (lowest rank), not the leftmost or the longest token")
                    break
            return _finish("bpe_encode", False, msg, s, log)
    return _finish("bpe_encode", True, f"{trials} random merge lists and texts (with multi-byte characters): the same "
                   "ids as dataset_curation.bpe.BPETokenizer.encode", s, log,
                   uses_reference=_calls_reference(fn, {"BPETokenizer", "_encode_word", "Tokenizer"}))


# ----------------------------------------------------------------------------- references, called like the exercises


def _mlp_formula(x: torch.Tensor, mlp, kind: str = "gelu") -> torch.Tensor:
    h = mlp.c_fc(x)
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return mlp.c_proj(F.silu(gate) * up)
    return mlp.c_proj(torch.relu(h).square() if kind == "relu2" else F.gelu(h))


def _accumulate_ref(model, optimizer, micro_batches) -> float:
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for x, y in micro_batches:
        _, loss = model(x, y)
        (loss / len(micro_batches)).backward()
        losses.append(loss.item())
    optimizer.step()
    return sum(losses) / len(losses)


def _overfit_ref(model, x, y, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def reference(name: str) -> Callable:
    """The package's answer to exercise `name` (a check's name), called like the learner's function."""
    from types import SimpleNamespace

    if name in ("minhash", "lsh_candidates", "clusters"):
        from dataset_curation.minhash import lsh_candidate_pairs, minhash_signatures, union_find_clusters
    if name == "minhash":
        return lambda sets, num_perm, seed: minhash_signatures(sets, num_perm=num_perm, seed=seed)
    if name == "lsh_candidates":
        return lambda sig, bands, rows: [tuple(p) for p in lsh_candidate_pairs(sig, bands, rows).tolist()]
    if name == "clusters":
        return lambda n, pairs: union_find_clusters(n, np.array(list(pairs), dtype=np.int64).reshape(-1, 2))
    if name == "choose_bands":
        return best_bands
    if name == "dup_lines":
        from dataset_curation.filters import _dup_fraction

        return lambda text: _dup_fraction([ln.strip() for ln in text.split("\n") if ln.strip()])
    if name in ("bpe", "bpe_encode"):
        from dataset_curation.bpe import BPETokenizer, train_bpe

        if name == "bpe":
            return lambda text, num_merges: train_bpe(text, vocab_size=256 + num_merges + 1).merges
        return lambda text, merges: BPETokenizer(merges, special_tokens=()).encode(text)
    if name == "perplexity":
        from metrics.perplexity import perplexity as ppl

        return lambda model_fn, ids, window, stride: ppl(model_fn, ids, window, stride).perplexity
    if name == "bleu":
        from metrics.bleu import corpus_bleu

        return lambda hyps, refs: corpus_bleu(hyps, refs, smooth_method="none").score
    if name == "rouge":
        from metrics.rouge import rouge_pair

        return lambda p, r: {k: v.fmeasure for k, v in rouge_pair(p, r, ["rouge1", "rouge2", "rougeL"]).items()}
    if name == "loss_scaler":
        from efficient_training.amp import LossScaler

        return LossScaler
    if name == "lr_schedule":
        from minilm.train import get_lr

        return lambda it, w, d, lr, min_lr: get_lr(it, SimpleNamespace(warmup_iters=w, lr_decay_iters=d, lr=lr,
                                                                       min_lr=min_lr))
    if name in ("block", "gpt"):
        from minilm.model import GPT

        return (lambda x, blk: blk(x)) if name == "block" else GPT
    table = {
        "attention": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "causal_self_attention": lambda x, attn: attn(x),
        "layer_norm": lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], w, b, eps),
        "rms_norm": _rms_norm_ref,
        "mlp": _mlp_formula,
        "rope": _rope_ref,
        "cross_entropy": lambda z, t, ignore_index=-100: F.cross_entropy(z.float(), t, ignore_index=ignore_index),
        "adamw": lambda *a: _adamw_variant(*a, kind="decoupled"),
        "clip_grad_norm": lambda params, max_norm: float(torch.nn.utils.clip_grad_norm_(params, max_norm)),
        "accumulate": _accumulate_ref,
        "overfit": _overfit_ref,
        "sampling": filtered_probs,
    }
    if name not in table:
        raise KeyError(f"no exercise named {name!r}; the checks are listed by `python -m course checks`")
    return table[name]


def scaling_fit(fn: Callable, *args, **kwargs) -> Result:
    """The scaling-law fit exercise (week 18, 08): see course.scaling_check.scaling_fit."""
    from course.scaling_check import scaling_fit as run  # its own module, which imports this one's helpers

    return run(fn, *args, **kwargs)
