"""Self-check for DDP's gradient all-reduce by hand, run in 2 CPU processes (gloo) against one process."""

from __future__ import annotations

import multiprocessing
import tempfile
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn as nn

from course.check._harness import Result, _calls_reference, _check, _crash, _finish, _mismatch, _seed, watching

WATCH_DDP = ("torch.nn.parallel.DistributedDataParallel.__init__",
             "torch.nn.parallel.DistributedDataParallel.forward",
             "efficient_training.ddp.DDP.__init__", "efficient_training.ddp.DDP._launch",
             "efficient_training.ddp.DDP._finish", "efficient_training.ddp.all_reduce_gradients")
TIMEOUT_S = 120


def _cases(seed: int, n: int) -> list[dict]:
    """Random tiny MLPs: sizes, batch per rank, and whether one layer is frozen (its .grad stays None)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    return [dict(seed=r(0, 2**30), d_in=r(3, 9), hidden=r(4, 17), d_out=r(1, 5), per_rank=r(2, 5),
                 frozen=i == n - 1) for i in range(n)]


def _model(case: dict) -> nn.Module:
    torch.manual_seed(case["seed"])  # the same weights on every rank, as after DDP's initial broadcast
    net = nn.Sequential(nn.Linear(case["d_in"], case["hidden"]), nn.Tanh(), nn.LayerNorm(case["hidden"]),
                        nn.Linear(case["hidden"], case["hidden"], bias=False), nn.Tanh(),
                        nn.Linear(case["hidden"], case["d_out"]))
    if case["frozen"]:
        net[3].weight.requires_grad_(False)
    return net


def _batch(case: dict, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(case["seed"] + 1)
    n = case["per_rank"] * world
    return torch.randn(n, case["d_in"], generator=g) * 2, torch.randn(n, case["d_out"], generator=g)


def _step(model: nn.Module, x, y, reduce=None) -> dict:
    """Backward of the mean squared error on (x, y), reduce(model) if given, then one SGD step."""
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    local = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if reduce is not None:
        reduce(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    return {"local": local, "grads": grads, "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _worker(rank: int, world: int, port: int, out: str, fn: Callable, cases: list[dict]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    called: Counter = Counter()
    res: dict = {"cases": [], "error": None, "stub": None}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=TIMEOUT_S // 2))
        for case in cases:
            x, y = _batch(case, world)
            n = case["per_rank"]
            model = _model(case)
            with watching(WATCH_DDP, called, fn):
                res["cases"].append(_step(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n],
                                          lambda m: fn(m, world)))
    except NotImplementedError as e:
        res["stub"] = str(e) or "the exercise still raises NotImplementedError"
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = f" (line {tb[-1].lineno} in {tb[-1].name})" if tb else ""
        res["error"] = f"rank {rank}: your code raised {type(e).__name__}: {e}{where}"
    res["called"] = dict(called)
    torch.save(res, Path(out) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(fn: Callable, cases: list[dict], world: int = 2) -> list[dict | None]:
    """Run fn in `world` forked CPU processes joined by gloo, one _step per case; each rank's results (None if a
    rank never finished). Forked, so fn may be defined in a notebook."""
    from efficient_training.ddp import free_port

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12 warns about fork in a threaded kernel
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, tmp, fn, cases), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(TIMEOUT_S)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        paths = [Path(tmp) / f"rank{r}.pt" for r in range(world)]
        return [torch.load(p, weights_only=False) if p.is_file() else None for p in paths]


def _diagnose(name: str, got: torch.Tensor, local: torch.Tensor, ref: torch.Tensor, world: int) -> str:
    close = lambda a, b: a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    if close(got, ref * world):
        return "\n  hint: that is the SUM over ranks; DDP averages: divide by world_size after the all-reduce"
    if close(got, local):
        return (f"\n  hint: {name}'s gradient is this rank's own: it was not all-reduced, or the result was not "
                "written back into p.grad (all_reduce works in place on the tensor it is given)")
    return ""


def _compare(what: str, ranks: list[dict], ref: dict, world: int) -> str | None:
    for r, res in enumerate(ranks):
        if res["grads"].keys() != ref["grads"].keys():
            return (f"{what}\n  rank {r}'s parameters with a gradient: {sorted(res['grads'])}, "
                    f"expected {sorted(ref['grads'])}")
        for name, expected in ref["grads"].items():
            msg = _mismatch(f"{what}\n  rank {r}, gradient of {name}", res["grads"][name], expected, 1e-6, 1e-5,
                            "grad")
            if msg:
                return msg + _diagnose(name, res["grads"][name], res["local"][name], expected, world)
    for name in ref["weights"]:
        if not all(torch.equal(ranks[0]["weights"][name], res["weights"][name]) for res in ranks[1:]):
            return (f"{what}\n  after one SGD step the ranks' {name} differ: every rank must end with the very "
                    "same gradient (all-reduce on every rank, then the same division everywhere)")
    return None


@_check(hints=(
    "Every rank holds its own shard's gradient in p.grad; DDP replaces it by the mean over ranks, so every copy "
    "takes the same step, equal to one process on the concatenated batch. Invariant: after your function, every "
    "rank's p.grad is identical and equals the whole-batch gradient.",
    "For each parameter whose .grad is not None (frozen ones have none): torch.distributed.all_reduce(p.grad) sums "
    "it in place across ranks (gloo has no ReduceOp.AVG), then p.grad.div_(world_size). Every rank must make the "
    "same calls in the same order, or the collectives pair up the wrong tensors or wait forever.",
))
def ddp_all_reduce(fn: Callable, trials: int = 3, seed: int | None = None, log: bool = True) -> Result:
    """fn(model, world_size): average every parameter's .grad over the processes with torch.distributed.

    Two CPU processes (gloo) each build the same random MLP (one trial freezes a layer, so its .grad is None), run
    backward on their own half of a random batch and call fn; every rank's gradients must equal one process's on
    the whole batch (1e-6 abs + 1e-5 rel), and after one SGD step the ranks' weights must be bitwise equal.
    """
    s = _seed(seed)
    world = 2
    cases = _cases(s, trials)
    ranks = run_ranks(fn, cases, world)
    what = f"{world} processes (gloo), {trials} random MLPs"
    if any(r is None for r in ranks):
        return _finish("ddp_all_reduce", False, f"{what}\n  a rank did not finish within "
                       f"{TIMEOUT_S} s: do all ranks call all_reduce equally often, on tensors of the same shapes?",
                       s, log)
    stub = next((r["stub"] for r in ranks if r["stub"]), None)
    if stub:
        _crash(NotImplementedError(stub), what)
    err = next((r["error"] for r in ranks if r["error"]), None)
    if err:
        return _finish("ddp_all_reduce", False, f"{err}\n  on input: {what}", s, log)
    for i, case in enumerate(cases):
        x, y = _batch(case, world)
        ref = _step(_model(case), x, y)
        desc = (f"trial {i}: MLP {case['d_in']} -> {case['hidden']} -> {case['hidden']} -> {case['d_out']}"
                f"{' (middle layer frozen)' if case['frozen'] else ''}, {case['per_rank']} rows per rank")
        msg = _compare(desc, [r["cases"][i] for r in ranks], ref, world)
        if msg:
            return _finish("ddp_all_reduce", False, msg, s, log)
    called = Counter()
    for r in ranks:
        called.update(r["called"])
    return _finish("ddp_all_reduce", True, f"{what}: every rank's gradients equal one process's on the whole batch, "
                   "and the weights stay identical after a step", s, log,
                   uses_reference=called or _calls_reference(fn, {"DistributedDataParallel", "DDP",
                                                                  "all_reduce_gradients"}))
