"""A decoder-only transformer in two flavours chosen by ModelConfig.

The GPT-2 block (the defaults, the teaching baseline): learned positions, LayerNorm with biases, GELU MLP,
embeddings tied to the output head. The modern block (the presets): rotary positions (RoPE), RMSNorm, a SwiGLU
(or ReLU²) MLP, RMSNorm on queries and keys (QK-norm), no biases, zero-initialised output projections, an
untied head: the Qwen3 layout, so a trained model maps onto `transformers`' Qwen3/Llama classes.

This file is the network and its forward pass only. Generation (the key/value cache, sampling, batched and
compiled decoding) lives in minilm.inference; forward() takes its `cache`, positions and mask when given, and
GPT.generate is minilm.inference.generate.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from minilm import inference
from minilm.config import ModelConfig
from minilm.mfu import model_flops_utilisation

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

    def forward(self, x, cache=None, layer: int = 0, attn_mask=None, rope=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # store this step's keys and values, get back every one to attend to
            k, v = cache.update(layer, k, v)
        if cache is not None and T == 1:
            # One query per row against the cache: softmax(q k^T / sqrt(d)) v written out, which a compiled step
            # fuses with its neighbours (SDPA's kernel is opaque to the compiler).
            att = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
            if attn_mask is not None:
                att = att.masked_fill(~attn_mask, float("-inf"))
            y = att.softmax(dim=-1) @ v
        else:
            # Causal masking by flag when queries and keys both start at position 0, else the caller's mask.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
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

    def forward(self, x, cache=None, layer: int = 0, attn_mask=None, rope=None):
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None,
                pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy loss or None).

        With targets the loss ignores positions whose target is -1. `cache` (minilm.inference.cache), `pos`
        (B, T) positions and `attn_mask` (B, 1, T, S), True meaning "attend", come from minilm.inference.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        if pos is None:
            pos = torch.arange(T, device=idx.device).unsqueeze(0)
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
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

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
        return model_flops_utilisation(self.flops_per_token(seq_len) * tokens_per_s, device_name, dtype)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float = 1.0, eos_id: int | None = None,
                 seed: int | None = None, attention_mask: torch.Tensor | None = None,
                 use_cache: bool = True, compile: bool = False) -> torch.Tensor:
        """idx (B, T) continued by up to max_new_tokens tokens, (B, T + new): minilm.inference.generate."""
        return inference.generate(self, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id,
                                  seed, attention_mask, use_cache, compile)
