"""A decoder-only transformer in two flavours chosen by ModelConfig.

The GPT-2 block (the defaults, the teaching baseline): learned positions, LayerNorm with biases, GELU MLP,
embeddings tied to the output head. The modern block (the presets): rotary positions (RoPE), RMSNorm, a SwiGLU
(or ReLU²) MLP, RMSNorm on queries and keys (QK-norm), no biases, zero-initialised output projections, an
untied head: the Qwen3 layout, so a trained model maps onto `transformers`' Qwen3/Llama classes.

Generation keeps a key/value cache so each new token costs one forward pass over one position; with
generate(compile=True) that pass is one torch.compile'd graph over a fixed-size cache (StaticKVCache).
"""

from __future__ import annotations

import math
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from minilm.config import ModelConfig

# Dense peak tensor throughput in FLOP/s from the vendors' data sheets (no sparsity). "tf32" is what fp32 matmuls
# reach with TF32 on (minilm.train switches it on for sm_80+); "float32" is the plain CUDA-core peak. Keys are
# matched as whole words of torch.cuda.get_device_name(), the longest first: "H100 PCIe" before "H100",
# and "L4" never matches "L40".
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "tf32": 494.5e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "tf32": 494.5e12, "float32": 67e12},  # SXM ("H100 80GB HBM3")
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "tf32": 378e12, "float32": 51e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "tf32": 417.5e12, "float32": 60e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "tf32": 183e12, "float32": 91.6e12},
    "L40": {"bfloat16": 181e12, "float16": 181e12, "tf32": 90.5e12, "float32": 90.5e12},
    "A10": {"bfloat16": 125e12, "float16": 125e12, "tf32": 62.5e12, "float32": 31.2e12},
    "A10G": {"bfloat16": 125e12, "float16": 125e12, "tf32": 62.5e12, "float32": 31.2e12},  # AWS g5: A10's sheet
    "L4": {"bfloat16": 121e12, "float16": 121e12, "tf32": 60e12, "float32": 30.3e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
    "T4": {"float16": 65e12, "float32": 8.1e12},
    "RTX 4090": {"bfloat16": 165e12, "float16": 165e12, "tf32": 82.6e12, "float32": 82.6e12},
    "RTX 3090": {"bfloat16": 71e12, "float16": 71e12, "tf32": 35.6e12, "float32": 35.6e12},
    "RTX 3080": {"bfloat16": 59.5e12, "float16": 59.5e12, "tf32": 29.8e12, "float32": 29.8e12},
    "A6000": {"bfloat16": 155e12, "float16": 155e12, "tf32": 77.4e12, "float32": 38.7e12},
}


def _words(name: str) -> list[str]:
    return name.upper().replace("-", " ").replace("_", " ").split()


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak FLOP/s for a device name such as torch.cuda.get_device_name(); None when we do not know it."""
    words = [w for w in _words(device_name) if w not in ("NVIDIA", "GEFORCE", "TESLA")]
    for key in sorted(PEAK_FLOPS, key=lambda k: len(_words(k)), reverse=True):  # "H100 PCIe" before "H100"
        k = _words(key)
        if any(words[i : i + len(k)] == k for i in range(len(words))):
            return PEAK_FLOPS[key].get(dtype)
    return None


# ----------------------------------------------------------------------------- the pieces


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean and the bias. Computed in float32, like Llama's."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) * weight in one call: decoding runs ~25 of these per token,
        # and on a CPU each separate small op costs a few microseconds of dispatch.
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, bias=config.bias)


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (max_len, head_dim) for rotary positions, in the Llama/Hugging Face layout (halves, not pairs)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + hd/2) pair of x (B, H, T, hd) by its position's angle; cos/sin broadcast to x."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of every layer for the positions seen so far: (n_layer, B, n_head, max_len, head_dim)."""

    static = False

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, batch, config.n_head, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.size(2)
        self.k[layer, :, :, self.length : self.length + t] = k
        self.v[layer, :, :, self.length : self.length + t] = v
        end = self.length + t
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class StaticKVCache:
    """A KV cache whose shapes never change, so one torch.compile'd graph serves every decode step.

    forward() sets `index`, the positions being written (a tensor, not a Python int the graph would specialise
    on), and attention reads the whole buffer with a mask hiding the slots not written yet. Each layer has its
    own tensor: writing into a view of one shared tensor made the compiled graph copy all of it per layer.
    With `compiled` (the default) each single-token step runs compiled and without autograd: it is for
    generation. `compiled=False` runs the same steps eagerly (tests on machines without a C++ compiler).
    """

    static = True

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype: torch.dtype,
                 compiled: bool = True):
        shape = (batch, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len, self.compiled = max_len, compiled
        self.length = 0
        self.index = torch.zeros(0, dtype=torch.long, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.index, k)
        self.v[layer].index_copy_(2, self.index, v)
        return self.k[layer], self.v[layer]


def static_cache_len(block_size: int, tokens: int) -> int:
    """Slots of the StaticKVCache generate(compile=True) makes for prompt + new tokens. A compiled step has one
    graph per cache length, so it is rounded up to a multiple of 64 (calls of similar lengths share a graph; the
    extra slots are masked), and capped at block_size (past it the cache is refilled, as without compile)."""
    return min(block_size, 64 * math.ceil(tokens / 64))


def _static_mask(attn_mask: torch.Tensor | None, start: int, B: int, T: int, S: int, device) -> torch.Tensor:
    """(B, 1, T, S) for a StaticKVCache: the caller's mask (keys 0..start+T-1) padded with False up to the
    buffer's S slots, or the causal one; contiguous, so every decode step hands the graph the same layout."""
    if attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)
    else:
        attn_mask = F.pad(attn_mask, (0, S - attn_mask.size(-1)), value=False)
    return attn_mask.expand(B, 1, T, S).contiguous()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        if config.qk_norm:  # normalise each head's queries and keys: bounded logits, higher stable LRs
            self.q_norm = RMSNorm(config.n_embd // config.n_head)
            self.k_norm = RMSNorm(config.n_embd // config.n_head)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, attn_mask=None, rope=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if cache is not None and cache.static and T == 1 and not self.training:
            # The compiled decode step: softmax(q k^T / sqrt(d)) v written out, which inductor fuses with its
            # neighbours (SDPA's kernel is opaque to it): 1.16-1.32x more tokens/s for mini_lm w8a8 here.
            att = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
            y = att.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1) @ v
        else:
            # Causal masking by flag when queries and keys both start at position 0; otherwise the caller's mask
            # (a single decode step attends to every cached position, so it needs none).
            is_causal = attn_mask is None and T > 1
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def mlp_hidden(config: ModelConfig) -> int:
    """Hidden width: 4C for GELU/ReLU², about 8C/3 (a multiple of 64) for SwiGLU's two matrices, as Llama."""
    if config.mlp_hidden:
        return config.mlp_hidden
    if config.mlp == "swiglu":
        return 64 * math.ceil(8 * config.n_embd / 3 / 64)
    return 4 * config.n_embd


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = mlp_hidden(config)
        fan_out = 2 * hidden if config.mlp == "swiglu" else hidden  # SwiGLU: gate and up in one matrix
        self.c_fc = nn.Linear(config.n_embd, fan_out, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, attn_mask=None, rope=None):
        x = x + self.attn(self.ln_1(x), cache, layer, attn_mask, rope)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        parts = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        )
        if config.pos == "learned":
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        if config.pos == "rope":
            # Not in the state dict: rebuilt from the config, so checkpoints hold only learned weights.
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init:  # each block starts as the identity; the residual stream grows as it learns
                    nn.init.zeros_(p)
                else:  # GPT-2: scaled so the residual stream's variance does not grow with depth
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))


    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied embeddings counted once); non_embedding drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | StaticKVCache | None = None,
                pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy loss or None).

        With targets the loss ignores positions whose target is -1. `cache`, `pos` and `attn_mask` are
        used by generate(): positions (B, T) and a boolean mask (B, 1, T, S) where True means "attend".
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} positions: {start} cached + {T} new do not fit")
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        static = cache is not None and cache.static
        if static:  # fresh copies: a compiled graph is specialised on strides, even of a size-1 dimension
            idx, pos = (t.clone(memory_format=torch.contiguous_format) for t in (idx, pos))
            cache.index = torch.arange(start, start + T, device=idx.device)
            attn_mask = _static_mask(attn_mask, start, B, T, cache.max_len, idx.device)
        elif attn_mask is None and start > 0 and T > 1:
            # A later chunk of a prompt: query i sits at position start + i and sees keys 0..start + i.
            # (is_causal=True would align the triangle top-left, as if the queries started at 0.)
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        if static and cache.compiled and T == 1:
            with torch.no_grad():  # inference only: a graph without autograd (int8 kernels have no derivative)
                logits = _compiled_body(idx.device)(self, idx, pos, cache, attn_mask)
        else:
            logits = self._body(idx, pos, cache, attn_mask)
        if cache is not None:
            cache.length += T
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _body(self, idx: torch.Tensor, pos: torch.Tensor, cache, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Embeddings -> blocks -> logits, with no Python-side state: what torch.compile traces for decoding."""
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos == "rope":
            rope = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))  # (B or 1, 1, T, hd)
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if self.config.grad_checkpoint and self.training and cache is None and torch.is_grad_enabled():
                x = torch_checkpoint(block, x, None, i, attn_mask, rope, use_reentrant=False)
            else:
                x = block(x, cache, i, attn_mask, rope)
        return self.lm_head(self.transformer.ln_f(x))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, forward and backward: 6N + 12·L·C·T (PaLM appendix B)."""
        c = self.config
        t = seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * t

    def estimate_mfu(self, tokens_per_s: float, device_name: str, dtype: str = "bfloat16",
                     seq_len: int | None = None) -> tuple[float | None, str]:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

        Returns (mfu, explanation); mfu is None for devices without a known peak (CPUs, unlisted GPUs).
        """
        peak = peak_flops(device_name, dtype)
        achieved = self.flops_per_token(seq_len) * tokens_per_s
        if peak is None:
            return None, (f"MFU unknown: no peak {dtype} FLOP/s on record for {device_name!r} "
                          f"({achieved / 1e9:.1f} GFLOP/s achieved)")
        mfu = achieved / peak
        return mfu, f"MFU {mfu:.1%} of {device_name} peak {peak / 1e12:.0f} TFLOP/s ({dtype})"

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float = 1.0, eos_id: int | None = None,
                 seed: int | None = None, attention_mask: torch.Tensor | None = None,
                 use_cache: bool = True, compile: bool = False) -> torch.Tensor:
        """Continue each row of idx (B, T) by up to max_new_tokens tokens; returns (B, T + new).

        temperature 0 is greedy. Prompts of different lengths are left-padded, with attention_mask (B, T)
        holding 1 for real tokens and 0 for padding. Rows that emit eos_id are padded with eos_id while the
        others go on; generation stops when every row has finished.

        compile=True decodes with a StaticKVCache and a torch.compile'd step: the first call compiles (tens of
        seconds on a CPU; later calls with the same batch size and length bucket reuse it), then each step runs
        as a few fused kernels instead of hundreds of small ops. Same tokens as compile=False (tested).
        """
        steps = self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id,
                                     seed, attention_mask, use_cache, compile)
        new = [t[:, None] for t in steps]
        return torch.cat([idx, *new], dim=1) if new else idx

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                        eos_id: int | None = None, seed: int | None = None,
                        attention_mask: torch.Tensor | None = None, use_cache: bool = True, compile: bool = False):
        """Like generate(), but yields each new token column (B,) as soon as it is sampled."""
        check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, self.config.vocab_size,
                            eos_id)
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be a (batch, length) tensor with length >= 1, got shape {tuple(idx.shape)}")
        if compile and not use_cache:
            raise ValueError("compile=True compiles the cached decode step: it needs use_cache=True")
        if compile:
            check_compiler(idx.device)
        block = self.config.block_size
        static_len = static_cache_len(block, idx.size(1) + max_new_tokens)
        was_training = self.training
        self.eval()
        gen = None
        if seed is not None:
            gen = torch.Generator(device=idx.device)
            gen.manual_seed(seed)
        B = idx.size(0)
        mask = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache, last_pos = None, None
        out = idx
        try:
            for _ in range(max_new_tokens):
                if use_cache and cache is not None and cache.length < cache.max_len:
                    # One new position per row, attending to every cached one (padding excluded).
                    pos = last_pos + 1
                    am = mask[:, None, None, -cache.length - 1 :] if not mask.all() else None
                    logits, _ = self(out[:, -1:], cache=cache, pos=pos[:, None], attn_mask=am)
                    last_pos = pos
                else:
                    # (Re)compute over the last window that fits. With the cache, a full window is refilled
                    # from its last half so the following steps are cheap again.
                    window = block if cache is None else block // 2
                    ctx, cmask = out[:, -window:], mask[:, -window:]
                    pos, am = _positions_and_mask(cmask)
                    dtype = self.transformer.wte.weight.dtype
                    if compile:
                        cache = StaticKVCache(self.config, B, static_len, idx.device, dtype)
                    elif use_cache:
                        cache = KVCache(self.config, B, block, idx.device, dtype)
                    logits, _ = self(ctx, cache=cache, pos=pos, attn_mask=am)
                    last_pos = pos[:, -1]
                logits = logits[:, -1, :].float()
                next_id = sample_next(logits, out, mask, temperature, top_k, top_p, repetition_penalty, gen)
                if eos_id is not None:
                    next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
                    finished |= next_id == eos_id
                out = torch.cat([out, next_id[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=idx.device)], dim=1)
                yield next_id
                if eos_id is not None and finished.all():
                    break
        finally:
            self.train(was_training)


_COMPILED_BODY = None


def _compiled_body(device: torch.device):
    """GPT._body under torch.compile, made once per process: a graph per model, batch size and cache length."""
    global _COMPILED_BODY
    if _COMPILED_BODY is None:
        check_compiler(device)
        _COMPILED_BODY = torch.compile(GPT._body, dynamic=False, fullgraph=True)
    return _COMPILED_BODY


class CompilerMissing(RuntimeError):
    """compile=True on a CPU without a C++ compiler."""


def check_compiler(device: torch.device | str) -> None:
    """torch.compile on a CPU builds C++ kernels: fail with what to do when there is no compiler."""
    found = any(shutil.which(name) for name in ("g++", "c++", "clang++"))
    if torch.device(device).type == "cpu" and not found:
        raise CompilerMissing("compiled decoding needs a C++ compiler on a CPU (torch.compile builds C++ kernels), and "
                           "none was found: install one (Debian/Ubuntu: apt install g++; macOS: xcode-select "
                           "--install) or decode without compile")


def _positions_and_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions counting only real tokens, and a causal mask that also hides left padding."""
    pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    if mask.all():
        return pos, None
    T = mask.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    am = causal[None, None] & mask[:, None, None, :]
    am = am | torch.eye(T, dtype=torch.bool, device=mask.device)  # a padding query attends to itself: no NaN rows
    return pos, am


def check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, vocab_size, eos_id) -> None:
    """Raise ValueError naming the bad generation parameter and its valid range."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if temperature is None or not math.isfinite(temperature) or temperature < 0 or 0 < temperature < 1e-3:
        raise ValueError(f"temperature={temperature!r} is out of range: use 0 for greedy decoding or a finite value "
                         ">= 0.001 (smaller ones overflow the logits)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r} must be a positive integer, or 0/None for no top-k filter")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]; 1 or None disables nucleus sampling")
    if repetition_penalty is None or not math.isfinite(repetition_penalty) or not 0.01 <= repetition_penalty <= 100:
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be in [0.01, 100] (1.0 = no penalty)")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {vocab_size})")


def sample_next(logits: torch.Tensor, seen: torch.Tensor, seen_mask: torch.Tensor, temperature: float,
                top_k: int | None, top_p: float | None, repetition_penalty: float,
                gen: torch.Generator | None) -> torch.Tensor:
    """Pick the next token per row from logits (B, vocab) after the penalty and filters."""
    if repetition_penalty != 1.0:
        # CTRL-style: make every token already in the context less likely, whatever the logit's sign.
        # Only real tokens count: left padding must not penalise whatever id fills it.
        present = torch.zeros_like(logits).scatter_add_(1, seen, seen_mask.to(logits.dtype)) > 0
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(present, penalised, logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)
