"""Where a run executes: the device, the autocast dtype it can do, and the torchrun process group.

    device = pick_device("auto")                     # cuda, else mps, else cpu
    dtype, why = resolve_dtype("auto", device)       # ("bfloat16", "this CPU has native bf16 (avx512_bf16)")
    rank, local_rank, world = setup_distributed()    # (0, 0, 1) when not launched by torchrun
    plan = plan_device("auto", "auto", local_rank)   # all of the above, plus TF32, fused AdamW, the MFU peak
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from minilm.config import ConfigError

# x86 flags (as /proc/cpuinfo spells them) that mean bf16 matmuls run in hardware, not emulated in fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 and TF32 tensor cores arrived with Ampere (sm_80: A100, A10, L4, RTX 30xx and later). Older GPUs (T4 sm_75,
# V100 sm_70) run bf16 without tensor cores, yet torch.cuda.is_bf16_supported() says True there (it counts that
# emulation), so the choice is made on the compute capability.
AMPERE = (8, 0)
# The collective timeout under torchrun. Rank 0 alone may build a data dir (minutes) or count the final baselines
# while the other ranks wait in a barrier; NCCL's default of 10 minutes would kill the job there.
DIST_TIMEOUT = timedelta(minutes=60)


def pick_device(name: str = "auto") -> str:
    """The device string to use: `name` itself, or for "auto" the best one present (cuda, mps, cpu)."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def indexed_device(device: str, local_rank: int = 0) -> str:
    """"cuda" -> "cuda:<local_rank>": torch.cuda.set_device, DDP and per-device RNG states want an index."""
    return f"cuda:{local_rank}" if device == "cuda" else device


def gpu_has_bf16(device: str | int | None = None) -> bool:
    """True when the GPU does bf16 on tensor cores (compute capability 8.0+), not by emulation."""
    return tuple(torch.cuda.get_device_capability(device)) >= AMPERE


@dataclass
class DevicePlan:
    """What a run uses on its device; plan_device makes it, use_device applies the process-wide parts."""

    device: str  # "cuda:0", "mps", "cpu"
    dtype: str  # the autocast dtype ("float32": no autocast)
    dtype_why: str
    tf32: bool  # fp32 matmuls on TF32 tensor cores (CUDA sm_80+)
    fused_adamw: bool
    gpu_name: str  # torch.cuda.get_device_name, or "CPU" / "MPS": what the MFU peak is looked up by
    capability: tuple[int, int] | None = None

    @property
    def loss_scaling(self) -> bool:
        return self.dtype == "float16"

    @property
    def mfu_dtype(self) -> str:
        """The peak to divide by: an fp32 run with TF32 on runs its matmuls at the TF32 peak."""
        return "tf32" if self.dtype == "float32" and self.tf32 else self.dtype


def plan_device(device: str = "auto", dtype: str = "auto", local_rank: int = 0, world: int = 1,
                flags: set[str] | None = None) -> DevicePlan:
    """The device string (indexed for CUDA), dtype, TF32, fused AdamW and GPU name for this process."""
    if world > 1 and torch.cuda.is_available() and device in ("auto", "cuda"):
        device = "cuda"  # under torchrun every process takes GPU local_rank
    device = indexed_device(pick_device(device), local_rank)
    kind = device.split(":")[0]
    if kind != "cuda":
        chosen, why = resolve_dtype(dtype, device, flags=flags)
        return DevicePlan(device, chosen, why, tf32=False, fused_adamw=False, gpu_name=kind.upper())
    capability = tuple(torch.cuda.get_device_capability(device))
    chosen, why = resolve_dtype(dtype, device, bf16_supported=capability >= AMPERE)
    return DevicePlan(device, chosen, why, tf32=capability >= AMPERE, fused_adamw=True,
                      gpu_name=torch.cuda.get_device_name(device), capability=capability)


def use_device(plan: DevicePlan) -> None:
    """Make plan.device this process's current GPU and switch TF32 on where the GPU has it (CUDA only)."""
    if not plan.device.startswith("cuda"):
        return
    torch.cuda.set_device(plan.device)
    # TF32 matmuls: fp32 range, tensor-core speed (plan.mfu_dtype counts the TF32 peak for them)
    torch.backends.cuda.matmul.allow_tf32 = plan.tf32
    torch.backends.cudnn.allow_tf32 = plan.tf32


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the OS; True if it took effect.

    PyTorch's CPU allocator does not cache: each step frees and reallocates tensors of tens of MB (the logits),
    which glibc serves with fresh mmap'd pages the kernel must fault in and zero. On the tiny preset that cost
    about 20% of the step time, in spikes every few steps. Same effect as MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<huge>; the price is that the process keeps its peak memory until it exits.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(libc.mallopt(m_mmap_max, 0))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 says flags, ARM says Features
            return set(line.split(":", 1)[1].split())
    return set()


def native_cpu_bf16(flags: set[str]) -> str | None:
    """The flag that makes bf16 native on this CPU, or None (then autocast emulates bf16 and is slower than fp32)."""
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


def resolve_dtype(requested: str, device: str, bf16_supported: bool | None = None,
                  flags: set[str] | None = None) -> tuple[str, str]:
    """(autocast dtype, why) for the device; a ConfigError when the device cannot do the requested one.

    auto: CUDA picks bfloat16 where the GPU has it, else float16 (with loss scaling); a CPU picks bfloat16 only
    when its flags show native bf16 matmuls, else float32; MPS always float32.
    """
    kind = device.split(":")[0]
    if kind == "cuda":
        bf16 = gpu_has_bf16(device) if bf16_supported is None else bf16_supported
        if requested == "auto":
            return ("bfloat16", "this GPU has bf16 tensor cores (compute capability 8.0+)") if bf16 else \
                ("float16", "this GPU has no bf16 tensor cores (compute capability < 8.0): float16 with loss "
                 "scaling")
        if requested == "bfloat16" and not bf16:
            gpu = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "this GPU"
            raise ConfigError(f"{gpu} has no bfloat16 tensor cores (they need compute capability 8.0+, e.g. A100, "
                              "L4, RTX 30xx; torch emulates bf16 on older GPUs, slowly); use --dtype=float16 "
                              "(with loss scaling) or --dtype=float32")
        return requested, "as requested"
    if requested != "auto":
        # float16 on CPU works (autocast + GradScaler) but is slow on most CPUs; it is allowed so the loss-scaling
        # path can be run and tested without a GPU.
        return requested, "as requested"
    if kind == "cpu":
        flag = native_cpu_bf16(cpu_flags() if flags is None else flags)
        if flag:
            return "bfloat16", f"this CPU has native bf16 matmuls ({flag})"
        return "float32", (f"this CPU has no native bf16 ({' / '.join(NATIVE_BF16_FLAGS)} not in its flags): "
                           "emulated bf16 is slower than fp32")
    return "float32", f"{kind}: float32 (bf16 autocast speed varies by chip; ask for it with --dtype=bfloat16)"


def setup_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size); joins the process group when launched by torchrun, else (0, 0, 1).

    Backend: nccl when CUDA is available, gloo otherwise. With CUDA, this process uses GPU number local_rank
    (set before the group starts, as nccl wants). Collectives wait up to DIST_TIMEOUT (rank 0 may build a
    data dir or count baselines meanwhile).
    """
    if "RANK" not in os.environ:
        return 0, 0, 1
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=DIST_TIMEOUT)
    return dist.get_rank(), local_rank, dist.get_world_size()


def bf16_speedup(model: torch.nn.Module, vocab_size: int, block_size: int, batch_size: int = 16,
                 steps: int = 3) -> tuple[float, float]:
    """(fp32, bf16-autocast) tokens/s of the model's forward + backward on the CPU, a few steps after a warm-up.

    A native bf16 flag does not make bf16 faster for every model: for small widths the casts cost more than the
    matmuls save (docs/training.md has the tiny preset's measurement), so the run measures. Inputs come
    from a private generator and the model is in eval mode, so the run's random streams do not move.
    """
    import contextlib
    import time

    gen = torch.Generator().manual_seed(0)
    batch_size = max(1, min(batch_size, 4096 // block_size))  # the run's own shape, capped at 4k tokens a step
    x = torch.randint(0, vocab_size, (batch_size, block_size), generator=gen)
    was_training = model.training
    model.eval()
    contexts = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    best = {name: float("inf") for name in contexts}
    try:
        for i in range(steps + 1):  # interleaved, so a change in machine load hits both alike
            for name, ctx in contexts.items():
                t0 = time.perf_counter()
                with ctx():
                    _, loss = model(x, x)
                loss.backward()
                if i:  # the first round warms up the allocator and kernels
                    best[name] = min(best[name], time.perf_counter() - t0)
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
    return x.numel() / best["fp32"], x.numel() / best["bf16"]
