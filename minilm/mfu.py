"""Model FLOPs utilisation: achieved FLOP/s over the device's peak, from the vendors' data sheets."""

from __future__ import annotations

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


def model_flops_utilisation(achieved: float, device_name: str, dtype: str) -> tuple[float | None, str]:
    """(achieved FLOP/s / peak, explanation); None for devices without a known peak (CPUs, unlisted GPUs)."""
    peak = peak_flops(device_name, dtype)
    if peak is None:
        return None, (f"MFU unknown: no peak {dtype} FLOP/s on record for {device_name!r} "
                      f"({achieved / 1e9:.1f} GFLOP/s achieved)")
    mfu = achieved / peak
    return mfu, f"MFU {mfu:.1%} of {device_name} peak {peak / 1e12:.0f} TFLOP/s ({dtype})"
