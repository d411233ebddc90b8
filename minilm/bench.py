"""Benchmark training and generation on this device; prints markdown tables.

    python -m minilm.bench                 # all presets that fit, fp32/bf16, eager/compiled, generation
    python -m minilm.bench --quick         # fewer steps and configurations
    python -m minilm.bench --only generate --quality_run out/mini_lm   # decode rows + val loss per weight format

Training throughput is also measured for a plain nanoGPT-style model of the same shape (written here, in the
simplest form), so the ratio shows what minilm's extra features cost per step.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.config import ModelConfig, get_preset
from minilm.device import gpu_has_bf16
from minilm.inference.compiled import CompilerMissing, check_compiler, length_bucket
from minilm.model import GPT
from minilm.quantize import CPU_ONLY, WEIGHTS, use_weights, weight_bytes


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
def time_generation(model: GPT, prompt_len: int, new: int, device: str, use_cache: bool, repeats: int = 1,
                    compile: bool = False) -> float:
    """Tokens/s for greedy generation of `new` tokens after a `prompt_len` prompt, batch 1 (best of repeats).

    The warm-up call is not timed; with compile it is the call that compiles (same lengths, so the same graph)."""
    model = model.to(device).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    model.generate(idx, new if compile else 4, temperature=0, use_cache=use_cache, compile=compile)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(idx, new, temperature=0, use_cache=use_cache, compile=compile)
        best = max(best, new / (time.perf_counter() - t0))
    return best


def has_compiler(device: str) -> bool:
    """torch.compile can run here: a CPU with a C++ compiler, or a CUDA GPU (MPS support is experimental)."""
    if torch.device(device).type not in ("cpu", "cuda"):
        return False
    try:
        check_compiler(device)
        return True
    except CompilerMissing:
        return False


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of reading an nbytes buffer once (a sum over it), best of repeats: what one decode step's weight
    reads can reach at most. Same size as the weights, so caches help it exactly as much as they help decoding."""
    buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def kv_bytes(cfg: ModelConfig, context: float) -> float:
    """Bytes of keys and values one decode step reads at a given context length (fp32 cache)."""
    return 2 * cfg.n_layer * context * cfg.n_embd * 4


@torch.no_grad()
def val_loss(model: GPT, tokens: np.ndarray, block_size: int, windows: int = 32, batch: int = 8) -> float:
    """Mean next-token loss over the first `windows` non-overlapping windows of `tokens` (the same for every
    model, so differences are the model's)."""
    n = min(windows, (len(tokens) - 1) // block_size)
    if n < 1:
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than one window of {block_size}")
    losses = []
    for start in range(0, n, batch):
        rows = range(start, min(n, start + batch))
        x = torch.from_numpy(np.stack([tokens[i * block_size : (i + 1) * block_size] for i in rows]).astype(np.int64))
        y = torch.from_numpy(np.stack([tokens[i * block_size + 1 : (i + 1) * block_size + 1] for i in rows])
                             .astype(np.int64))
        _, loss = model(x, y)
        losses.append(loss.item() * len(rows))
    return sum(losses) / n


def decode_rows(cfg: ModelConfig, weights: list[str], prompt_len: int, new: int, dev: str,
                compile: bool = False) -> list[dict]:
    """Batch-1 greedy decode speed of a randomly initialised model of this shape in each weight format, with the
    memory-bandwidth ceiling: bandwidth / bytes read per token (weights + the KV cache at the mean context; a
    compiled step reads its whole static cache, prompt + new rounded up to 64 slots)."""
    rows = []
    for w in weights:
        torch.manual_seed(0)
        model = use_weights(GPT(cfg).eval(), w)
        kv_len = length_bucket(cfg.block_size, prompt_len + new) if compile else prompt_len + new / 2
        nbytes = weight_bytes(model) + kv_bytes(cfg, kv_len)
        rate = time_generation(model, prompt_len, new, dev, True, repeats=2, compile=compile)
        bw = read_bandwidth(weight_bytes(model)) if dev == "cpu" else None
        ceiling = bw / nbytes if bw else None
        rows.append({"weights": w, "compiled": compile, "tokens_per_s": rate, "mb_per_token": nbytes / 1e6,
                     "bandwidth_gb_s": bw and bw / 1e9, "ceiling_tokens_per_s": ceiling,
                     "of_ceiling": ceiling and rate / ceiling})
        del model
    return rows


def quality_rows(run: str, weights: list[str], windows: int, data_dir: str | None = None) -> list[dict]:
    """Validation loss of a trained run in each weight format (on data_dir's val split, default the run's)."""
    from minilm.data import TokenData
    from minilm.sample import load_run

    rows, ref = [], None
    for w in weights:
        model, _, ckpt = load_run(run, "cpu", data_dir=data_dir, weights=w)
        tokens = TokenData(data_dir or ckpt["config"]["train"]["data_dir"], "val").tokens
        loss = val_loss(model, tokens, model.config.block_size, windows)
        ref = loss if ref is None else ref
        rows.append({"weights": w, "val_loss": loss, "delta": loss - ref})
    return rows


def fmt(v, spec=",.0f", none="n/a") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


SECTIONS = ("train", "plain", "generate")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer steps and configurations")
    p.add_argument("--gen_tokens", type=int, default=512, help="new tokens for the KV-cache comparison")
    p.add_argument("--decode_tokens", type=int, default=128, help="new tokens for the decode rows")
    p.add_argument("--decode_preset", default="mini_lm", help="model shape of the decode rows")
    p.add_argument("--kv_preset", default="small", help="model shape of the KV cache vs recompute comparison")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--weights", default=",".join(WEIGHTS), help="weight formats for the decode rows")
    p.add_argument("--compile", default="auto", choices=["auto", "yes", "no"],
                   help="also time each format with the compiled decode step (auto: when a C++ compiler is found "
                        "or on a GPU; each format compiles once, ~1 min on a 2-core CPU)")
    p.add_argument("--threads", default=None,
                   help="comma-separated torch thread counts for the generation sections (default: 1 and all)")
    p.add_argument("--quality_run", default=None,
                   help="a trained run dir: also compare its validation loss in each weight format")
    p.add_argument("--quality_windows", type=int, default=64, help="validation windows of block_size tokens")
    p.add_argument("--data_dir", default=None,
                   help="the quality run's data dir, when not where its config says (the path is relative to the "
                        "directory it was trained from)")
    a = p.parse_args(argv)
    sections = [x for x in a.only.split(",") if x]
    weights = [w for w in a.weights.split(",") if w]
    bad = [x for x in sections if x not in SECTIONS] + [w for w in weights if w not in WEIGHTS]
    if bad:
        p.error(f"unknown section or weight format {bad}; sections: {', '.join(SECTIONS)}; weights: "
                f"{', '.join(WEIGHTS)}")
    dev = a.device
    cpu = dev == "cpu"
    if not cpu and any(w in CPU_ONLY for w in weights):  # their int8 kernels are CPU kernels (minilm.quantize)
        print(f"skipping the CPU-only weight formats {', '.join(w for w in weights if w in CPU_ONLY)} on {dev}")
        weights = [w for w in weights if w not in CPU_ONLY]
    name = device_name(dev)
    print(f"device: {name}, torch {torch.__version__}, threads: {torch.get_num_threads()}\n")
    if "train" in sections:
        train_section(a, dev, cpu, name)
    if "plain" in sections:
        plain_section(a, dev)
    if "generate" in sections:
        threads = sorted({1, torch.get_num_threads()}) if a.threads is None else [int(t) for t in a.threads.split(",")]
        generate_section(a, dev, weights, threads)
    if a.quality_run:
        print(f"\n## Quality of the weight formats: {a.quality_run}, first {a.quality_windows} validation windows\n")
        print("| weights | val loss | vs fp32 |")
        print("|---|---|---|")
        for r in quality_rows(a.quality_run, ["fp32"] + [w for w in weights if w != "fp32"], a.quality_windows,
                                  a.data_dir):
            print(f"| {r['weights']} | {r['val_loss']:.4f} | {r['delta']:+.4f} |")


def train_section(a, dev: str, cpu: bool, name: str) -> None:
    rows = []
    presets = {"tiny": 16, "small": 8, "mini_lm": 4 if cpu else 16}
    # gpu_has_bf16: torch.cuda.is_bf16_supported() is True on T4/V100 too, where bf16 is only emulated
    dtypes = ["float32", "bfloat16"] if (not dev.startswith("cuda") or gpu_has_bf16(dev)) else \
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


def plain_section(a, dev: str) -> None:
    """minilm vs a plain nanoGPT-style model, same config."""
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


def generate_section(a, dev: str, weights: list[str], threads: list[int]) -> None:
    """KV cache vs recompute, then decode speed by weight format, at each thread count.

    Decoding one token is little work per op, so a second thread helps it less than it helps recomputing a long
    context: both are shown, and the speed-up is taken at equal thread counts.
    """
    before = torch.get_num_threads()
    new = a.gen_tokens if not a.quick else 128
    gen_cfg = get_preset(a.kv_preset).model
    gen_cfg.block_size = max(1024, 16 + new)  # room for the prompt and all new tokens: the cache is never refilled
    label = f"{a.kv_preset} (block {gen_cfg.block_size})"
    print("\n## Generation, batch 1, greedy: KV cache vs recomputing the whole context (fp32)\n")
    print("| model | threads | prompt + new tokens | KV cache | tokens/s | speed-up |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    model = GPT(gen_cfg)
    compile = a.compile == "yes" or (a.compile == "auto" and has_compiler(dev))
    for n in threads:
        torch.set_num_threads(n)
        with_cache = time_generation(model, 16, new, dev, True, repeats=2)
        without = time_generation(model, 16, new, dev, False)
        print(f"| {label} | {n} | 16 + {new} | no | {without:,.1f} | 1.00 |")
        print(f"| {label} | {n} | 16 + {new} | yes | {with_cache:,.1f} | {with_cache / without:.1f}x |", flush=True)
        if compile:
            compiled = time_generation(model, 16, new, dev, True, repeats=2, compile=True)
            print(f"| {label} | {n} | 16 + {new} | yes, compiled step | {compiled:,.1f} | {compiled / without:.1f}x |",
                  flush=True)

    cfg = get_preset(a.decode_preset).model
    n_big = a.decode_tokens if not a.quick else 32
    params = GPT(cfg).num_params() / 1e6
    print(f"\n## {a.decode_preset} ({params:.1f}M) decode, batch 1, greedy, 16 + {n_big} tokens, by weight format\n")
    print("The ceiling is the measured read bandwidth (a buffer the size of the weights) over the bytes one step "
          "reads (weights + KV cache: at the mean context eager, the whole static cache compiled). A compiled "
          "step (`generate(compile=True)`) runs each token as a few fused kernels; its first call compiles and is "
          "not timed.\n")
    if not compile:
        print(f"(no compiled rows: --compile={a.compile}" + ("" if a.compile == "no" else ", no C++ compiler found")
              + ")\n")
    print("| weights | step | threads | MB read / token | read bandwidth (GB/s) | ceiling (tokens/s) | tokens/s "
          "| of ceiling | vs eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in threads:
        torch.set_num_threads(n)
        eager = {r["weights"]: r for r in decode_rows(cfg, weights, 16, n_big, dev)}
        for r in list(eager.values()) + (decode_rows(cfg, weights, 16, n_big, dev, compile=True) if compile else []):
            ratio = r["tokens_per_s"] / eager[r["weights"]]["tokens_per_s"]
            print(f"| {r['weights']} | {'compiled' if r['compiled'] else 'eager'} | {n} | {r['mb_per_token']:.1f} | "
                  f"{fmt(r['bandwidth_gb_s'], '.1f')} | {fmt(r['ceiling_tokens_per_s'], ',.0f')} | "
                  f"{r['tokens_per_s']:,.1f} | {fmt(r['of_ceiling'], '.0%')} | {ratio:.2f}x |", flush=True)
    torch.set_num_threads(before)


if __name__ == "__main__":
    main()
