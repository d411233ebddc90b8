"""Export a trained run as a Hugging Face `transformers` model directory.

    python -m minilm.export --out_dir out/tiny --to hf/tiny
    # then, anywhere with transformers installed:
    #   AutoModelForCausalLM.from_pretrained("hf/tiny"); AutoTokenizer.from_pretrained("hf/tiny")

The directory holds model.safetensors, config.json, generation_config.json and the tokenizer as a
PreTrainedTokenizerFast. Which transformers class it loads as depends on the block:

| minilm block (pos, norm, mlp, qk_norm) | transformers class |
|---|---|
| learned, layernorm, gelu, no qk-norm (GPT-2) | GPT2LMHeadModel |
| rope, rmsnorm, swiglu, no qk-norm | LlamaForCausalLM |
| rope, rmsnorm, swiglu, qk-norm, bias=False | Qwen3ForCausalLM |

Other combinations have no transformers equivalent and are refused with a message saying why. After writing,
the export is loaded back through transformers and its logits are compared with minilm's (--no_check skips it).
Needs the `export` extra: pip install -e '.[export]'.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from minilm.model import GPT

EOT = "<|endoftext|>"


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says why and what to do."""


def _require_transformers():
    try:
        import safetensors  # noqa: F401
        import transformers
    except ImportError:
        raise ExportError("export needs transformers and safetensors: pip install -e '.[export]'") from None
    return transformers


def block_kind(cfg) -> str:
    """"gpt2", "llama" or "qwen3" for a ModelConfig; ExportError for blocks transformers has no class for."""
    pos, norm = getattr(cfg, "pos", "learned"), getattr(cfg, "norm", "layernorm")
    mlp, qk_norm, bias = getattr(cfg, "mlp", "gelu"), getattr(cfg, "qk_norm", False), cfg.bias
    if (pos, norm, mlp, qk_norm) == ("learned", "layernorm", "gelu", False):
        return "gpt2"
    if (pos, norm, mlp) == ("rope", "rmsnorm", "swiglu"):
        if not qk_norm:
            return "llama"
        if not bias:
            return "qwen3"
        raise ExportError("qk_norm with bias=True has no transformers class: Qwen3 (the QK-norm model) has no MLP "
                          "biases; train with bias=False to export")
    raise ExportError(f"no transformers model matches pos={pos}, norm={norm}, mlp={mlp}, qk_norm={qk_norm}: "
                      "exportable blocks are GPT-2 (learned, layernorm, gelu) and Llama/Qwen3 (rope, rmsnorm, "
                      "swiglu, with qk_norm for Qwen3)")


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """minilm names -> GPT2LMHeadModel names. HF's Conv1D stores (in, out), nn.Linear (out, in): transpose.

    A bias=False model gets zero biases, which GPT-2 always has; adding zero changes nothing.
    """
    sd = model.state_dict()
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue  # written below only when untied
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        out[name] = t
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head" and mod.bias is None:
            width = mod.weight.shape[0]
            out[f"{name}.bias"] = torch.zeros(width, dtype=mod.weight.dtype, device=mod.weight.device)
    if not _tied(model):
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """minilm names -> Llama/Qwen3 names: c_attn splits into q, k, v rows; c_fc into gate (first half) and up."""
    sd = model.state_dict()
    C = model.config.n_embd
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    for i in range(model.config.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "ln_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ln_2.weight"]
        for kind in ("weight", "bias"):
            if src + f"attn.c_attn.{kind}" not in sd:
                continue
            q, k, v = sd[src + f"attn.c_attn.{kind}"].split(C, dim=0)
            out[dst + f"self_attn.q_proj.{kind}"], out[dst + f"self_attn.k_proj.{kind}"] = q, k
            out[dst + f"self_attn.v_proj.{kind}"] = v
            out[dst + f"self_attn.o_proj.{kind}"] = sd[src + f"attn.c_proj.{kind}"]
            gate, up = sd[src + f"mlp.c_fc.{kind}"].chunk(2, dim=0)
            out[dst + f"mlp.gate_proj.{kind}"], out[dst + f"mlp.up_proj.{kind}"] = gate, up
            out[dst + f"mlp.down_proj.{kind}"] = sd[src + f"mlp.c_proj.{kind}"]
        if src + "attn.q_norm.weight" in sd:
            out[dst + "self_attn.q_norm.weight"] = sd[src + "attn.q_norm.weight"]
            out[dst + "self_attn.k_norm.weight"] = sd[src + "attn.k_norm.weight"]
    if not _tied(model):
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _tied(model: GPT) -> bool:
    return model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def hf_config(model: GPT, eos_id: int | None):
    """The transformers config object that describes the same network."""
    transformers = _require_transformers()
    c = model.config
    kind = block_kind(c)
    common = dict(vocab_size=c.vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=_tied(model))
    if kind == "gpt2":
        return transformers.GPT2Config(
            n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            n_inner=model.transformer.h[0].mlp.c_fc.out_features,
            activation_function="gelu",  # minilm's nn.GELU() is the exact erf form, not GPT-2's tanh "gelu_new"
            layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    hidden = model.transformer.h[0].mlp.c_fc.out_features // 2
    args = dict(hidden_size=c.n_embd, intermediate_size=hidden, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_head, head_dim=c.n_embd // c.n_head,
                max_position_embeddings=c.block_size, rms_norm_eps=1e-6, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": float(getattr(c, "rope_theta", 10000.0))},
                attention_bias=c.bias, attention_dropout=0.0, **common)
    if kind == "llama":
        return transformers.LlamaConfig(mlp_bias=c.bias, **args)
    return transformers.Qwen3Config(**args)


def export_model(model: GPT, tokenizer_file: str | Path, to: str | Path, *, overwrite: bool = False) -> Path:
    """Write model + tokenizer as a transformers directory at `to` (built in a temp dir, then moved into place)."""
    transformers = _require_transformers()
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    kind = block_kind(model.config)  # refuse before writing anything
    to = Path(to)
    if to.exists() and any(to.iterdir()) and not overwrite:
        raise ExportError(f"{to} exists and is not empty; pick another --to or pass --overwrite")
    tok = Tokenizer.from_file(str(tokenizer_file))
    eos_id = tok.token_to_id(EOT)
    config = hf_config(model, eos_id)
    config.architectures = [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                             "qwen3": "Qwen3ForCausalLM"}[kind]]
    tensors = gpt2_state_dict(model) if kind == "gpt2" else llama_state_dict(model)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    special = {"eos_token": EOT, "bos_token": EOT} if eos_id is not None else {}
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model.config.block_size,
                                                  **special)

    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=to.parent, prefix=f".{to.name}."))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        gen_config = transformers.GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
        gen_config.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        if to.exists():
            shutil.rmtree(to)
        tmp.rename(to)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return to


@torch.no_grad()
def compare_logits(model: GPT, hf_dir: str | Path, n_tokens: int | None = None, seed: int = 0) -> float:
    """Largest |logit difference| between minilm and the exported model loaded through transformers (fp32)."""
    transformers = _require_transformers()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    T = n_tokens or model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=gen)
    model = model.float().eval()
    ours, _ = model(idx.to(next(model.parameters()).device))
    theirs = hf(idx).logits
    return (ours.cpu() - theirs).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minilm.export", description="Export a run as a transformers model")
    p.add_argument("--out_dir", required=True, help="run directory holding ckpt.pt (or a checkpoint file)")
    p.add_argument("--to", required=True, help="directory to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--best", action="store_true", help="export ckpt_best.pt instead of the last checkpoint")
    p.add_argument("--data_dir", default=None, help="override the data dir (tokenizer) the run was trained on")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --to directory")
    p.add_argument("--no_check", action="store_true", help="skip loading the export back to compare logits")
    a = p.parse_args(argv)

    from minilm.checkpoint import CheckpointError
    from minilm.data import DataError
    from minilm.sample import load_run

    try:
        model, _, ckpt = load_run(a.out_dir, "cpu", a.data_dir, a.best)
        run = Path(a.out_dir) if Path(a.out_dir).is_dir() else Path(a.out_dir).parent
        tok_file = run / "tokenizer.json"
        if not tok_file.is_file():
            tok_file = Path(a.data_dir or ckpt["config"]["train"]["data_dir"]) / "tokenizer.json"
        to = export_model(model, tok_file, a.to, overwrite=a.overwrite)
        print(f"wrote {to} ({block_kind(model.config)}: {model.num_params() / 1e6:.2f}M parameters, "
              f"step {ckpt.get('step')})")
        if not a.no_check:
            diff = compare_logits(model, to, n_tokens=min(64, model.config.block_size))
            print(f"check: transformers' logits differ from minilm's by at most {diff:.2e}")
            if diff > 1e-4:
                print("error: the export does not reproduce the model (difference above 1e-4)", file=sys.stderr)
                return 1
    except (CheckpointError, DataError, ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
