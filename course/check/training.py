"""Self-checks for the training loop: gradient accumulation and overfitting one batch."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import torch

from course.check._harness import (
    Result,
    _calls_reference,
    _check,
    _crash,
    _finish,
    _model_config,
    _seed,
    watching,
)


def _tiny_gpt(g: torch.Generator, vocab: int = 32, n_embd: int = 16, n_layer: int = 1):
    from minilm.model import GPT

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))  # the model's init draws from the global RNG
    return GPT(_model_config(vocab_size=vocab, block_size=16, n_layer=n_layer, n_head=2, n_embd=n_embd, dropout=0.0))


WATCH_ACCUMULATE = ("course.check.reference._accumulate_ref",)


@_check(hints=(
    "Gradients add up across backward calls, so backward each micro-batch's loss divided by the number of "
    "micro-batches and take a single optimizer step at the end. Invariant: with equal-size micro-batches the update "
    "equals one step on the concatenated batch, and the loss you report is the mean over the micro-batches.",
    "Zero the gradients once before the first micro-batch, not between them, and step once after the last. Without "
    "the division the update is n times too large; report the mean of the undivided losses as a plain number."))
def accumulate(fn: Callable, trials: int = 2, seed: int | None = None, log: bool = True) -> Result:
    """fn(model, optimizer, micro_batches) -> mean loss: one optimizer step from several micro-batches.

    micro_batches is a list of (x, y) of equal size; model(x, y) returns (logits, loss). Zero the gradients,
    backward loss / len(micro_batches) for each, then one optimizer.step(). The result must equal one step on
    the concatenated batch. The check calls fn twice (two steps, plain SGD) on a tiny minilm GPT and compares
    the parameters with the big-batch steps; tolerance 1e-6 abs + 1e-5 rel.
    """
    import copy

    s = _seed(seed)
    called = Counter()
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
                with watching(WATCH_ACCUMULATE, called, fn):
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
                   "the big-batch steps within 1e-5", s, log, uses_reference=called or _calls_reference(fn, set()))


WATCH_OVERFIT = ("course.check.reference._overfit_ref",)


@_check(hints=(
    "A working loop memorises one small batch: forward, backward, optimizer step, with the gradients zeroed in every "
    "step. Invariant: the loss starts near ln(vocab) and keeps falling, well below the target within the steps.",
    "backward() adds into .grad, so zero the gradients (optimizer.zero_grad()) in every step before backward, or "
    "each step uses the sum of all earlier gradients. Make the optimizer once, outside the loop, so its state "
    "carries on; AdamW at about 1e-2 gets there; record one loss per step as a float."))
def overfit(fn: Callable, steps: int = 150, target: float = 0.3, seed: int | None = None, log: bool = True) -> Result:
    """fn(model, x, y, steps) -> the list of losses: train model on the one batch (x, y) for `steps` steps.

    model(x, y) returns (logits, loss); choose the optimizer and learning rate yourself. A correct loop drives a
    tiny GPT's loss on a fixed batch of random tokens (about ln 64 = 4.16 at the start) below `target` in 150
    steps: the check measures the loss on (x, y) itself afterwards.
    """
    s = _seed(seed)
    called = Counter()
    g = torch.Generator().manual_seed(s)
    model = _tiny_gpt(g, vocab=64, n_embd=32, n_layer=1)
    x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        start = float(model.eval()(x, y)[1])
    model.train()
    what = f"a 1-layer GPT (vocab 64), one batch of (2, 16) random tokens, {steps} steps; loss at the start {start:.3f}"
    stale: list[bool] = []  # per backward pass: did .grad still hold the previous step's gradient?
    first = next(model.parameters())
    hook = first.register_hook(lambda grad: stale.append(first.grad is not None and bool(first.grad.abs().sum() > 0)))
    try:
        with watching(WATCH_OVERFIT, called, fn):
            losses = [float(v) for v in fn(model, x.clone(), y.clone(), steps)]
    except Exception as e:
        return _finish("overfit", False, _crash(e, what), s, log)
    finally:
        hook.remove()
    with torch.no_grad():
        end = float(model.eval()(x, y)[1])
    if len(losses) != steps:
        return _finish("overfit", False, f"{what}\n  expected {steps} losses (one per step), got {len(losses)}", s, log)
    if not math.isfinite(end) or end >= target:
        changed = any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
        if not changed:
            hint = "the parameters never changed: loss.backward() then optimizer.step() in every step"
        elif len(stale) > 1 and sum(stale[1:]) > 0.5 * (len(stale) - 1):
            hint = (f"in {sum(stale[1:])} of {len(stale) - 1} backward passes after the first, .grad still held the "
                    "earlier steps' gradients: backward() adds to .grad, so each step used the sum of all gradients "
                    "so far; zero them (optimizer.zero_grad()) before every backward")
        elif not math.isfinite(end):
            hint = "the loss diverged: lower the learning rate"
        elif end > 0.8 * start:
            hint = "the loss hardly moved: the learning rate is far too low (AdamW with lr 1e-2 gets there)"
        else:
            hint = "falling but not fast enough: a larger learning rate (AdamW 1e-2) gets there"
        return _finish("overfit", False, f"{what}\n  loss after training {end:.4f}, needed below {target} (your last "
                       f"logged loss {losses[-1]:.4f})\n  hint: {hint}", s, log)
    return _finish("overfit", True, f"{what}\n  loss after training {end:.4f} (below {target}): the loop learns", s,
                   log, uses_reference=called or _calls_reference(fn, set()))
