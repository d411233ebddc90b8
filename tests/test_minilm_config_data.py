import json
import shutil

import numpy as np
import pytest
import torch

from minilm.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from minilm.config import ConfigError, RunConfig, get_preset, parse_args, validate
from minilm.data import DataError, TokenData
from minilm.model import GPT

# ----------------------------------------------------------------------------- config


def test_no_arguments_picks_tiny_on_cpu_and_mini_lm_on_cuda():
    cfg, why = parse_args([], cuda=False)
    assert cfg.train.preset == "tiny" and "tiny" in why and "not available" in why
    cfg, why = parse_args([], cuda=True)
    assert cfg.train.preset == "mini_lm" and "mini_lm" in why


def test_overrides_convert_types_and_route_to_model_or_train():
    cfg, _ = parse_args(["--preset=small", "--n_layer=3", "--lr", "1e-3", "--compile=true", "--max_iters=2e3",
                         "--resume"])
    assert cfg.model.n_layer == 3 and cfg.train.lr == 1e-3 and cfg.train.compile is True
    # lr_decay_iters 0 = "end the decay at max_iters" (on --resume: keep the checkpoint's), resolved by train()
    assert cfg.train.max_iters == 2000 and cfg.train.lr_decay_iters == 0 and cfg.train.resume is True


def test_yaml_config_with_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nmodel:\n  n_layer: 3\ntrain:\n  lr: 0.001\n  batch_size: 4\n")
    cfg, _ = parse_args(["--config", str(path), "--batch_size=8"])
    assert cfg.model.n_layer == 3 and cfg.train.lr == 0.001 and cfg.train.batch_size == 8  # CLI wins


def test_unknown_key_names_valid_ones():
    with pytest.raises(ConfigError, match="unknown config key 'n_layers'.*n_layer"):
        parse_args(["--n_layers=3"])


def test_bad_type_says_what_was_expected():
    with pytest.raises(ConfigError, match="expected a int"):
        parse_args(["--n_layer=three"])
    with pytest.raises(ConfigError, match="bool"):
        parse_args(["--compile=maybe"])


@pytest.mark.parametrize("override,msg", [
    ({"n_embd": 130, "n_head": 4}, "not divisible by n_head"),
    ({"lr": 0.0}, "lr=0.0 must be > 0"),
    ({"lr": -1.0}, "must be > 0"),
    ({"dropout": 1.0}, "dropout"),
    ({"batch_size": 0}, "batch_size"),
    ({"dtype": "fp8"}, "dtype"),
    ({"ema_decay": 1.5}, "ema_decay"),
])
def test_invalid_values_fail_with_advice(override, msg):
    cfg = get_preset("tiny")
    for k, v in override.items():
        setattr(cfg.model if hasattr(cfg.model, k) else cfg.train, k, v)
    with pytest.raises(ConfigError, match=msg):
        validate(cfg)


def test_grad_accum_must_divide_over_processes():
    cfg = get_preset("tiny")
    cfg.train.grad_accum = 3
    with pytest.raises(ConfigError, match="multiple of 2"):
        validate(cfg, world_size=2)


def test_dtype_the_device_cannot_do_is_refused():
    from minilm.train import resolve_dtype

    with pytest.raises(ConfigError, match="no bfloat16.*--dtype=float16"):
        resolve_dtype("bfloat16", "cuda", bf16_supported=False)  # e.g. a T4 or V100
    assert resolve_dtype("auto", "cuda", bf16_supported=False)[0] == "float16"
    assert resolve_dtype("auto", "cuda", bf16_supported=True)[0] == "bfloat16"
    assert resolve_dtype("auto", "cpu", flags={"avx2", "fma"})[0] == "float32"  # more in test_minilm_loop.py


def test_bad_config_fails_before_any_work(tiny_data_dir, tmp_path):
    from minilm.train import main

    rc = main([f"--data_dir={tiny_data_dir}", f"--out_dir={tmp_path}/r", "--n_embd=100", "--n_head=3"])
    assert rc == 2
    assert not (tmp_path / "r").exists()


def test_run_config_round_trip():
    cfg = get_preset("mini_lm")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------- data


def test_token_data_batches(tiny_data_dir):
    data = TokenData(tiny_data_dir, "train", seed=1)
    x, y = data.get_batch(4, 16, "cpu")
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    again = TokenData(tiny_data_dir, "train", seed=1).get_batch(4, 16, "cpu")
    assert torch.equal(again[0], x)  # seeded


def test_token_data_from_tokens_batches_as_the_data_dir_does(tiny_data_dir):
    data = TokenData(tiny_data_dir, "train", seed=3)
    mine = TokenData.from_tokens(data.tokens, vocab_size=data.meta["vocab_size"], block_size=16, seed=3)
    assert mine.tokens is data.tokens and len(mine) == len(data) and mine.data_dir is None
    for a, b in zip(mine.get_batch(4, 16, "cpu"), data.get_batch(4, 16, "cpu")):
        assert torch.equal(a, b)
    small = TokenData.from_tokens([5, 1, 4, 2, 3, 0, 6])
    assert small.meta["vocab_size"] == 7 and small.split == "train"
    x, y = small.get_batch(2, 3, "cpu", rng=np.random.default_rng(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    empty = np.array([], dtype=np.int64)
    for bad, kw, words in (([[1, 2], [3, 4]], {}, "1-D"), ([0.5, 1.5], {}, "integer"), (empty, {}, "empty"),
                           ([1, -2, 3], {}, "negative"), ([1, 9, 3], {"vocab_size": 8}, "vocab_size 8"),
                           ([1, 2, 3], {"block_size": 3}, "block_size=3")):
        with pytest.raises(DataError, match=words):
            TokenData.from_tokens(np.array(bad), **kw)


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_data_dir_says_how_to_make_one(tmp_path):
    with pytest.raises(DataError, match="dataset_curation build"):
        TokenData(tmp_path / "nope", "train")


def test_empty_split_file(tiny_data_dir, tmp_path):
    d = copy_dir(tiny_data_dir, tmp_path / "d")
    (d / "val.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        TokenData(d, "val")


def test_wrong_dtype_detected(tiny_data_dir, tmp_path):
    d = copy_dir(tiny_data_dir, tmp_path / "d")
    meta = json.loads((d / "meta.json").read_text())
    meta["dtype"] = "uint32"  # the shard is really uint16
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError):
        TokenData(d, "train")


def test_vocab_that_does_not_fit_uint16(tiny_data_dir, tmp_path):
    d = copy_dir(tiny_data_dir, tmp_path / "d")
    meta = json.loads((d / "meta.json").read_text())
    meta["vocab_size"] = 70000
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="does not fit uint16"):
        TokenData(d, "train")


def test_token_ids_beyond_vocab(tiny_data_dir, tmp_path):
    d = copy_dir(tiny_data_dir, tmp_path / "d")
    np.array([1, 2, 60000], dtype=np.uint16).tofile(d / "val.bin")
    meta = json.loads((d / "meta.json").read_text())
    meta["tokens"]["val"] = 3
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="60000"):
        TokenData(d, "val")


def test_model_vocab_smaller_than_data_and_block_too_long(tiny_data_dir):
    with pytest.raises(DataError, match="--vocab_size"):
        TokenData(tiny_data_dir, "train", vocab_size=100)
    n = len(TokenData(tiny_data_dir, "val"))
    with pytest.raises(DataError, match="block_size"):
        TokenData(tiny_data_dir, "val", block_size=n + 10)


def test_truncated_shard_detected(tiny_data_dir, tmp_path):
    d = copy_dir(tiny_data_dir, tmp_path / "d")
    raw = (d / "val.bin").read_bytes()
    (d / "val.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="incomplete|stale"):
        TokenData(d, "val")


# ----------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip(tmp_path):
    cfg = get_preset("tiny")
    cfg.model.n_layer = 1
    model = GPT(cfg.model)
    from minilm.optim import build_optimizers

    opt = build_optimizers(model, cfg.train, "cpu")[0]
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt, step=7, best_val_loss=1.5,
                    config=cfg.to_dict(), data_state={"ranks": [{"rng": np.random.default_rng(3).bit_generator.state}]})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 7 and ckpt["best_val_loss"] == 1.5
    restored, _ = model_from_checkpoint(tmp_path)
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    assert ckpt["optimizer"]["state"]


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "ckpt.pt")


def test_yaml_presets_in_configs_load_and_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        cfg, _ = parse_args(["--config", str(path)])
        validate(cfg)
