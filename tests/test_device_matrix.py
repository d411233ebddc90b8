"""The GPU and MPS paths, tested without a GPU: a simulated device layer and a CPU-backed stand-in for the tensors.

`fake_device("T4")` makes torch.cuda say what a T4 says (is_available, device_count, get_device_capability,
get_device_name, is_bf16_supported with and without emulation, per-device RNG states) and makes set_device insist
on an index, as the real one does. Tensors asked for on "cuda:N" or "mps" are made on the CPU instead (a
TorchFunctionMode), so the real start-up code runs to its first steps. What this cannot show: kernel speed,
memory, NCCL, real autocast numerics on the GPU (docs/gpu.md).
"""

from __future__ import annotations

import contextlib
import logging
import types
from datetime import timedelta

import pytest
import torch
from conftest import tiny_run_config
from torch.overrides import TorchFunctionMode

from minilm import checkpoint as ckpt_mod
from minilm.device import resolve_dtype, setup_distributed
from minilm.mfu import peak_flops
from minilm.model import GPT
from minilm.optim import build_optimizers
from minilm.train import train

# name as torch.cuda.get_device_name() reports it, compute capability
GPUS = {
    "T4": ("Tesla T4", (7, 5)),
    "V100": ("Tesla V100-SXM2-16GB", (7, 0)),
    "A10": ("NVIDIA A10", (8, 6)),
    "L4": ("NVIDIA L4", (8, 9)),
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0)),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0)),
    "H100 PCIe": ("NVIDIA H100 PCIe", (9, 0)),
    "H200": ("NVIDIA H200", (9, 0)),
}
# expected: autocast dtype, TF32, MFU peak (FLOP/s) of that dtype, MFU peak of an fp32 run
EXPECTED = {
    "T4": ("float16", False, 65e12, 8.1e12),
    "V100": ("float16", False, 125e12, 15.7e12),
    "A10": ("bfloat16", True, 125e12, 62.5e12),
    "L4": ("bfloat16", True, 121e12, 60e12),
    "A100": ("bfloat16", True, 312e12, 156e12),
    "H100": ("bfloat16", True, 989e12, 494.5e12),
    "H100 PCIe": ("bfloat16", True, 756e12, 378e12),
    "H200": ("bfloat16", True, 989e12, 494.5e12),
}


class FakeCuda:
    """What torch.cuda reports on a machine with `count` GPUs of one kind."""

    def __init__(self, name: str, capability: tuple[int, int], count: int = 1):
        self.name, self.capability, self.count, self.current = name, capability, count, 0
        self.rng = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}
        self.set_device_calls: list = []

    def index(self, device=None) -> int:
        if device is None or device == "cuda":
            return self.current
        i = device if isinstance(device, int) else torch.device(device).index
        i = self.current if i is None else i
        if not 0 <= i < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {i} (this machine has {self.count})")
        return i

    def set_device(self, device) -> None:
        self.set_device_calls.append(device)
        self.current = torch.cuda._utils._get_device_index(device)  # the real check: raises for a bare "cuda"
        self.index(self.current)

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return self.capability >= (8, 0) or including_emulation  # torch counts sm_70/75 emulation as support

    def get_rng_state(self, device="cuda"):
        return self.rng[self.index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.rng[self.index(device)] = state.clone()

    def get_rng_state_all(self):
        return [self.get_rng_state(i) for i in range(self.count)]

    def set_rng_state_all(self, states):
        for i, s in enumerate(states):
            self.set_rng_state(s, i)

    def manual_seed_all(self, seed):
        for i in range(self.count):
            self.rng[i] = torch.full((16,), seed % 256, dtype=torch.uint8)


def _on_cpu(d):
    if isinstance(d, torch.device) and d.type in ("cuda", "mps"):
        return torch.device("cpu")
    if isinstance(d, str) and (d in ("cuda", "mps") or d.startswith("cuda:")):
        return "cpu"
    return d


class TensorsOnCpu(TorchFunctionMode):
    """A CPU-backed stand-in: tensors requested on cuda/mps are made on the CPU; pinning is a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.device:  # torch.device("cuda:0") itself stays a CUDA device; tensors move
            return func(*args, **kwargs)
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return func(*(_on_cpu(a) for a in args), **kwargs)


@pytest.fixture
def fake_device(monkeypatch):
    """fake_device("T4" | ... | "mps" | "cpu", count=1) -> the FakeCuda (None for mps/cpu); undone after the test."""
    stack = contextlib.ExitStack()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def install(kind: str, count: int = 1):
        mps = kind == "mps"
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        if kind in ("mps", "cpu"):
            monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
            if mps:
                stack.enter_context(TensorsOnCpu())
            return None
        fake = FakeCuda(*GPUS[kind], count=count)
        for name in ("set_device", "is_bf16_supported", "get_rng_state", "set_rng_state", "get_rng_state_all",
                     "set_rng_state_all", "manual_seed_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (fake.index(d), fake.capability)[1])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: (fake.index(d), fake.name)[1])
        monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
        stack.enter_context(TensorsOnCpu())
        return fake

    yield install
    stack.close()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _small(tiny_data_dir, out, **kw):
    return tiny_run_config(tiny_data_dir, out, **{"dtype": "auto", "max_iters": 2, "lr_decay_iters": 2,
                                                  "eval_interval": 2, "eval_iters": 1, "sample_tokens": 0,
                                                  "final_eval": False, **kw})


# ----------------------------------------------------------------------------- the simulation itself


def test_the_fake_behaves_like_torch_on_a_t4(fake_device):
    fake_device("T4")
    assert torch.cuda.is_bf16_supported()  # the trap: emulation counts
    assert not torch.cuda.is_bf16_supported(including_emulation=False)
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_device("cuda")
    assert torch.zeros(2, device="cuda:0").device.type == "cpu"  # the CPU-backed stand-in


# ----------------------------------------------------------------------------- the device matrix


@pytest.mark.parametrize("gpu", list(GPUS))
def test_gpu_matrix_device_dtype_scaler_tf32_mfu_fused(fake_device, gpu):
    from minilm.device import plan_device

    fake_device(gpu)
    dtype, tf32, peak, peak_fp32 = EXPECTED[gpu]
    plan = plan_device("auto", "auto")
    assert plan.device == "cuda:0"  # an index: set_device, DDP and the RNG states need one
    assert (plan.dtype, plan.tf32, plan.loss_scaling) == (dtype, tf32, dtype == "float16")
    assert peak_flops(plan.gpu_name, plan.mfu_dtype) == peak
    fp32 = plan_device("cuda", "float32")
    assert fp32.mfu_dtype == ("tf32" if tf32 else "float32")
    assert peak_flops(fp32.gpu_name, fp32.mfu_dtype) == peak_fp32
    model = GPT(tiny_run_config("x", "y").model)
    t = tiny_run_config("x", "y").train
    assert build_optimizers(model, t, "cuda")[0].defaults["fused"] is True


@pytest.mark.parametrize("gpu", ["T4", "V100"])
def test_old_gpus_refuse_bf16_with_the_reason(fake_device, gpu):
    fake_device(gpu)
    from minilm.config import ConfigError

    with pytest.raises(ConfigError, match="no bfloat16 tensor cores.*--dtype=float16"):
        resolve_dtype("bfloat16", "cuda:0")


def test_mps_and_cpu_plans(fake_device):
    from minilm.device import plan_device

    fake_device("mps")
    plan = plan_device("auto", "auto")
    assert (plan.device, plan.dtype, plan.tf32, plan.fused_adamw, plan.loss_scaling) == \
        ("mps", "float32", False, False, False)
    assert peak_flops(plan.gpu_name, plan.mfu_dtype) is None
    fake_device("cpu")
    assert plan_device("auto", "auto", flags=set()).dtype == "float32"
    assert plan_device("auto", "auto", flags={"avx512_bf16"}).dtype == "bfloat16"  # before train's speed probe
    assert plan_device("auto", "auto").device == "cpu"


def test_mfu_peak_names_match_whole_words():
    assert peak_flops("NVIDIA L40", "bfloat16") == 181e12  # not the L4's
    assert peak_flops("NVIDIA L4", "bfloat16") == 121e12
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12  # not the SXM's
    assert peak_flops("NVIDIA H100 NVL", "tf32") == 417.5e12
    assert peak_flops("NVIDIA H200", "float32") == 67e12
    assert peak_flops("NVIDIA A100-PCIE-40GB", "tf32") == 156e12


# ----------------------------------------------------------------------------- start-up reaches the first steps


@pytest.mark.parametrize("gpu", ["T4", "V100", "A10", "L4", "A100", "H100", "H200"])
def test_single_gpu_start_up_reaches_the_first_steps(fake_device, tiny_data_dir, tmp_path, gpu):
    fake = fake_device(gpu)
    result = train(_small(tiny_data_dir, tmp_path / gpu))  # --device=auto: pick_device says "cuda"
    assert result["step"] == 2
    assert fake.set_device_calls == ["cuda:0"]
    log = (tmp_path / gpu / "train.log").read_text()
    assert f"device: cuda:0, dtype: {EXPECTED[gpu][0]}" in log
    assert torch.backends.cuda.matmul.allow_tf32 is EXPECTED[gpu][1]


def test_t4_run_uses_the_loss_scaler_and_fused_adamw(fake_device, tiny_data_dir, tmp_path):
    fake_device("T4")
    train(_small(tiny_data_dir, tmp_path / "t4"))
    ckpt = ckpt_mod.load_checkpoint(tmp_path / "t4")
    assert ckpt["scaler"] and ckpt["scaler"]["scale"] > 1  # float16: loss scaling on
    assert ckpt["optimizer"][0]["param_groups"][0]["fused"] is True


def test_muon_on_an_old_gpu_measures_its_newton_schulz_cost(fake_device, tiny_data_dir, tmp_path):
    fake_device("T4")
    train(_small(tiny_data_dir, tmp_path / "muon", optimizer="muon", max_iters=6, lr_decay_iters=6,
                 eval_interval=6))
    log = (tmp_path / "muon" / "train.log").read_text()
    assert "Muon's update (Newton-Schulz in bfloat16) took" in log and "sm_75" in log


def test_mps_start_up_with_muon_and_final_eval(fake_device, tiny_data_dir, tmp_path):
    fake_device("mps")
    result = train(_small(tiny_data_dir, tmp_path / "mps", optimizer="muon", final_eval=True))
    assert result["step"] == 2 and result["final_val_loss"] > 0
    log = (tmp_path / "mps" / "train.log").read_text()
    assert "device: mps, dtype: float32" in log


# ----------------------------------------------------------------------------- what a resume restores


def test_rng_saves_the_local_gpu_only_and_resumes_on_fewer_gpus(fake_device):
    fake = fake_device("A100", count=4)
    torch.cuda.set_device(2)  # rank 2 of a 4-GPU run
    state = ckpt_mod.rng_state()
    assert torch.equal(state["cuda"], fake.rng[2])  # its own GPU's stream, not all four
    one = fake_device("A100", count=1)  # resumed as rank 0 on a 1-GPU machine
    ckpt_mod.set_rng_state(state)
    assert torch.equal(one.rng[0], fake.rng[2])


def test_old_checkpoints_with_every_gpus_state_still_resume(fake_device):
    fake_device("A100", count=4)
    old = ckpt_mod.rng_state()
    old["cuda"] = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(4)]  # get_rng_state_all()
    one = fake_device("A100", count=1)
    ckpt_mod.set_rng_state(old)  # set_rng_state_all here raised on the missing GPUs 1-3
    assert torch.equal(one.rng[0], old["cuda"][0])


def test_resume_on_a_gpu_restores_weights_step_scaler_and_rng(fake_device, tiny_data_dir, tmp_path):
    fake = fake_device("T4")
    out = tmp_path / "run"
    train(_small(tiny_data_dir, out))
    saved = ckpt_mod.load_checkpoint(out)
    fake.rng[0] = torch.zeros(16, dtype=torch.uint8)
    result = train(_small(tiny_data_dir, out, max_iters=4, lr_decay_iters=4, resume=True))
    assert result["step"] == 4
    assert saved["rng"]["cuda"].shape == (16,) and saved["scaler"]["scale"] > 1
    assert "resuming from" in (out / "train.log").read_text()


# ----------------------------------------------------------------------------- distributed


def test_process_group_waits_long_enough_for_rank_0(monkeypatch):
    import torch.distributed as dist

    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert setup_distributed() == (0, 0, 2)
    assert seen["timeout"] >= timedelta(minutes=30)  # building a data dir on rank 0 takes minutes


def test_ddp_is_wrapped_first_then_compiled(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from minilm.run_setup import wrap_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        wrapped = wrap_model(model, compile=True, world=2, device="cpu")
        assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule)
        assert isinstance(wrapped._orig_mod, DistributedDataParallel) and wrapped._orig_mod.module is model
        assert hasattr(wrapped, "no_sync")  # train_step's gradient accumulation still finds it
        assert wrap_model(model, compile=False, world=1, device="cpu") is model
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- MPS numerics and formats


class MPSLike(torch.Tensor):
    """A CPU tensor that says it lives on MPS and, like MPS, refuses float64; .cpu() gives a plain tensor."""

    @property
    def device(self):
        return torch.device("mps")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wants = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
        if func is torch.Tensor.double or wants == torch.float64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
                            "float64. Please use float32 instead.")
        out = super().__torch_function__(func, types, args, kwargs)
        if func is torch.Tensor.cpu:
            return out.as_subclass(torch.Tensor)
        return out


def test_token_nll_of_mps_logits_is_float64_on_the_cpu():
    from metrics.perplexity import token_nll

    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    expected = token_nll(logits, targets)
    got = token_nll(logits.as_subclass(MPSLike), targets.as_subclass(MPSLike))
    assert type(got) is torch.Tensor and got.dtype == torch.float64
    assert torch.equal(got, expected)


def test_muon_on_mps_runs_newton_schulz_in_float32(monkeypatch):
    model = GPT(tiny_run_config("x", "y").model)
    t = tiny_run_config("x", "y", optimizer="muon").train
    muon = build_optimizers(model, t, "mps")[0]
    assert muon.ns_dtype == torch.float32
    _, loss = model(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8)))
    loss.backward()

    def no_bf16(self, *a, **k):
        raise TypeError("MPS BFloat16 is only supported on MacOS 14 or newer")

    monkeypatch.setattr(torch.Tensor, "bfloat16", no_bf16)  # macOS 13
    muon.step()


def test_muon_subclass_in_bf16_is_torchs_step_and_fp32_is_close():
    from torch.optim._muon import _zeropower_via_newtonschulz

    from minilm.optim import Muon, newton_schulz

    g = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    coeffs = (3.4445, -4.775, 2.0315)
    assert torch.equal(newton_schulz(g, coeffs, 5, 1e-7, torch.bfloat16), _zeropower_via_newtonschulz(g, coeffs, 5,
                                                                                                      1e-7))
    ref = _zeropower_via_newtonschulz(g, coeffs, 5, 1e-7).float()
    assert torch.allclose(newton_schulz(g, coeffs, 5, 1e-7, torch.float32), ref, atol=0.05)
    w1, w2 = torch.nn.Parameter(g.clone()), torch.nn.Parameter(g.clone())
    a, b = Muon([w1], lr=0.02, ns_dtype=torch.float32), Muon([w2], lr=0.02, ns_dtype=torch.float32, nesterov=False)
    for w, opt in ((w1, a), (w2, b)):
        w.grad = torch.ones_like(w)
        opt.step()
    buf = b.state[w2]["momentum_buffer"]
    assert torch.allclose(buf, torch.full_like(buf, 0.05))  # the buffer is not scaled by Newton-Schulz in place


def test_int8_formats_are_refused_off_the_cpu():
    from minilm.quantize import Int8Linear, use_weights

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="CPU-only.*bf16"):
        use_weights(model, "int8")
    with pytest.raises(ValueError, match="CPU-only"):
        use_weights(model, "w8a8")
    layer = Int8Linear(torch.nn.Linear(8, 8))  # quantized on the CPU, then the input arrives elsewhere
    with pytest.raises(ValueError, match="CPU-only"):
        layer(torch.zeros(1, 8, device="meta"))


def test_bench_picks_float16_on_a_t4(fake_device, monkeypatch):
    from minilm import bench

    fake_device("T4")
    seen = []
    monkeypatch.setattr(bench, "time_training",
                        lambda model, cfg, batch, steps, dev, dtype, comp: seen.append(dtype) or
                        {"tokens_per_s": 1.0, "peak_mb": None})
    monkeypatch.setattr(bench, "GPT", lambda cfg: types.SimpleNamespace(estimate_mfu=lambda *a: (None, "")))
    bench.train_section(types.SimpleNamespace(quick=True), "cuda:0", False, "Tesla T4")
    assert set(seen) == {"float32", "float16"}


@pytest.fixture(autouse=True)
def _quiet_logs():
    yield
    logging.getLogger("minilm.train").handlers.clear()


def test_bench_skips_the_cpu_only_formats_on_a_gpu(fake_device, monkeypatch, capsys):
    from minilm import bench

    fake_device("A100")
    seen = []
    monkeypatch.setattr(bench, "generate_section", lambda a, dev, weights, threads: seen.append(weights))
    bench.main(["--only=generate"])  # --device defaults to cuda when CUDA is available
    assert seen == [["fp32", "bf16"]] and "skipping the CPU-only weight formats int8, w8a8" in capsys.readouterr().out


def test_the_readme_gpu_command_line_starts_on_an_l4(fake_device, tiny_data_dir, tmp_path):
    from minilm.train import main

    fake_device("L4")
    out = tmp_path / "cli"
    assert main(["--preset=tiny", f"--data_dir={tiny_data_dir}", f"--out_dir={out}", "--n_layer=2", "--n_embd=64",
                 "--block_size=64", "--batch_size=4", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                 "--sample_tokens=0", "--final_eval=false", "--progress=false", "--tensorboard=false"]) == 0
    log = (out / "train.log").read_text()
    assert "device: cuda:0, dtype: bfloat16" in log and "optimizer: Muon, AdamW" in log


def test_the_courses_day_10_command_on_a_colab_t4_starts_and_resumes(fake_device, tiny_data_dir, tmp_path):
    """week18.md day 10: `python -m minilm.train --preset mini_lm --config configs/my_run.yaml`, then `--resume`."""
    from minilm.train import main

    fake_device("T4")
    config = tmp_path / "my_run.yaml"  # the kind of file day 7 asks for; the shapes shrunk so the CPU can run it
    config.write_text("preset: mini_lm\nbatch_size: 4\ngrad_accum: 2\nn_layer: 2\nn_embd: 64\nn_head: 2\n"
                      "block_size: 64\neval_interval: 2\neval_iters: 1\nsample_tokens: 0\n")
    out = tmp_path / "drive" / "run"  # Colab: the out_dir on Google Drive
    common = ["--preset", "mini_lm", "--config", str(config), f"--data_dir={tiny_data_dir}", f"--out_dir={out}",
              "--final_eval=false", "--progress=false", "--tensorboard=false"]
    assert main([*common, "--max_iters=2"]) == 0
    log = (out / "train.log").read_text()
    assert "device: cuda:0, dtype: float16" in log
    assert main([*common, "--max_iters=4", "--resume"]) == 0
    log = (out / "train.log").read_text()
    assert "resuming from" in log and "changed on resume: max_iters: 2 -> 4" in log
