"""minilm.export: the exported directory loads through transformers and computes the same logits (fp32, 1e-4)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minilm.config import MODERN, ModelConfig  # noqa: E402
from minilm.export import ExportError, block_kind, compare_logits, export_model, main  # noqa: E402
from minilm.model import GPT  # noqa: E402
from minilm.sample import eos_of, load_run  # noqa: E402

TOL = 1e-4  # fp32 logits, minilm vs transformers on the same random tokens


def random_model(seed: int = 0, **fields) -> GPT:
    """A small GPT whose weights are all non-trivial (biases and norm weights included), so a mapping bug shows."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32, **fields))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_cli_exports_the_trained_run_and_pipeline_generates_the_same_text(tiny_run, tmp_path, capsys):
    to = tmp_path / "hf"
    assert main(["--out_dir", str(tiny_run), "--to", str(to)]) == 0
    assert "differ from minilm's by at most" in capsys.readouterr().out
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in to.iterdir()}
    model, tok, ckpt = load_run(tiny_run, "cpu")
    arch = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    assert json.loads((to / "config.json").read_text())["architectures"] == [arch[block_kind(model.config)]]
    assert compare_logits(model, to) <= TOL

    hf_tok = transformers.AutoTokenizer.from_pretrained(to)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    prompt = "def read(self, path):\n    "
    assert hf_tok(prompt)["input_ids"] == tok.encode(prompt).ids
    assert hf_tok.eos_token_id == eos_of(tok, ckpt)

    ids = torch.tensor([tok.encode(prompt).ids])
    ours = model.generate(ids, 12, temperature=0)[0, ids.size(1):].tolist()
    pipe = transformers.pipeline("text-generation", model=str(to), device="cpu")
    out = pipe(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    eos = eos_of(tok, ckpt)
    want = ours[: ours.index(eos)] if eos in ours else ours
    assert out == tok.decode(want)


LLAMA = {**MODERN, "qk_norm": False, "tie_embeddings": True}  # Llama's block: the recipe without QK-norm, tied
ARCHS = [
    ("gpt2", "GPT2LMHeadModel", dict(bias=True)),
    ("gpt2-no-bias-untied", "GPT2LMHeadModel", dict(bias=False, tie_embeddings=False)),
    ("llama", "LlamaForCausalLM", dict(LLAMA)),
    ("llama-bias-untied", "LlamaForCausalLM", dict(LLAMA, bias=True, tie_embeddings=False)),
    ("qwen3", "Qwen3ForCausalLM", dict(LLAMA, qk_norm=True, tie_embeddings=False)),
    ("qwen3-tied-theta", "Qwen3ForCausalLM", dict(LLAMA, qk_norm=True, rope_theta=500.0, mlp_hidden=48)),
]


@pytest.mark.parametrize("arch,fields", [a[1:] for a in ARCHS], ids=[a[0] for a in ARCHS])
def test_each_architecture_loads_through_transformers_with_the_same_logits(tmp_path, tiny_data_dir, arch, fields):
    model = random_model(**fields)
    to = export_model(model, tiny_data_dir / "tokenizer.json", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(to)
    assert type(hf).__name__ == arch
    assert compare_logits(model, to) <= TOL
    # and generation through transformers follows minilm's greedy tokens
    idx = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    ours = model.generate(idx, 8, temperature=0)
    theirs = hf.generate(idx, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_the_check_notices_a_wrong_export(tmp_path, tiny_data_dir):
    """compare_logits is the gate the other tests rely on: it must see a single transposed matrix."""
    model = random_model()
    to = export_model(model, tiny_data_dir / "tokenizer.json", tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    tensors = load_file(to / "model.safetensors")
    w = tensors["transformer.h.1.attn.c_proj.weight"]
    tensors["transformer.h.1.attn.c_proj.weight"] = w.t().contiguous()  # the Conv1D mistake
    save_file(tensors, str(to / "model.safetensors"), metadata={"format": "pt"})
    assert compare_logits(model, to) > 1e-2


def test_refuses_a_non_empty_target_and_unknown_blocks(tmp_path, tiny_data_dir):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--overwrite"):
        export_model(random_model(), tiny_data_dir / "tokenizer.json", tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
    export_model(random_model(), tiny_data_dir / "tokenizer.json", tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "keep.txt").exists()

    def cfg(**kw):
        base = dict(pos="learned", norm="layernorm", mlp="gelu", qk_norm=False, bias=True)
        return SimpleNamespace(**{**base, **kw})

    assert block_kind(cfg()) == "gpt2"
    assert block_kind(cfg(pos="rope", norm="rmsnorm", mlp="swiglu")) == "llama"
    assert block_kind(cfg(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False)) == "qwen3"
    for bad in [dict(pos="rope", norm="rmsnorm", mlp="relu2"), dict(pos="rope", norm="rmsnorm", mlp="gelu"),
                dict(pos="rope"), dict(norm="rmsnorm"), dict(qk_norm=True)]:
        with pytest.raises(ExportError, match="no transformers model matches"):
            block_kind(cfg(**bad))
    with pytest.raises(ExportError, match="bias=False"):
        block_kind(cfg(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=True))


def test_cli_explains_a_missing_run(tmp_path, capsys):
    assert main(["--out_dir", str(tmp_path / "nope"), "--to", str(tmp_path / "hf")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
