"""Data parallelism by hand: DDP with bucketed, overlapped gradient all-reduce, and a ZeRO-1 sharded optimizer.

Every process holds a full copy of the model and trains on its own shard of the global batch. If the copies start
equal (rank 0's weights are broadcast at wrap time) and every step uses the gradient averaged over all processes,
they stay equal, and the training is the same as one process training on the concatenated batch.

The averaging is the cost, so it overlaps with backward: each parameter gets a hook that fires once its gradient
is fully accumulated; parameters are grouped into buckets of about `bucket_cap_mb` (in reverse registration
order, roughly the order backward produces them), and as soon as every gradient of a bucket is ready the bucket
is flattened and its all-reduce is launched asynchronously while backward keeps computing earlier layers. When
the last bucket is launched, the hook waits for all of them and copies the averaged values back into .grad, so
gradients are synchronised by the time loss.backward() returns -- before clipping and the optimizer step.

Collectives are matched by their order on each rank, not by name: if rank 0 launched bucket 1 first and rank 1
bucket 0, the two would be summed together. Autograd need not produce gradients in the same order everywhere
(independent branches, rank-dependent control flow), so buckets are launched in their fixed index order, as
torch's reducer does: a ready bucket waits until every bucket before it has been launched.

    rank, local_rank, world, device = setup()            # reads torchrun's RANK / WORLD_SIZE / MASTER_ADDR ...
    model = DDP(GPT(cfg).to(device))
    x, y = shard(x_global, rank, world), shard(y_global, rank, world)
    _, loss = model(x, y); loss.backward(); optimizer.step()

Run with `torchrun --nproc_per_node=2 your_script.py` (gloo on CPU, nccl on CUDA). `spawn_proof()` runs the
2-process proofs used by the tests and the notebook without torchrun.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from efficient_training.accumulation import accumulate_gradients
from efficient_training.checkpointing import apply_checkpointing
from minilm.config import ModelConfig
from minilm.model import GPT


def setup(backend: str | None = None) -> tuple[int, int, int, torch.device]:
    """Join the process group described by torchrun's environment; returns (rank, local_rank, world, device).

    Backend: nccl when CUDA is available, gloo otherwise. Each process uses GPU number local_rank.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {missing} are not set: start the script with "
                           f"`torchrun --nproc_per_node=N script.py` (or set them yourself, see spawn_proof)")
    from minilm.device import setup_distributed  # the same set-up as minilm.train

    rank, local_rank, world = setup_distributed(backend)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return rank, local_rank, world, device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous slice of a global batch along dim 0 (rank r gets rows r*n .. (r+1)*n - 1)."""
    if batch.size(0) % world_size:
        raise ValueError(f"global batch of {batch.size(0)} rows does not split evenly over {world_size} processes; "
                         f"use a multiple of {world_size}")
    n = batch.size(0) // world_size
    return batch[rank * n : (rank + 1) * n]


def make_buckets(params: list[nn.Parameter], bucket_cap_mb: float) -> list[list[nn.Parameter]]:
    """Group params, last registered first, into buckets of at most bucket_cap_mb (one param may exceed it)."""
    cap = bucket_cap_mb * 2**20
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > cap:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def all_reduce_gradients(params, world_size: int) -> None:
    """Average every .grad of params over all processes in one flat all-reduce, after backward has finished.

    The unbucketed, unoverlapped form of what DDP does during backward: sum, then divide by world_size (gloo has
    no AVG). Parameters without a gradient are skipped, the same ones on every rank.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class DDP(nn.Module):
    """Wrap a model for data-parallel training; gradients are averaged over all processes during backward.

    broadcast=False and average=False exist to show what breaks without them (the tests use them).
    """

    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25.0, broadcast: bool = True, average: bool = True):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call efficient_training.ddp.setup() first")
        self.module = module
        self.world = dist.get_world_size()
        self.average = average
        # parameters() yields a tied weight (wte = lm_head) once: one hook, one all-reduce, one copy.
        self.params = [p for p in module.parameters() if p.requires_grad]
        if broadcast:
            with torch.no_grad():
                for t in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(t, src=0)
        self.buckets = make_buckets(self.params, bucket_cap_mb)
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.require_sync = True
        self.n_allreduce = 0  # all-reduce calls launched so far (tests and the bench read it)
        self.last_launch_order: list[int] = []  # bucket indices in the order the last backward launched them
        self._reset()
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _reset(self) -> None:
        self.ready: list[set[int]] = [set() for _ in self.buckets]
        self.handles: list[tuple[int, torch.Tensor, object]] = []
        self.next_bucket = 0  # buckets < next_bucket have been launched

    def _grad_ready(self, p: torch.Tensor) -> None:
        if not self.require_sync:
            return
        b = self.bucket_of[id(p)]
        if id(p) in self.ready[b]:
            raise RuntimeError("a parameter's gradient became ready twice in one backward pass; DDP expects one "
                               "backward per forward (use no_sync() for gradient accumulation)")
        self.ready[b].add(id(p))
        # launch in index order: the complete buckets from next_bucket on, up to the first incomplete one
        while self.next_bucket < len(self.buckets) and \
                len(self.ready[self.next_bucket]) == len(self.buckets[self.next_bucket]):
            self._launch(self.next_bucket)
            self.next_bucket += 1
        if self.next_bucket == len(self.buckets):
            self._finish()

    def _launch(self, b: int) -> None:
        flat = torch.cat([q.grad.reshape(-1) for q in self.buckets[b]])
        if self.average:
            flat.div_(self.world)  # divide before summing, as torch DDP does: keeps fp16 sums in range
        self.handles.append((b, flat, dist.all_reduce(flat, async_op=True)))
        self.n_allreduce += 1

    def _finish(self) -> None:
        self.last_launch_order = [b for b, _, _ in self.handles]
        for b, flat, handle in self.handles:
            handle.wait()
            offset = 0
            for q in self.buckets[b]:
                q.grad.copy_(flat[offset : offset + q.numel()].view_as(q.grad))
                offset += q.numel()
        self._reset()

    def forward(self, *args, **kwargs):
        if any(self.ready) or self.handles:
            names = {id(p): n for n, p in self.module.named_parameters()}
            waiting = [names[id(p)] for b, bucket in enumerate(self.buckets) for p in bucket
                       if id(p) not in self.ready[b]]
            self._reset()
            raise RuntimeError(f"the last backward left gradients unsynchronised: parameters {waiting[:5]} got no "
                               f"gradient. Every parameter must take part in the loss (or set requires_grad=False)")
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (no all-reduce) for the forward/backward passes inside this block."""
        old, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = old


class ZeroOptimizer:
    """ZeRO stage 1: each rank keeps optimizer state for, and updates, only its shard of the parameters.

    Gradients are still all-reduced in full (DDP); after the local step each rank broadcasts its shard so all
    copies are equal again. With Adam the state is 2 floats per parameter, so each rank holds 1/world of it.
    Parameters are assigned whole, largest first, to the least loaded rank (the same on every rank).
    """

    def __init__(self, params, optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW, **defaults):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call efficient_training.ddp.setup() first")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        all_params = [p for g in groups for p in g["params"]]
        load = [0] * self.world
        self.owner: dict[int, int] = {}
        for i in sorted(range(len(all_params)), key=lambda i: (-all_params[i].numel(), i)):
            r = min(range(self.world), key=lambda r: load[r])
            self.owner[id(all_params[i])] = r
            load[r] += all_params[i].numel()
        self.all_params = all_params
        self.shards = [[p for p in all_params if self.owner[id(p)] == r] for r in range(self.world)]
        local = [{**g, "params": [p for p in g["params"] if self.owner[id(p)] == self.rank]} for g in groups]
        local = [g for g in local if g["params"]]
        if not local:
            raise ValueError(f"rank {self.rank} owns no parameters: the model has fewer parameter tensors than "
                             f"processes ({self.world})")
        self.optimizer = optimizer_class(local, **defaults)
        self.param_groups = self.optimizer.param_groups  # for learning-rate schedules

    @torch.no_grad()
    def step(self, broadcast: bool = True) -> None:
        self.optimizer.step()
        if not broadcast:  # only to show the bug: the other shards never arrive
            return
        for r, shard_params in enumerate(self.shards):
            flat = torch.cat([p.reshape(-1) for p in shard_params])
            dist.broadcast(flat, src=r)
            if r != self.rank:
                offset = 0
                for p in shard_params:
                    p.copy_(flat[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.all_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank."""
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                   if torch.is_tensor(t))

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state (save one file per rank)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# The proofs: 2 (or more) CPU processes with gloo against one process training on the concatenated batch.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proof_batches(steps: int = 3, global_batch: int = 4, seq: int = 16, vocab: int = 96, ignore: bool = False,
                  seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed random global batches; ignore=True marks some targets -1 so the ranks hold unequal token counts."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        x = torch.randint(0, vocab, (global_batch, seq), generator=gen)
        y = torch.randint(0, vocab, (global_batch, seq), generator=gen)
        if ignore:
            y[0, seq // 4 :] = -1  # rank 0's first row keeps a quarter of its targets
            y[-1, : seq // 2] = -1
        batches.append((x, y))
    return batches


def _proof_model(seed: int, checkpointed: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    return apply_checkpointing(model) if checkpointed else model


class _TwoBranch(nn.Module):
    """Two independent branches; autograd runs the one built last first, so `a_first` sets the gradient order."""

    def __init__(self, seed: int, a_first: bool):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)  # equal sizes: a swap is silent
        self.a_first = a_first

    def forward(self, x, y):
        if self.a_first:
            ha, hb = torch.tanh(self.a(x)), torch.tanh(self.b(x))
        else:
            hb, ha = torch.tanh(self.b(x)), torch.tanh(self.a(x))
        return None, ((ha * hb - y) ** 2).mean()


def branch_batches(steps: int = 3, global_batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(global_batch, 8, generator=gen), torch.randn(global_batch, 8, generator=gen))
            for _ in range(steps)]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace(".block.", "."): p.detach().clone() for n, p in model.named_parameters()}


def _train(model, opt, batches, rank: int = 0, world: int = 1, micro: bool = False, sync_last_only: bool = True,
           **step_kw):
    for x, y in batches:
        xs, ys = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad(set_to_none=True)
        if micro:  # two micro-batches of different sizes and token counts
            accumulate_gradients(model, [(xs[:1], ys[:1]), (xs[1:], ys[1:])], sync_last_only=sync_last_only)
        else:
            _, loss = model(xs, ys)
            loss.backward()
        opt.step(**step_kw)


def reference_params(steps: int = 3, global_batch: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """One process, whole global batches: what every DDP scenario must reproduce."""
    plain = proof_batches(steps, global_batch)
    ref = {}
    for name, opt_fn, batches in (("sgd", _sgd, plain), ("adamw", _adamw, plain),
                                  ("sgd_ignore", _sgd, proof_batches(steps, global_batch, ignore=True))):
        model = _proof_model(0)
        _train(model, opt_fn(model.parameters()), batches)
        ref[name] = _params(model)
    model = _TwoBranch(0, a_first=True)
    _train(model, _sgd(model.parameters()), branch_batches(steps, global_batch))
    ref["branches"] = _params(model)
    return ref


def _proof_worker(rank: int, world: int, port: int, out_dir: str, steps: int, global_batch: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    setup("gloo")
    plain, ignore = proof_batches(steps, global_batch), proof_batches(steps, global_batch, ignore=True)
    out: dict[str, object] = {}

    def run(name, wrap, opt_fn=_sgd, batches=plain, micro=False, checkpointed=False, sync_last_only=True,
            **step_kw):
        # Each rank starts from different weights (seed = rank): only the initial broadcast makes them equal.
        model = _proof_model(rank, checkpointed)
        wrapped = wrap(model)
        opt = opt_fn(wrapped.parameters())
        _train(wrapped, opt, batches, rank, world, micro, sync_last_only, **step_kw)
        out[name] = _params(model)
        return wrapped, opt

    ours, _ = run("ours", lambda m: DDP(m, bucket_cap_mb=0.01))
    out["n_buckets"] = len(ours.buckets)
    out["allreduce_per_step"] = ours.n_allreduce / steps
    run("torch_ddp", lambda m: nn.parallel.DistributedDataParallel(m, bucket_cap_mb=0.01))
    run("no_broadcast", lambda m: DDP(m, broadcast=False))
    run("no_average", lambda m: DDP(m, average=False))
    run("checkpointed", lambda m: DDP(m, bucket_cap_mb=0.01), checkpointed=True)
    acc, _ = run("accumulation", lambda m: DDP(m, bucket_cap_mb=0.01), batches=ignore, micro=True)
    out["accumulation_allreduce_per_step"] = acc.n_allreduce / steps
    out["accumulation_n_buckets"] = len(acc.buckets)
    acc, _ = run("accumulation_sync_every", lambda m: DDP(m, bucket_cap_mb=0.01), batches=ignore, micro=True,
                 sync_last_only=False)
    out["sync_every_allreduce_per_step"] = acc.n_allreduce / steps
    # ZeRO-1 with SGD+momentum is compared with one process; with AdamW with DDP + a full AdamW on every rank
    # (Adam's 1/sqrt(v) magnifies last-bit differences of near-zero gradients, see the tests).
    run("zero1_sgd", DDP, opt_fn=lambda ps: ZeroOptimizer(ps, torch.optim.SGD, lr=0.1, momentum=0.9))
    zero = lambda params: ZeroOptimizer(params, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    _, zopt = run("zero1", DDP, opt_fn=zero)
    _, full = run("ddp_adamw", DDP, opt_fn=_adamw)
    out["zero1_state_bytes"] = zopt.state_bytes()
    out["adamw_state_bytes"] = sum(t.numel() * t.element_size() for s in full.state.values() for t in s.values())
    run("zero1_no_broadcast", DDP, opt_fn=zero, broadcast=False)
    # The ranks' autograd produces gradients in opposite orders: launching buckets as they become ready would sum
    # rank 0's gradient of b with rank 1's gradient of a (same size, so nothing complains).
    two = _TwoBranch(rank, a_first=rank == 0)
    ready = []
    ddp_two = DDP(two, bucket_cap_mb=1e-4)  # 256-byte weights: one bucket each
    for n, q in two.named_parameters():
        q.register_post_accumulate_grad_hook(lambda _, n=n: ready.append(n))  # runs after DDP's own hook
    _train(ddp_two, _sgd(ddp_two.parameters()), branch_batches(steps, global_batch), rank, world)
    out["branches"] = _params(two)
    out["branches_ready_order"] = ready[:2]
    out["branches_launch_order"] = ddp_two.last_launch_order
    # A parameter outside the loss never gets a gradient: the next forward must say so, not hang or go on.
    net = DDP(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    net.module[0](torch.ones(1, 2)).sum().backward()
    try:
        net(torch.ones(1, 2))
        out["unused_error"] = ""
    except RuntimeError as e:
        out["unused_error"] = str(e)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    cleanup()


def spawn_proof(world_size: int = 2, steps: int = 3, global_batch: int = 4) -> dict:
    """Run every DDP/ZeRO scenario in world_size CPU processes (gloo); returns {"ranks": [...], "reference": ...}.

    ranks[r][scenario] maps parameter names to rank r's final values; reference holds single-process training
    on the concatenated batches ("sgd", "adamw" for ZeRO-1, "sgd_ignore" for accumulation with unequal tokens).
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_proof_worker, args=(world_size, free_port(), tmp, steps, global_batch), nprocs=world_size)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    return {"ranks": ranks, "reference": reference_params(steps, global_batch)}


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc_per_node=2 -m efficient_training.ddp`: a short DDP run on random tokens, then a check
    that every rank ends with the same weights."""
    import argparse

    p = argparse.ArgumentParser(description="short data-parallel run of a tiny GPT with this package's DDP")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="global batch, split over the processes")
    p.add_argument("--zero1", action="store_true", help="shard the AdamW state over the processes (ZeRO-1)")
    args = p.parse_args(argv)
    rank, _, world, device = setup()
    torch.manual_seed(rank)  # different on purpose: DDP's broadcast makes the copies equal
    cfg = ModelConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64)
    model = DDP(GPT(cfg).to(device))
    if args.zero1:
        opt = ZeroOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)  # the same global batches on every rank; each takes its shard
    for step in range(args.steps):
        x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), generator=gen)
        x, y = shard(x, rank, world).to(device), shard(x.roll(-1, 1), rank, world).to(device)
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss on rank 0's shard {loss.item():.4f}", flush=True)
    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    spread = float((high - low).abs().max())
    if rank == 0:
        verdict = "ranks agree" if spread == 0 else "MISMATCH"
        print(f"{world} processes, {len(model.buckets)} buckets, {model.n_allreduce} all-reduces; "
              f"largest difference between ranks' weights: {spread:.1e} ({verdict})")
    cleanup()


if __name__ == "__main__":
    main()
