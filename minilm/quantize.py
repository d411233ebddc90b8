"""Fewer bytes per generated token: bf16 weights, or int8 weights with one fp32 scale per output channel.

    model = use_weights(model, "int8")     # in place; also "bf16", "w8a8" and "fp32" (unchanged)

Decoding one token at batch 1 reads every weight once and does 2 FLOPs per weight read, so on a CPU it runs at
memory speed: fp32 moves 4 bytes per weight, bf16 2, int8 1 (+ a scale per row). The model's forward() is not
changed: each nn.Linear (the output head included) is swapped for an Int8Linear or a BF16Linear, which round
their input to bf16 for the matmul and return fp32. Everything else stays fp32: the residual stream, norms,
attention and the KV cache, and the embedding table (a lookup reads one row per token, not the whole table).

Int8Linear uses PyTorch's fused CPU kernel aten._weight_int8pack_mm when it exists (int8 weights, bf16
activations, fp32 accumulation; several times faster than dequantizing the weight on every call) and otherwise
F.linear on the dequantized weight. int8 and w8a8 are CPU-only: on CUDA or MPS they are refused with a clear
error, since there every call would dequantize whole weights and decode slower than fp32 (use bf16 there).

"w8a8" stores the same int8 weights and also rounds each input row to int8 on the fly (one scale per row, i.e. per
token), so the matmul is int8 x int8 with exact int32 sums (torch._int_mm, oneDNN on x86). On the 2-core Xeon
here, over 47M distinct weights (a decode step's worth), that kernel read ~21 GB/s where _weight_int8pack_mm read
~8.5; a whole decode step gains less, since small ops dominate it (README). The cost is the activations'
rounding (2^-8 of each row's largest value), measured in the README beside the others.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS = ("fp32", "bf16", "int8", "w8a8")
# The int8 kernels used here are CPU kernels; elsewhere every call would dequantize whole weights (slower than fp32).
CPU_ONLY = ("int8", "w8a8")
_HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def check_cpu(weights: str, device: torch.device | str) -> None:
    """Refuse the CPU-only formats on another device, with what to use instead."""
    device = torch.device(device)
    if device.type != "cpu":
        raise ValueError(f"weights={weights!r} is CPU-only (its int8 kernels are CPU kernels; on {device.type} each "
                         "call would dequantize whole weights, slower than fp32): use weights='bf16' or 'fp32' on "
                         f"{device.type}, or run on the CPU (--device=cpu)")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: w ~= q * scale[:, None], q in [-127, 127] (int8), scale (out,) fp32."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # an all-zero row keeps a tiny scale, not 0/0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias, with q int8 (out, in) and scale fp32 (out,); output in x's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))  # the fused kernel wants x's dtype
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_cpu("int8", x.device)  # a model quantized on the CPU and moved afterwards
        if _HAS_INT8_KERNEL:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale_bf16)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class BF16Linear(nn.Module):
    """y = x @ w^T + bias with w (and bias) stored in bf16; x is rounded to bf16 for the matmul, y is x's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).clone())
        bias = linear.bias.detach().to(torch.bfloat16).clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"


class W8A8Linear(Int8Linear):
    """y = (round(x / sx) @ q^T) * sx * scale + bias: Int8Linear's weights, and int8 inputs (one scale per row)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_cpu("w8a8", x.device)
        flat = x.reshape(-1, self.in_features).float()
        xq, sx = quantize_per_channel(flat)  # rows of x are the "channels" here
        acc = torch._int_mm(xq, self.weight.t()).float()  # exact int32 sums
        y = (acc * sx[:, None] * self.scale).view(*x.shape[:-1], self.out_features)
        y = y if self.bias is None else y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and inputs"


def swap_linears(model: nn.Module, cls) -> nn.Module:
    """Replace every nn.Linear (the tied lm_head included; embeddings stay) by cls(linear), in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, cls(child))
        else:
            swap_linears(child, cls)
    return model


def use_weights(model: nn.Module, weights: str = "fp32") -> nn.Module:
    """Convert a model for generation, in place: "fp32" (as is), "bf16", "int8" (weight-only) or "w8a8"."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHTS)}")
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    if weights in CPU_ONLY:
        check_cpu(weights, device)
    model.eval()
    if weights == "fp32":
        return model
    return swap_linears(model, {"bf16": BF16Linear, "int8": Int8Linear, "w8a8": W8A8Linear}[weights])


def weight_bytes(model: nn.Module) -> int:
    """Bytes one batch-1 decode step reads for weights: every Linear's weight (+ scales, biases), norms, one
    embedding row per table. The memory-bandwidth ceiling is bandwidth / (this + the KV cache read)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            total += mod.weight[0].numel() * mod.weight.element_size()
            continue
        if isinstance(mod, (Int8Linear, BF16Linear)):  # W8A8Linear is an Int8Linear
            tensors = [t for t in (mod.weight, getattr(mod, "scale", None), mod.bias) if t is not None]
        else:
            tensors = list(mod.parameters(recurse=False))
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total
