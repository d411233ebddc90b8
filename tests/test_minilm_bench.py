"""minilm.bench's generation parts on tiny shapes: decode rows per weight format, the ceiling, val-loss quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minilm import bench
from minilm.config import ModelConfig
from minilm.model import GPT
from minilm.quantize import use_weights, weight_bytes

TINY = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32)


def test_decode_rows_report_bytes_and_the_bandwidth_ceiling():
    rows = bench.decode_rows(TINY, ["fp32", "bf16", "int8"], 4, 6, "cpu")
    assert [r["weights"] for r in rows] == ["fp32", "bf16", "int8"]
    mb = [r["mb_per_token"] for r in rows]
    assert mb[0] > mb[1] > mb[2] > 0
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["bandwidth_gb_s"] > 0
        assert r["ceiling_tokens_per_s"] == pytest.approx(r["bandwidth_gb_s"] * 1e3 / r["mb_per_token"])
        assert r["of_ceiling"] == pytest.approx(r["tokens_per_s"] / r["ceiling_tokens_per_s"])
    torch.manual_seed(0)
    model = GPT(TINY)
    assert mb[0] * 1e6 == pytest.approx(weight_bytes(model) + bench.kv_bytes(TINY, 4 + 3))


def test_val_loss_is_the_mean_loss_over_fixed_windows():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    tokens = np.random.default_rng(0).integers(0, 256, 64 * 5 + 7).astype(np.uint16)
    got = bench.val_loss(model, tokens, 64, windows=5, batch=2)  # batches of 2, 2, 1 windows
    x = torch.from_numpy(tokens[: 5 * 64].astype(np.int64)).view(5, 64)
    y = torch.from_numpy(tokens[1 : 5 * 64 + 1].astype(np.int64)).view(5, 64)
    with torch.no_grad():
        want = F.cross_entropy(model(x)[0].view(-1, 256), y.reshape(-1)).item()
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        bench.val_loss(model, tokens[:10], 64)


def test_quality_rows_of_a_trained_run(tiny_run):
    rows = bench.quality_rows(str(tiny_run), ["fp32", "bf16", "int8", "w8a8"], windows=8)
    assert rows[0]["weights"] == "fp32" and rows[0]["delta"] == 0
    for r in rows[1:]:
        assert abs(r["delta"]) <= 0.01 * rows[0]["val_loss"]  # the weight formats cost < 1% of val loss here


def test_quality_run_trained_elsewhere_takes_data_dir(tiny_run, tiny_data_dir, tmp_path, monkeypatch):
    # A run's config names its data dir relative to where it was trained; from another directory --data_dir says
    # where the data is instead.
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ("ckpt.pt", "ckpt_best.pt"):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        ckpt["config"]["train"]["data_dir"] = "data/where-it-was-trained"
        torch.save(ckpt, run / name)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="where-it-was-trained"):
        bench.quality_rows(str(run), ["fp32"], windows=4)
    want = bench.quality_rows(str(tiny_run), ["fp32"], windows=4)[0]["val_loss"]
    assert bench.quality_rows(str(run), ["fp32"], windows=4, data_dir=str(tiny_data_dir))[0]["val_loss"] == want


@pytest.mark.skipif(not bench.has_compiler("cpu"), reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_decode_rows_count_the_whole_static_cache():
    torch._dynamo.reset()
    (row,) = bench.decode_rows(TINY, ["w8a8"], 4, 6, "cpu", compile=True)
    assert row["compiled"] and row["tokens_per_s"] > 0
    torch.manual_seed(0)
    model = use_weights(GPT(TINY), "w8a8")
    assert row["mb_per_token"] * 1e6 == pytest.approx(weight_bytes(model) + bench.kv_bytes(TINY, 64))  # 10 -> 64 slots


def test_generate_section_prints_each_weight_row(capsys):
    bench.main(["--only", "generate", "--decode_preset", "tiny", "--kv_preset", "tiny", "--gen_tokens", "8",
                "--decode_tokens", "4", "--threads", "1", "--compile", "no"])
    out = capsys.readouterr().out
    assert "KV cache vs recomputing" in out and "| tiny (block 1024) | 1 | 16 + 8 | yes |" in out
    for w in ("fp32", "bf16", "int8", "w8a8"):
        assert f"\n| {w} | eager | 1 | " in out
    with pytest.raises(SystemExit):
        bench.main(["--only", "nonsense"])


def test_int8_model_weight_bytes_match_its_buffers():
    model = use_weights(GPT(TINY), "int8")
    q = [m for m in model.modules() if m.__class__.__name__ == "Int8Linear"]
    int8 = sum(m.weight.numel() + 4 * m.scale.numel() + (4 * m.bias.numel() if m.bias is not None else 0) for m in q)
    rest = sum(p.numel() * 4 for n, p in model.named_parameters() if "wte" not in n and "wpe" not in n)
    assert weight_bytes(model) == int8 + rest + 2 * 4 * TINY.n_embd  # + one row of each embedding table
