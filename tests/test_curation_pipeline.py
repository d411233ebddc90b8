"""The curation pipeline end to end on small data the tests make (and a slice of the built-in corpus)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from dataset_curation.__main__ import main as cli
from dataset_curation.pipeline import CurationError, build, merge
from dataset_curation.shards import dtype_for, write_split
from dataset_curation.sources import SourceError, hub_documents
from dataset_curation.stages import StageStats, split_train_val

STOP = ["the", "of", "and", "to", "with", "that", "be", "have", "in", "a", "for", "is"]


def prose(rng: random.Random, vocab: list[str], n_words: int = 150) -> str:
    """English-shaped random text that passes the Gopher rules: sentences with stop words, no repetition."""
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        words = [rng.choice(STOP) if rng.random() < 0.3 else rng.choice(vocab) for _ in range(rng.randint(8, 16))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def make_vocab(rng: random.Random) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(800)]


def write_corpus(folder: Path, n: int = 40, seed: int = 0) -> list[str]:
    """n distinct good documents as .txt files, plus an exact copy, a near copy, an empty and a binary file.
    Returns the texts that should survive curation."""
    rng = random.Random(seed)
    vocab = make_vocab(rng)
    folder.mkdir(parents=True, exist_ok=True)
    texts = [prose(rng, vocab) for _ in range(n)]
    for i, t in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(t)
    (folder / "zz_exact_copy.txt").write_text(texts[3])
    words = texts[5].split()
    words[len(words) // 2] = "different"
    (folder / "zz_near_copy.txt").write_text(" ".join(words))
    (folder / "zz_empty.txt").write_text("   \n")
    (folder / "zz_binary.txt").write_bytes(np.random.default_rng(1).bytes(3000))
    return texts


def decode_docs(data_dir: Path, split: str) -> list[str]:
    from tokenizers import Tokenizer

    meta = json.loads((data_dir / "meta.json").read_text())
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    ids = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])
    assert ids[-1] == meta["eot_id"]  # EOT after every document, including the last
    ends = np.flatnonzero(ids == meta["eot_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("corpus") / "txt"
    return folder, write_corpus(folder)


@pytest.fixture(scope="module")
def built(corpus_dir, tmp_path_factory) -> Path:
    folder, _ = corpus_dir
    out = tmp_path_factory.mktemp("built") / "data"
    return build("files", out, vocab_size=600, num_proc=1, progress=False, input=str(folder), val_fraction=0.1)


def test_data_dir_contract(built):
    meta = json.loads((built / "meta.json").read_text())
    for key in ("vocab_size", "dtype", "eot_id", "eot_token", "tokenizer", "tokens", "documents", "bytes",
                "manifest"):
        assert key in meta
    assert meta["dtype"] == "uint16" and meta["eot_token"] == "<|endoftext|>" and meta["vocab_size"] <= 600
    for split in ("train", "val"):
        assert (built / f"{split}.bin").stat().st_size == meta["tokens"][split] * 2
        assert meta["bytes"][split] > 0
    assert meta["manifest"]["input_sha256"]
    for f in ("stats.json", "report.md", "removed_samples.json", "tokenizer.json", "plots/removals.png",
              "plots/lengths.png", "plots/clusters.png", "plots/tokens_per_source.png", "plots/token_lengths.png"):
        assert (built / f).is_file(), f
    assert not list(built.glob("*.tmp"))


def test_minilm_reads_the_data_dir(built):
    from minilm.data import TokenData

    data = TokenData(built, "train", block_size=16)
    x, y = data.get_batch(4, 16, "cpu")
    assert x.shape == (4, 16) and bool((x[:, 1:] == y[:, :-1]).all())


def test_counts_are_conserved_and_reasons_recorded(built):
    stats = json.loads((built / "stats.json").read_text())
    prev_kept = None
    for s in stats["stages"]:
        assert s["docs_in"] == s["docs_kept"] + s["docs_removed"], s["name"]
        assert s["chars_in"] == s["chars_kept"] + s["chars_removed"], s["name"]
        assert sum(s["removed"].values()) == s["docs_removed"]
        if prev_kept is not None:
            assert s["docs_in"] == prev_kept  # each stage gets exactly what the previous one kept
        prev_kept = s["docs_kept"]
    by = {s["name"]: s for s in stats["stages"]}
    assert by["normalize"]["removed"] == {"empty": 1, "binary": 1}
    assert by["exact_dedup"]["removed"] == {"exact_duplicate": 1}
    assert by["near_dedup"]["removed"] == {"near_duplicate": 1}
    samples = json.loads((built / "removed_samples.json").read_text())
    assert samples["exact_dedup"]["exact_duplicate"][0]["id"].startswith("file:zz_exact_copy.txt")


def test_shards_decode_back_to_the_kept_documents(built, corpus_dir):
    _, texts = corpus_dir
    train, val = decode_docs(built, "train"), decode_docs(built, "val")
    assert sorted(train + val) == sorted(texts)  # every kept document, whole, exactly once
    assert not set(train) & set(val)  # no document in both halves
    assert len(val) >= 1 and len(train) > len(val)


def test_rerun_skips_and_is_byte_identical(built, corpus_dir, capsys):
    folder, _ = corpus_dir
    before = {f.name: f.read_bytes() for f in built.iterdir() if f.is_file() and f.name != "timings.json"}
    build("files", built, vocab_size=600, num_proc=1, progress=True, input=str(folder), val_fraction=0.1)
    err = capsys.readouterr().err
    assert "doc_stages: cached" in err and "tokenizer: cached" in err
    after = {f.name: f.read_bytes() for f in built.iterdir() if f.is_file() and f.name != "timings.json"}
    assert before == after


def test_interrupted_run_resumes(corpus_dir, tmp_path):
    folder, texts = corpus_dir
    out = build("files", tmp_path / "d", vocab_size=400, num_proc=1, progress=False, input=str(folder),
                val_fraction=0.1)
    train = (out / "train.bin").read_bytes()
    # simulate a crash after the dedup stages: later caches and outputs are gone
    for f in list((out / ".cache").iterdir()):
        if f.name.startswith(("split", "decontaminate", "tokenizer")):
            f.unlink()
    for name in ("meta.json", "train.bin"):
        (out / name).unlink()
    build("files", out, vocab_size=400, num_proc=1, progress=False, input=str(folder), val_fraction=0.1)
    assert (out / "train.bin").read_bytes() == train


def test_parallel_and_serial_builds_agree(corpus_dir, built, tmp_path):
    folder, _ = corpus_dir
    out = build("files", tmp_path / "p", vocab_size=600, num_proc=2, progress=False, input=str(folder),
                val_fraction=0.1)
    for name in ("train.bin", "val.bin", "tokenizer.json", "stats.json"):
        assert (out / name).read_bytes() == (built / name).read_bytes(), name


def test_shard_jobs_then_merge(corpus_dir, built, tmp_path):
    folder, texts = corpus_dir
    out = tmp_path / "sharded"
    for i in range(2):
        build("files", out, vocab_size=600, num_proc=1, progress=False, input=str(folder), val_fraction=0.1,
              shard=f"{i}/2")
    with pytest.raises(CurationError, match="missing"):
        merge(out, 3, vocab_size=600, progress=False, input=str(folder), val_fraction=0.1)
    merge(out, 2, vocab_size=600, num_proc=1, progress=False, input=str(folder), val_fraction=0.1)
    assert sorted(decode_docs(out, "train") + decode_docs(out, "val")) == sorted(texts)
    one = json.loads((built / "stats.json").read_text())["stages"]
    two = json.loads((out / "stats.json").read_text())["stages"]
    for a, b in zip(one, two):  # same documents removed for the same reasons, whichever way it ran
        assert (a["name"], a["docs_in"], a["removed"]) == (b["name"], b["docs_in"], b["removed"])


def test_builtin_recipe_on_a_slice_of_the_stdlib(tmp_path):
    out = build("builtin", tmp_path / "b", vocab_size=512, num_proc=2, progress=False, max_files=40,
                val_fraction=0.2)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["manifest"]["recipe"] == "builtin" and meta["manifest"]["files"] == 40
    assert meta["manifest"]["python"] and meta["manifest"]["license"] == "PSF-2.0"
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["per_source"]) <= {"stdlib-code", "stdlib-docstrings"}
    assert meta["tokens"]["train"] > 10_000 and meta["tokens"]["val"] > 0


def test_target_tokens(corpus_dir, tmp_path):
    folder, _ = corpus_dir
    with pytest.warns(UserWarning, match="larger than the data"):
        out = build("files", tmp_path / "big", vocab_size=400, num_proc=1, progress=False, input=str(folder),
                    val_fraction=0.1, target_tokens=10**9)
    assert "larger than the data" in (out / "report.md").read_text()
    full = json.loads((out / "meta.json").read_text())["tokens"]["train"]
    out = build("files", tmp_path / "small", vocab_size=400, num_proc=1, progress=False, input=str(folder),
                val_fraction=0.1, target_tokens=full // 3)
    meta = json.loads((out / "meta.json").read_text())
    assert full // 3 <= meta["tokens"]["train"] < full // 2  # stops at the first document boundary past it
    assert len(decode_docs(out, "train")) == meta["documents"]["train"]


def test_empty_and_binary_inputs_fail_clearly(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        build("files", tmp_path / "o", progress=False, input=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .txt"):
        build("files", tmp_path / "o", progress=False, input=str(tmp_path / "empty"))
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(CurationError, match="survived curation"):
        build("files", tmp_path / "o", progress=False, input=str(tmp_path / "empty"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "data.txt").write_bytes(np.random.default_rng(0).bytes(20_000))
    with pytest.raises(CurationError, match="survived curation"):
        build("files", tmp_path / "o", progress=False, input=str(tmp_path / "bin"))
    with pytest.raises(CurationError, match="unknown parameter"):
        build("files", tmp_path / "o", progress=False, input=str(tmp_path / "bin"), treshold=0.5)
    with pytest.raises(CurationError, match="unknown recipe"):
        build("web", tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "meta.json").exists()


def test_single_huge_document(tmp_path):
    rng = random.Random(3)
    vocab = make_vocab(rng)
    lines = [f"def {rng.choice(vocab)}_{i}(x):\n    return x * {i} + len('{rng.choice(vocab)}')\n"
             for i in range(10_000)]
    huge = "".join(lines).rstrip("\n")  # ~0.5 MB of code in one document
    rows = [{"text": huge, "kind": "code"}]
    (tmp_path / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(CurationError, match="at least one whole document each"):
        build("files", tmp_path / "o", progress=False, input=str(tmp_path / "one.jsonl"))
    rows += [{"text": prose(rng, vocab), "kind": "prose"} for _ in range(12)]
    (tmp_path / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = build("files", tmp_path / "o2", vocab_size=1000, num_proc=2, progress=False,
                input=str(tmp_path / "many.jsonl"), val_fraction=0.2)
    docs = decode_docs(out, "train") + decode_docs(out, "val")
    assert huge in docs and len(docs) == 13


def test_dtype_choice_and_wide_ids(tmp_path):
    assert dtype_for(8192) == "uint16" and dtype_for(65535) == "uint16"
    assert dtype_for(65536) == "uint32" and dtype_for(100_000) == "uint32"
    from tokenizers import Tokenizer, models, pre_tokenizers

    # A word-level tokenizer whose ids are shifted past 65,535 shows uint32 shards keep every id intact.
    vocab = {f"w{i}": 70_000 + i for i in range(10)}
    vocab["[UNK]"] = 0
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "t.json"))
    counts = write_split(["w1 w2", "w9"], tmp_path / "x.bin", tmp_path / "t.json", 70_010, "uint32")
    assert np.fromfile(tmp_path / "x.bin", dtype=np.uint32).tolist() == [70_001, 70_002, 70_010, 70_009, 70_010]
    assert counts.tolist() == [3, 2]
    with pytest.raises(OverflowError):
        write_split(["w1"], tmp_path / "y.bin", tmp_path / "t.json", 70_010, "uint16")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["t.json", "x.bin"]  # no y.bin, and no temp file left


def test_split_is_by_whole_document_and_deterministic():
    docs = [{"id": f"doc{i}", "text": f"text {i}"} for i in range(2000)]
    a = split_train_val(docs, StageStats("split"), 0.1)
    b = split_train_val(list(reversed(docs)), StageStats("split"), 0.1)
    side = {d["id"]: d["split"] for d in a}
    assert side == {d["id"]: d["split"] for d in b}  # by hash of the id, not by position
    assert 0.07 < sum(v == "val" for v in side.values()) / len(side) < 0.13
    grouped = [{"id": f"g{i}:{part}", "group": f"g{i}", "text": "t"} for i in range(300) for part in ("a", "b")]
    sides = {}
    for d in split_train_val(grouped, StageStats("split"), 0.2):
        sides.setdefault(d["group"], set()).add(d["split"])
    assert all(len(s) == 1 for s in sides.values())  # a group never straddles the split
    two = split_train_val(docs[:2], StageStats("split"), 0.01)
    assert sorted(d["split"] for d in two) == ["train", "val"]  # tiny corpora still get both splits


def test_decontamination(tmp_path):
    from dataset_curation.dedup import decontaminate

    rng = random.Random(9)
    vocab = make_vocab(rng)
    val = prose(rng, vocab, 200)
    half_copy = " ".join(val.split()[:100]) + " " + prose(rng, vocab, 100)
    clean = prose(rng, vocab, 200)
    quoting_benchmark = prose(rng, vocab, 100) + " " + " ".join(val.split()[20:40])
    docs = [{"id": "v", "text": val, "split": "val"}, {"id": "h", "text": half_copy, "split": "train"},
            {"id": "c", "text": clean, "split": "train"}]
    st = StageStats("decontaminate")
    kept = decontaminate(docs, st, ngram=13)
    st.check()
    assert [d["id"] for d in kept] == ["v", "c"] and st.removed == {"overlaps_val": 1}
    bench = {"id": "b", "text": quoting_benchmark, "split": "train"}
    st = StageStats("decontaminate")
    kept = decontaminate([bench, docs[2]], st, eval_texts=[val], ngram=13)
    assert [d["id"] for d in kept] == ["c"] and st.removed == {"contaminated_eval": 1}


def test_decontamination_checks_punctuation_dense_code():
    # Three whitespace-separated "words" but ~90 normalized ones (the words the n-grams are made of): the train
    # copy of a val file must be checked like any other document, and found.
    from dataset_curation.dedup import decontaminate

    code = "\n".join(";".join(f"x{i}{j}=alpha[{i}].beta({j},gamma)" for j in range(6)) for i in range(3))
    assert len(code.split()) == 3
    docs = [{"id": "v", "text": code, "split": "val"}, {"id": "t", "text": code + ";y=1", "split": "train"}]
    st = StageStats("decontaminate")
    kept = decontaminate(docs, st, ngram=13)
    st.check()
    assert [d["id"] for d in kept] == ["v"] and st.removed == {"overlaps_val": 1}
    st = StageStats("decontaminate")
    assert decontaminate([docs[1]], st, eval_texts=[code], ngram=13) == []
    assert st.removed == {"contaminated_eval": 1}


def test_hub_recipe_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="--recipe builtin"):
        next(hub_documents(1000))


def test_cli(corpus_dir, tmp_path, capsys):
    folder, _ = corpus_dir
    assert cli(["build", "--recipe", "files", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["build", "--recipe", "files", "--input", str(folder), "--out", str(tmp_path / "o"), "--quiet",
                "--vocab_size", "300", "--num_proc", "1", "--set", "val_fraction=0.1", "--set", "threshold=0.9"]) == 0
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["manifest"]["params"]["threshold"] == 0.9 and meta["vocab_size"] <= 300


def test_caches_and_shard_outputs_are_plain_data(built, corpus_dir, tmp_path):
    # Nothing the pipeline reads back may be a pickle (a shared data folder must not be able to run code).
    folder, _ = corpus_dir
    build("files", tmp_path / "s", vocab_size=600, num_proc=1, progress=False, input=str(folder), val_fraction=0.1,
          shard="0/2")
    files = [f for f in [*built.rglob("*"), *(tmp_path / "s").rglob("*")] if f.is_file()]
    assert any(f.parent.name == "shards" for f in files) and any(f.parent.name == ".cache" for f in files)
    for f in files:
        assert not f.read_bytes().startswith(b"\x80"), f"{f} is a pickle"
        if f.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                [z[k] for k in z.files]  # every member is a plain array


def test_outputs_are_fsynced_and_temp_names_are_unique(corpus_dir, tmp_path, monkeypatch):
    import os

    folder, _ = corpus_dir
    out = tmp_path / "d"
    out.mkdir()
    (out / "meta.json.tmp").write_text("another writer's temp file")  # a fixed temp name would take this over
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    build("files", out, vocab_size=400, num_proc=1, progress=False, input=str(folder), val_fraction=0.1)
    assert (out / "meta.json.tmp").read_text() == "another writer's temp file"
    assert json.loads((out / "meta.json").read_text())["vocab_size"] <= 400
    if os.path.exists("/proc/self/fd"):
        names = {Path(p).name.split(".tmp")[0] for p in synced}
        for name in ("meta.json", "stats.json", "train.bin", "val.bin", "tokenizer.json", "report.md"):
            assert any(n.startswith(f".{name}.") for n in names), name
    assert not [f for f in out.rglob("*.tmp") if f.name != "meta.json.tmp"]


def test_one_atomic_write_per_package():
    # dataset_curation has its own (it must not import minilm); efficient_training and metrics reuse minilm's.
    root = Path(__file__).resolve().parents[1]
    count = lambda pkg: sum(f.read_text().count("os.replace(") for f in (root / pkg).rglob("*.py"))
    assert count("dataset_curation") == 1
    assert count("efficient_training") == 0 and count("metrics") == 0


def test_files_recipe_without_datasets_says_which_extra_to_install(corpus_dir, tmp_path, monkeypatch):
    import sys

    folder, _ = corpus_dir
    monkeypatch.setitem(sys.modules, "datasets", None)  # as after `make train`, which installs only the core
    with pytest.raises(SourceError, match=r"pip install -e '\.\[data\]'"):
        build("files", tmp_path / "d", vocab_size=400, num_proc=1, progress=False, input=str(folder))
    assert not (tmp_path / "d" / "train.bin").exists()
