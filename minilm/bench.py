"""Benchmark training and generation on this device; prints markdown tables.

    python -m minilm.bench                 # all presets that fit, fp32/bf16, eager/compiled, generation
    python -m minilm.bench --quick         # fewer steps and configurations

Training throughput is also measured for a plain nanoGPT-style model of the same shape (written here, in the
simplest form), so the ratio shows what minilm's extra features cost per step.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.config import ModelConfig, get_preset
from minilm.model import GPT


class PlainGPT(nn.Module):
    """The reference: a GPT-2 decoder with nothing but the forward pass and the loss."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList()
        for _ in range(c.n_layer):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(c.n_embd), qkv=nn.Linear(c.n_embd, 3 * c.n_embd), proj=nn.Linear(c.n_embd, c.n_embd),
                ln2=nn.LayerNorm(c.n_embd), fc=nn.Linear(c.n_embd, 4 * c.n_embd),
                out=nn.Linear(4 * c.n_embd, c.n_embd))))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.head.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](x)).split(self.c.n_embd, dim=2)
            q, k, v = (t.view(B, T, self.c.n_head, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + b["proj"](y)
            x = x + b["out"](F.gelu(b["fc"](b["ln2"](x))))
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else device.upper()


def peak_memory_mb(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def time_training(model: nn.Module, cfg: ModelConfig, batch: int, steps: int, device: str, dtype: str,
                  compile_: bool) -> dict:
    """Tokens/s of forward+backward+AdamW step on random tokens, after warm-up steps."""
    torch.manual_seed(0)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    run = torch.compile(model) if compile_ else model
    kind = device.split(":")[0]
    ctx = (torch.autocast(kind, dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext())
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with ctx:
            _, loss = run(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        step()
    warm = time.perf_counter() - t0
    if kind == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if kind == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"tokens_per_s": steps * batch * cfg.block_size / dt, "warmup_s": warm, "peak_mb": peak_memory_mb(device)}


@torch.no_grad()
def time_generation(model: GPT, prompt_len: int, new: int, device: str, use_cache: bool) -> float:
    """Tokens/s for greedy generation of `new` tokens after a `prompt_len` prompt, batch 1."""
    model = model.to(device).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    model.generate(idx, 4, temperature=0, use_cache=use_cache)  # warm-up
    t0 = time.perf_counter()
    model.generate(idx, new, temperature=0, use_cache=use_cache)
    return new / (time.perf_counter() - t0)


def fmt(v, spec=",.0f", none="n/a") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer steps and configurations")
    p.add_argument("--gen_tokens", type=int, default=512, help="new tokens for the KV-cache comparison")
    a = p.parse_args(argv)
    dev = a.device
    cpu = dev == "cpu"
    name = device_name(dev)
    print(f"device: {name}, torch {torch.__version__}, threads: {torch.get_num_threads()}\n")

    # ---- training throughput
    rows = []
    presets = {"tiny": 16, "small": 8, "mini_lm": 4 if cpu else 16}
    dtypes = ["float32", "bfloat16"] if (not dev.startswith("cuda") or torch.cuda.is_bf16_supported()) else \
        ["float32", "float16"]
    for preset, batch in presets.items():
        cfg = get_preset(preset).model
        steps = (3 if preset == "mini_lm" else 8 if preset == "small" else 20) if cpu else 20
        if a.quick:
            steps = max(2, steps // 3)
        variants = [(d, c) for d in dtypes for c in (False, True)]
        if cpu and preset != "tiny" or a.quick:
            variants = [(d, False) for d in dtypes]  # compiling the larger presets costs minutes on a CPU
        for dtype, comp in variants:
            r = time_training(GPT(cfg), cfg, batch, steps, dev, dtype, comp)
            mfu, _ = GPT(cfg).estimate_mfu(r["tokens_per_s"], name, dtype)
            rows.append((preset, dtype, "compiled" if comp else "eager", batch, r["tokens_per_s"], mfu, r["peak_mb"]))
            print(f"  measured {preset} {dtype} {'compiled' if comp else 'eager'}: {r['tokens_per_s']:,.0f} tok/s",
                  flush=True)
    print("\n## Training throughput\n")
    print("| preset | dtype | mode | batch x block | tokens/s | MFU | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|")
    for preset, dtype, mode, batch, tps, mfu, mem in rows:
        block = get_preset(preset).model.block_size
        print(f"| {preset} | {dtype} | {mode} | {batch} x {block} | {tps:,.0f} | {fmt(mfu, '.1%')} | "
              f"{fmt(mem, ',.0f', 'n/a (CPU)')} |")

    # ---- minilm vs a plain nanoGPT-style model, same config
    cfg = get_preset("tiny").model
    steps = 10 if a.quick else 30
    ours, plain = [], []
    for _ in range(3):  # interleaved repeats: the machine's background load hits both alike
        ours.append(time_training(GPT(cfg), cfg, 16, steps, dev, "float32", False)["tokens_per_s"])
        plain.append(time_training(PlainGPT(cfg), cfg, 16, steps, dev, "float32", False)["tokens_per_s"])
    print("\n## tiny preset vs a plain nanoGPT-style model (fp32, eager, best of 3)\n")
    print("| model | tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| plain nanoGPT-style | {max(plain):,.0f} | 1.00 |")
    print(f"| minilm | {max(ours):,.0f} | {max(ours) / max(plain):.2f} |")

    # ---- generation
    print("\n## Generation, batch 1, greedy\n")
    print("| model | prompt + new tokens | KV cache | tokens/s | speed-up |")
    print("|---|---|---|---|---|")
    gen_cfg = get_preset("small").model
    gen_cfg.block_size = 1024  # room for the prompt and all new tokens, so the cache is never refilled
    new = a.gen_tokens if not a.quick else 128
    torch.manual_seed(0)
    model = GPT(gen_cfg)
    with_cache = time_generation(model, 16, new, dev, True)
    without = time_generation(model, 16, new, dev, False)
    print(f"| small (block 1024) | 16 + {new} | no | {without:,.1f} | 1.00 |")
    print(f"| small (block 1024) | 16 + {new} | yes | {with_cache:,.1f} | {with_cache / without:.1f}x |")
    torch.manual_seed(0)
    big = GPT(get_preset("mini_lm").model)
    n_big = 128 if not a.quick else 32
    big_rate = time_generation(big, 16, n_big, dev, True)
    print(f"| mini_lm ({big.num_params() / 1e6:.1f}M) | 16 + {n_big} | yes | {big_rate:,.1f} | |")


if __name__ == "__main__":
    main()
