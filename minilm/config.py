"""Run configuration: two dataclasses, three presets, YAML files and `--key=value` overrides.

    cfg = get_preset("tiny")                      # RunConfig(model=ModelConfig, train=TrainConfig)
    cfg = parse_args(["--preset=tiny", "--lr=1e-3", "--n_layer=2"])
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and what to change."""


@dataclass
class ModelConfig:
    vocab_size: int = 8192  # replaced by the data dir's vocab_size when training
    block_size: int = 128  # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    # The defaults are the GPT-2 block; the presets set the modern recipe (see README, "The recipe").
    pos: str = "learned"  # learned | rope: learned position table, or rotary positions on queries and keys
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | relu2 | swiglu
    mlp_hidden: int = 0  # MLP hidden width; 0 = 4 * n_embd (gelu, relu2) or ~8/3 * n_embd (swiglu)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys
    tie_embeddings: bool = True  # share the token embedding with the output head
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    zero_init: bool = False  # output projections start at zero (each block starts as the identity)
    rope_theta: float = 10000.0
    grad_checkpoint: bool = False  # recompute each block's activations in backward (less memory, one more forward)

    def problems(self) -> list[str]:
        """What is wrong with these values, each with what to change (empty when all is well)."""
        out = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                out.append(f"{name}={getattr(self, name)} must be a positive integer")
        if self.n_head > 0 and self.n_embd % self.n_head:
            out.append(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick n_embd as a multiple of n_head "
                f"(e.g. n_embd={max(1, self.n_embd // max(self.n_head, 1)) * self.n_head})"
            )
        elif self.pos == "rope" and self.n_head > 0 and (self.n_embd // self.n_head) % 2:
            out.append(
                f"pos=rope needs an even head size, but n_embd/n_head = {self.n_embd}/{self.n_head} = "
                f"{self.n_embd // self.n_head}; change n_head or n_embd so the head size is even, or use pos=learned"
            )
        choices = {"pos": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2", "swiglu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                out.append(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.mlp_hidden < 0:
            out.append(f"mlp_hidden={self.mlp_hidden} must be >= 0 (0 picks the usual width)")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout={self.dropout} must be in [0, 1)")
        if not self.rope_theta > 0:
            out.append(f"rope_theta={self.rope_theta} must be > 0 (usual: 10000)")
        return out

    def validate(self) -> None:
        if problems := self.problems():
            raise ConfigError("invalid model config:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a checkpoint's or YAML's dict; fields it lacks take the defaults (the GPT-2 block)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model config has fields this version of minilm does not know: {unknown}. "
                              "It was written by a newer minilm: update the code (git pull) to load it.")
        return cls(**d)


@dataclass
class TrainConfig:
    preset: str = "tiny"
    data_dir: str = "data/builtin-8k"
    out_dir: str = "out/tiny"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    seed: int = 1337
    # optimisation
    batch_size: int = 16  # micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step per process
    max_iters: int = 500
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 40
    lr_decay_iters: int = 0  # cosine decay ends here; 0 = at max_iters (on --resume: the checkpoint's schedule)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices, AdamW at `lr` for embeddings/head/gains)
    muon_lr: float = 0.02  # Muon's peak LR (same warmup/cosine shape as lr)
    muon_momentum: float = 0.95
    # evaluation, logging, checkpoints
    eval_interval: int = 125
    eval_iters: int = 20
    log_interval: int = 10
    sample_tokens: int = 64  # tokens sampled at each eval (0 disables)
    sample_prompt: str = "def "
    resume: bool = False
    early_stop_patience: int = 0  # evals without val improvement before stopping (0 = never)
    ema_decay: float = 0.0  # EMA of the weights used for eval, e.g. 0.999 (0 = off)
    profile: bool = False  # write a torch.profiler trace of a few steps to out_dir/profile
    max_bad_steps: int = 5  # consecutive non-finite losses before aborting
    final_eval: bool = True  # at the end: val loss over the whole val split beside unigram/bigram baselines
    tensorboard: bool = True
    progress: bool = True  # tqdm bar


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The field names the command line or --config file set; None means every field is meant as given (a config
    # built in code). A resume takes the fields not set from the checkpoint.
    explicit: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(model=ModelConfig.from_dict(d["model"]), train=TrainConfig(**d["train"]))


# The recipe every preset uses: the modern block with Muon, the winner of `python -m minilm.ablate` at equal
# wall time on a 2-core CPU (README, "The recipe"). The GPT-2 block is ModelConfig's defaults.
MODERN = dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False, bias=False, zero_init=True)
MODERN_TIED = {**MODERN, "tie_embeddings": True}

PRESETS: dict[str, RunConfig] = {
    # ~2.9M parameters with the 8k built-in tokenizer: about 3 minutes on a 2-core CPU.
    "tiny": RunConfig(
        ModelConfig(vocab_size=8192, block_size=128, n_layer=4, n_head=4, n_embd=128, **MODERN),
        TrainConfig(preset="tiny", data_dir="data/builtin-8k", out_dir="out/tiny", optimizer="muon",
                    max_iters=500, lr=3e-3, min_lr=3e-4, muon_lr=0.03, warmup_iters=30, eval_interval=250,
                    eval_iters=10),
    ),
    # ~13M parameters (8M of them the tied 32k embedding) on the installed-packages corpus: hours on a 2-core CPU,
    # minutes on a GPU (docs/training.md has the measured times).
    "small": RunConfig(
        ModelConfig(vocab_size=32000, block_size=256, n_layer=6, n_head=4, n_embd=256, **MODERN_TIED),
        TrainConfig(
            preset="small", data_dir="data/installed-32k", out_dir="out/small", batch_size=32, optimizer="muon",
            max_iters=3000, lr=3e-3, min_lr=3e-4, muon_lr=0.02, warmup_iters=100, eval_interval=250, eval_iters=40,
        ),
    ),
    # ~48M parameters with a 32k tokenizer: the course project, 2-4 h on a T4. Tied embeddings here: an untied
    # 32k x 512 head would cost 16M of the 50M budget, which buys more as depth.
    "mini_lm": RunConfig(
        ModelConfig(vocab_size=32000, block_size=512, n_layer=10, n_head=8, n_embd=512, **MODERN_TIED),
        TrainConfig(
            preset="mini_lm", data_dir="data/installed-32k", out_dir="out/mini_lm", batch_size=16, optimizer="muon",
            grad_accum=4, max_iters=4500, lr=3e-3, min_lr=3e-4, muon_lr=0.02, warmup_iters=200,
            eval_interval=250, eval_iters=50, sample_tokens=128,
        ),
    ),
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def _convert(value: str | object, typ: type, key: str) -> object:
    """Turn a command-line string (or a YAML value) into the field's type."""
    if not isinstance(value, str):
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
            return value
        value = str(value)
    try:
        if typ is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(float(value)) if "e" in value.lower() and float(value).is_integer() else int(value)
        if typ is float:
            return float(value)
        return value
    except ValueError:
        raise ConfigError(f"--{key}={value!r}: expected a {typ.__name__} value") from None


def _field_types(obj: object) -> dict[str, type]:
    return {f.name: {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)] for f in fields(obj)}


def apply_overrides(cfg: RunConfig, overrides: dict[str, object]) -> RunConfig:
    """Set fields by name on whichever of model/train config owns them."""
    model_types, train_types = _field_types(cfg.model), _field_types(cfg.train)
    for key, value in overrides.items():
        if key in model_types:
            setattr(cfg.model, key, _convert(value, model_types[key], key))
        elif key in train_types:
            setattr(cfg.train, key, _convert(value, train_types[key], key))
        else:
            valid = ", ".join(sorted(model_types) + sorted(train_types))
            raise ConfigError(f"unknown config key {key!r}. Valid keys: {valid}")
    return cfg


def load_yaml(path: str | Path) -> dict[str, object]:
    """Read a YAML config: a flat mapping, or one with `model:` and `train:` sections."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of key: value")
    flat: dict[str, object] = {}
    for key, value in data.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_args(argv: list[str] | None = None, *, cuda: bool | None = None) -> tuple[RunConfig, str]:
    """Build a RunConfig from `--preset`, `--config file.yaml` and `--key=value` arguments.

    Returns the config and a sentence saying how the preset was chosen.
    """
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    pairs: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 1
        else:
            key, value = arg[2:], "true"  # bare flag, e.g. --resume
        pairs[key.replace("-", "_")] = value
        i += 1

    file_values = load_yaml(pairs.pop("config")) if "config" in pairs else {}
    preset = pairs.pop("preset", None) or file_values.pop("preset", None)
    if preset is None:
        has_cuda = torch.cuda.is_available() if cuda is None else cuda
        preset = "mini_lm" if has_cuda else "tiny"
        why = f"no --preset given: using '{preset}' because CUDA is {'available' if has_cuda else 'not available'}"
    else:
        why = f"using preset '{preset}'"
    cfg = get_preset(str(preset))
    apply_overrides(cfg, file_values)
    apply_overrides(cfg, pairs)
    cfg.explicit = frozenset(file_values) | frozenset(pairs)
    return cfg, why


def validate(cfg: RunConfig, *, world_size: int = 1) -> None:
    """Check values that would otherwise fail late (or silently); raise ConfigError with what to change."""
    m, t = cfg.model, cfg.train
    problems = m.problems()
    if t.lr <= 0:
        problems.append(f"lr={t.lr} must be > 0 (typical: 6e-4 for mini_lm, 1e-3..3e-3 for tiny)")
    if t.min_lr < 0 or t.min_lr > t.lr:
        problems.append(f"min_lr={t.min_lr} must be between 0 and lr={t.lr}")
    for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval"):
        if getattr(t, name) <= 0:
            problems.append(f"{name}={getattr(t, name)} must be a positive integer")
    if t.grad_accum > 0 and t.grad_accum % world_size:
        problems.append(
            f"grad_accum={t.grad_accum} is not divisible by the number of processes ({world_size}); "
            f"grad_accum is the global count of micro-batches, use a multiple of {world_size}"
        )
    if t.warmup_iters < 0 or t.grad_clip < 0 or t.weight_decay < 0 or t.lr_decay_iters < 0:
        problems.append("warmup_iters, grad_clip, weight_decay and lr_decay_iters must be >= 0")
    if t.optimizer not in ("adamw", "muon"):
        problems.append(f"optimizer={t.optimizer!r} must be 'adamw' or 'muon'")
    if t.muon_lr <= 0 or not 0.0 <= t.muon_momentum < 1.0:
        problems.append(f"muon_lr={t.muon_lr} must be > 0 (typical 0.02) and muon_momentum={t.muon_momentum} "
                        "in [0, 1) (typical 0.95)")
    if t.max_bad_steps <= 0:
        problems.append(f"max_bad_steps={t.max_bad_steps} must be a positive integer")
    if not 0.0 <= t.ema_decay < 1.0:
        problems.append(f"ema_decay={t.ema_decay} must be in [0, 1), e.g. 0.999 (0 turns EMA off)")
    if t.dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"dtype={t.dtype!r} must be one of auto, float32, bfloat16, float16")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
