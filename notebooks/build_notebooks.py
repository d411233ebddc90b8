"""Generate the course notebooks (stored without outputs) from the cell texts below.

    python notebooks/build_notebooks.py          # rewrites notebooks/week17/*.ipynb and notebooks/week18/*.ipynb

Edit the cells here, not in the .ipynb files, so the notebooks stay reproducible and reviewable as plain Python.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
# The public home of the repository, used by the Colab badge and the Colab setup cell.
REPO = os.environ.get("COURSE_GITHUB_REPO", "llm-course/llm-training-from-scratch")
CLONE_DIR = "/content/llm-training-from-scratch"


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


def header(path: str, title: str, intro: str) -> list:
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{path})")
    week = path.split("/")[0]
    return [
        md(f"{badge}\n\n# {title}\n\n{textwrap.dedent(intro).strip()}"),
        code(f'''
            # Setup. On Colab only: clone the course repository and install it (Colab's own torch is kept, never
            # replaced). Locally, install once with `pip install -e ".[dev]"` from the repository root (see README).
            import os
            import subprocess
            import sys
            from pathlib import Path

            if "google.colab" in sys.modules:
                if not Path("{CLONE_DIR}").is_dir():
                    subprocess.run(["git", "clone", "--depth", "1", "https://github.com/{REPO}", "{CLONE_DIR}"],
                                   check=True)
                    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "{CLONE_DIR}[metrics,serve]"],
                                   check=True)
                os.chdir("{CLONE_DIR}/notebooks/{week}")
            ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
            if str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))  # the packages import even without an editable install
            print("repository:", ROOT)
        '''),
        code('''
            FAST = True  # True: small and quick on a 2-core CPU, downloads nothing. False: the full run (use a GPU).
            SEED = 0

            import random

            import matplotlib.pyplot as plt
            import numpy as np
            import torch

            random.seed(SEED)
            np.random.seed(SEED)
            torch.manual_seed(SEED)
            if FAST:  # the Hugging Face libraries fail at once instead of trying the network
                os.environ["HF_HUB_OFFLINE"] = "1"
                os.environ["HF_DATASETS_OFFLINE"] = "1"
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
            %matplotlib inline


            def show():
                """Display the current figure inline, even after a package switched matplotlib to Agg to save files."""
                from IPython.display import display

                fig = plt.gcf()
                fig.tight_layout()
                display(fig)
                plt.close(fig)


            print(f"FAST={FAST}, device={DEVICE}, torch {torch.__version__}")
        '''),
    ]


# ============================================================================ week 17 / 01 data curation

CURATION = header("week17/01_data_curation.ipynb", "Week 17 · 01 — From raw text to a training corpus", """
    What a model learns is decided by what it reads. This notebook walks the `dataset_curation` pipeline on the
    built-in corpus (the Python standard library of this interpreter: its code, and its docstrings and comments as
    English prose): what the documents look like, what quality rules throw away, how MinHash finds near-duplicates,
    and the data dir the pipeline writes. Days 1 and 2 of the course ([week17.md](../../course/week17.md)).
""") + [
    md("""
        ## 1. The raw documents

        Every document carries its source, path, licence and kind (code or prose). `FAST` reads a subset of the
        files; the full corpus is about 1,800 files and 30 MB.
    """),
    code("""
        import collections
        import json

        from course import check, nb
        from dataset_curation import filters, sources

        docs, manifest = sources.builtin_documents(max_files=120 if FAST else None)
        print({k: manifest[k] for k in ("python", "files", "bytes", "license") if k in manifest})
        print(collections.Counter(d["kind"] for d in docs), "documents")
        lengths = {kind: [len(d["text"]) for d in docs if d["kind"] == kind] for kind in ("code", "prose")}
        bins = np.logspace(1, 6, 40)
        plt.figure(figsize=(6, 3))
        for kind, ls in lengths.items():
            plt.hist(ls, bins=bins, alpha=0.6, label=f"{kind} ({len(ls)})")
        plt.xscale("log"); plt.xlabel("characters per document"); plt.ylabel("documents"); plt.legend()
        show()
        sample = random.Random(SEED).choice([d for d in docs if d["kind"] == "prose"])
        print(sample["id"], "\\n", sample["text"][:400])
    """),
    md("""
        ## 2. Quality filters

        Web-scale pipelines drop documents by simple, published rules. The Gopher *quality* rules look at word
        counts, word length, symbols, bullet and ellipsis lines, the share of real words and a handful of English
        stop words; the *repetition* rules at repeated lines, paragraphs and n-grams. Each returns the reason a
        document fails, or `None` to keep it. Try them on documents made to fail:
    """),
    code("""
        made_up = {
            "real prose": sample["text"],
            "too short": "Click here to continue.",
            "symbol soup": "#### ### ## # " * 30 + " the and of to that with",
            "bullet list": "\\n".join(f"- item number {i} of the list" for i in range(60)),
            "repetitive": "buy the best shoes and the best bags today with us " * 40,
        }
        for name, text in made_up.items():
            print(f"{name:12s} quality: {str(filters.gopher_quality(text)):28s} "
                  f"repetition: {filters.gopher_repetition(text)}")
    """),
    md("""
        Code is not prose: a Python file has few stop words and many symbols, so prose rules would throw all code
        away. The pipeline applies code-aware rules to code (line lengths, the share of alphanumeric characters,
        generated-file markers) — see `dataset_curation/filters.py`.

        ## 3. Near-duplicates with MinHash

        Exact deduplication (hashing the normalised text) misses documents that differ by a few words. The standard
        library has a real case: the codec tables `encodings/cp*.py` are generated from one template. To compare
        documents, cut each into word 5-gram *shingles* and use the Jaccard similarity |A ∩ B| / |A ∪ B|. Comparing
        all pairs exactly is quadratic; **MinHash** summarises each document by the minimum of each of `num_perm`
        random hash functions over its shingles. Two signatures agree in a position with probability equal to the
        Jaccard similarity:
    """),
    code("""
        from itertools import combinations

        from dataset_curation.minhash import jaccard, minhash_signatures, near_duplicate_clusters, shingles

        root = sources.stdlib_root()
        paths = sorted((root / "encodings").glob("cp*.py"))[: 10 if FAST else None]
        paths += [root / name for name in ("textwrap.py", "string.py", "bisect.py", "colorsys.py", "shlex.py")]
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
        names = [p.name for p in paths]
        sets = [set(shingles(t).tolist()) for t in texts]
        sig = minhash_signatures(texts, num_perm=112, seed=SEED)
        pairs = list(combinations(range(len(texts)), 2))
        exact = [jaccard(sets[i], sets[j]) for i, j in pairs]
        est = [float((sig[i] == sig[j]).mean()) for i, j in pairs]
        plt.figure(figsize=(4, 4))
        plt.scatter(exact, est, s=12); plt.plot([0, 1], [0, 1], color="grey", lw=0.8)
        plt.xlabel("exact Jaccard"); plt.ylabel("MinHash estimate (112 hashes)"); show()
        print(f"{len(pairs)} pairs, mean |estimate - exact| = {np.mean(np.abs(np.subtract(est, exact))):.3f}")
    """),
    md("""
        **LSH** avoids comparing every pair of signatures: cut each signature into `b` bands of `r` rows and call two
        documents candidates when any band matches exactly. The chance of that is `1 - (1 - s^r)^b` at similarity
        `s`: an S-curve whose steep part sits near the threshold you want (FineWeb uses 14 bands × 8 rows).
    """),
    code("""
        from dataset_curation.minhash import match_probability

        s_grid = np.linspace(0, 1, 101)
        plt.figure(figsize=(5, 3))
        for b, r in [(14, 8), (20, 5), (9, 12)]:
            plt.plot(s_grid, [match_probability(s, b, r) for s in s_grid], label=f"{b} bands x {r} rows")
        plt.xlabel("Jaccard similarity"); plt.ylabel("P(candidate pair)"); plt.legend(); show()

        clusters = near_duplicate_clusters(sig, bands=14, rows=8, threshold=0.7)
        for c in clusters:
            print("near-duplicate cluster:", [names[i] for i in c])
        print("keep the first of each cluster; documents in no cluster are kept as they are")
    """),
    md("""
        ### Exercise — MinHash signatures

        Write `my_minhash(shingle_sets, num_perm, seed)` returning a numpy array of shape
        `(len(shingle_sets), num_perm)`: for each of `num_perm` hash functions (e.g. `(a * h(x) + b) mod p` with
        random `a, b` drawn from `seed`, and `h` a fixed hash of the shingle string such as `zlib.crc32`), the
        minimum over the set. The check builds set pairs with known Jaccard similarity and compares your estimates
        with the exact values and with the package's.
    """),
    code("""
        # YOUR CODE: replace the body below with your own implementation (it calls the reference until you do).
        def my_minhash(shingle_sets, num_perm, seed):
            return minhash_signatures(shingle_sets, num_perm=num_perm, seed=seed)
    """),
    code("""
        assert check.minhash(my_minhash)
    """),
    md("""
        ## 4. The whole pipeline

        `dataset_curation.pipeline.build` runs every stage — normalise, quality filters, PII masking, exact dedup,
        MinHash dedup, train/validation split by document, decontamination, tokenizer training, token shards — and
        records, for each stage, documents and characters in, kept and removed by reason (in = kept + removed,
        always). `FAST` builds a small subset (a few seconds); the full built-in corpus takes a few minutes:
        `python -m dataset_curation build --recipe builtin --out data/builtin-8k`.
    """),
    code("""
        data_dir = nb.data_dir(FAST)
        stats = json.loads((data_dir / "stats.json").read_text())
        for st in stats["stages"]:
            print(f"{st['name']:14s} in {st['docs_in']:5d}  kept {st['docs_kept']:5d}  removed {st['docs_removed']:4d} "
                  f"{st['removed'] or ''}")
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.bar([st["name"] for st in stats["stages"]], [st["docs_kept"] for st in stats["stages"]])
        ax.set_ylabel("documents kept"); plt.xticks(rotation=30, ha="right"); show()
        meta = json.loads((data_dir / "meta.json").read_text())
        print(f"tokens: {meta['tokens']}, vocab {meta['vocab_size']}, {stats['bytes_per_token']} bytes/token")
    """),
    md("""
        A learner should *look* at what was thrown away before trusting a filter. The pipeline keeps a sample of
        removed documents per reason:
    """),
    code("""
        removed = json.loads((data_dir / "removed_samples.json").read_text())
        for stage, reasons in removed.items():
            for reason, items in reasons.items():
                print(f"[{stage} / {reason}] {items[0]['id']}: {items[0]['text'][:160]!r}")
    """),
    code("""
        from IPython.display import Image, display

        for png in sorted((data_dir / "plots").glob("*.png"))[:3]:
            print(png.name)
            display(Image(filename=str(png), width=520))
    """),
    md("""
        **Task 1** ([course/README.md](../../course/README.md)): build your data dir —
        `python -m dataset_curation build --recipe builtin --out data/builtin-8k` on a CPU, or the `wiki_code` recipe
        with a 100M-token target on a machine with internet — read its `report.md`, and check
        `python -m course status`.

        Next: [02_tokenization.ipynb](02_tokenization.ipynb).
    """),
]


# ============================================================================ week 17 / 02 tokenization

TOKENIZATION = header("week17/02_tokenization.ipynb", "Week 17 · 02 — Tokenization: BPE by hand and by library", """
    A model reads integers, not text. Byte-level BPE starts from the 256 byte values (so any string can be encoded)
    and learns merges of frequent neighbours. We train one by hand (`dataset_curation/bpe.py`), compare it with
    Hugging Face `tokenizers`, and look at the token shards a data dir holds. Day 3 of the course
    ([week17.md](../../course/week17.md)).
""") + [
    code("""
        import time

        from course import check, nb
        from dataset_curation import sources
        from dataset_curation.bpe import BPETokenizer, pretokenize, train_bpe

        docs, _ = sources.builtin_documents(max_files=60 if FAST else 400)
        texts = [d["text"] for d in docs]
        random.Random(SEED).shuffle(texts)
        held_out = "\\n".join(texts[:10])[:100_000]
        train_text = "\\n".join(texts[10:])[: 300_000 if FAST else 3_000_000]
        print(f"training text: {len(train_text):,} characters; held-out: {len(held_out):,}")
        s = "héllo wörld 🙂"
        print(s, "->", list(s.encode("utf-8")), "(UTF-8 bytes: the starting alphabet)")
        print("pre-tokens:", pretokenize("def add(a, b):  return a + b  # 42 apples"))
    """),
    md("""
        ## 1. Training BPE by hand

        Count every adjacent pair of tokens inside each pre-token (pre-tokens are words with their leading space,
        numbers, punctuation runs and whitespace, so merges never cross them), merge the most frequent pair into a
        new token, repeat. The first merges are the most common byte pairs of Python source:
    """),
    code("""
        t0 = time.perf_counter()
        ours = train_bpe(train_text, vocab_size=512)
        t_ours = time.perf_counter() - t0
        print(f"trained {len(ours.merges)} merges in {t_ours:.2f} s")
        print("first merges:", [ours.vocab[256 + r].decode("utf-8", "replace") for r in range(20)])
        print("longest tokens:", sorted((t.decode("utf-8", "replace") for t in ours.vocab[256:]), key=len)[-8:])
        example = "def forward(self, x):\\n    return self.proj(x)<|endoftext|>"
        ids = ours.encode(example)
        print(len(example), "characters ->", len(ids), "tokens:", [ours.decode([i]) for i in ids])
        assert ours.decode(ids) == example
    """),
    md("""
        ### Exercise — the BPE trainer

        Write `my_train_bpe(text, num_merges)` returning the merges, a list of `(id, id)` pairs in the order learned.
        Use `pretokenize(text)`; start every pre-token from its UTF-8 bytes; count pairs weighted by how often each
        pre-token occurs; merge the most frequent pair (ties: the smallest pair) into id `256 + r`; stop early when no
        pair occurs twice. The check compares your merges with `train_bpe`'s one by one.
    """),
    code("""
        # YOUR CODE: replace the body below with your own implementation (it calls the reference until you do).
        def my_train_bpe(text, num_merges):
            return train_bpe(text, vocab_size=256 + num_merges + 1).merges
    """),
    code("""
        assert check.bpe(my_train_bpe)
    """),
    md("""
        ## 2. The same with Hugging Face `tokenizers`

        The library implements the same algorithm in Rust. Compression is measured in bytes of text per token on
        held-out text: more bytes per token means shorter sequences, so more text fits the context and training is
        cheaper per byte.
    """),
    code("""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        def train_hf(text, vocab_size):
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tok.train_from_iterator([text], trainer)
            return tok

        n_bytes = len(held_out.encode("utf-8"))
        sizes = [300, 512, 1024] if FAST else [512, 1024, 4096, 8192]
        rows = []
        for v in sizes:
            t0 = time.perf_counter(); mine = train_bpe(train_text, v); t1 = time.perf_counter()
            hf = train_hf(train_text, v); t2 = time.perf_counter()
            rows.append((v, n_bytes / len(mine.encode(held_out)), n_bytes / len(hf.encode(held_out).ids), t1 - t0,
                         t2 - t1))
            print(f"vocab {v:5d}: bytes/token ours {rows[-1][1]:.3f}, tokenizers {rows[-1][2]:.3f}; "
                  f"training {rows[-1][3]:.2f} s vs {rows[-1][4]:.2f} s")
        fig, ax = plt.subplots(1, 2, figsize=(10, 3))
        ax[0].plot(sizes, [r[1] for r in rows], "o-", label="ours"); ax[0].plot(sizes, [r[2] for r in rows], "s--",
                                                                                label="tokenizers")
        ax[0].set_xlabel("vocabulary size"); ax[0].set_ylabel("bytes per token (held out)"); ax[0].legend()
        ax[1].plot(sizes, [r[3] for r in rows], "o-", label="ours (Python)")
        ax[1].plot(sizes, [r[4] for r in rows], "s--", label="tokenizers (Rust)")
        ax[1].set_xlabel("vocabulary size"); ax[1].set_ylabel("training seconds"); ax[1].legend()
        show()
    """),
    md("""
        Same algorithm, same pre-tokenization idea: the compression comes out (nearly) the same; where the two
        differ, it is the pre-tokenizer's regex or the order in which ties between equally frequent pairs are
        broken. The speed gap is Python against Rust, and it grows with the corpus.

        ## 3. Special tokens and round trips

        The end-of-text token separates documents in the shards. It must be one id, never split, and no merge may
        span it. And since the alphabet is all 256 bytes, every string encodes and decodes back exactly:
    """),
    code("""
        print(ours.encode("a<|endoftext|>b"), "-> the special token is id", ours.special_tokens["<|endoftext|>"])
        rng = random.Random(SEED)
        for _ in range(200):
            s = "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x7FF), rng.randint(0x4E00, 0x9FFF),
                                        rng.randint(0x1F600, 0x1F64F)])) for _ in range(rng.randint(0, 30)))
            assert ours.decode(ours.encode(s)) == s
        print("200 random Unicode strings round-trip exactly")
    """),
    md("""
        ## 4. Token shards

        The data dir stores each split as one flat array of token ids (`train.bin`, `val.bin`), uint16 when the
        vocabulary fits in 65,535 ids and uint32 otherwise, with the end-of-text id after each document. Training
        reads random windows from a memory map, so the corpus never has to fit in RAM.
    """),
    code("""
        from minilm.data import TokenData, load_tokenizer, read_meta

        data_dir = nb.data_dir(FAST)
        meta = read_meta(data_dir)
        tok = load_tokenizer(data_dir)
        train = TokenData(data_dir, "train")
        print(f"{len(train):,} training tokens, dtype {meta['dtype']} ({np.dtype(meta['dtype']).itemsize} bytes each), "
              f"vocab {meta['vocab_size']}")
        eot = meta["eot_id"]
        ends = np.flatnonzero(np.asarray(train.tokens[:200_000]) == eot)
        print(f"first documents end at token {ends[:5].tolist()}; a window read back as text:")
        print(tok.decode(np.asarray(train.tokens[:60]).tolist()))
        x, y = train.get_batch(2, 16)
        print("a batch: x", x.shape, "y = x shifted by one:", torch.equal(x[:, 1:], y[:, :-1]))
    """),
    md("""
        **Task 1** is due today: your data dir, built with the vocabulary size of your preset (8,192 for `tiny`,
        32,000 for `mini_lm`).

        Next: [03_metrics.ipynb](03_metrics.ipynb).
    """),
]


# ============================================================================ week 17 / 03 metrics

METRICS = header("week17/03_metrics.ipynb", "Week 17 · 03 — Measuring a language model", """
    Perplexity, BLEU, ROUGE and generation metrics, written from scratch in `metrics/` and checked against the
    tools the field trusts (`sacrebleu`, `rouge-score`). You will rebuild each one and let `course.check` compare
    your version with the reference on fresh random inputs.

    Days 4 and 5 of the course ([week17.md](../../course/week17.md)).
""") + [
    md("""
        ## 1. A model to measure

        We need a trained model and held-out tokens. `course.nb` builds (or reuses) a small data dir from the
        built-in corpus and trains a tiny GPT for a few hundred steps (or reuses the run notebook 05 made); with
        `FAST = False` it uses the full corpus and the `mini_lm` run from notebook 05.
    """),
    code("""
        from course import check, nb
        from minilm.data import read_meta
        from minilm.sample import load_run

        data_dir = nb.data_dir(FAST)
        run_dir = nb.trained_run(FAST)
        model, tok, ckpt = load_run(run_dir, DEVICE)
        meta = read_meta(data_dir)
        V, T = model.config.vocab_size, model.config.block_size
        n_eval = 6_000 if FAST else 200_000
        val = np.fromfile(data_dir / "val.bin", dtype=meta["dtype"])[:n_eval].astype(np.int64)
        train_ids = np.fromfile(data_dir / "train.bin", dtype=meta["dtype"]).astype(np.int64)
        val_bytes = len(tok.decode(val.tolist()).encode("utf-8"))
        print(f"model: {model.num_params():,} parameters, vocab {V}, context {T}")
        print(f"scoring {len(val):,} validation tokens = {val_bytes:,} bytes of text")
    """),
    md(r"""
        ## 2. Perplexity

        A language model gives every next token a probability. The mean negative log-likelihood of the true next
        tokens, $\text{NLL} = -\frac{1}{N}\sum_i \log p(x_i \mid x_{<i})$, is the training loss; perplexity is
        $e^{\text{NLL}}$: the number of equally likely choices the model is, on average, hesitating between. A model
        that knows nothing (uniform logits) has perplexity exactly equal to the vocabulary size.
    """),
    code("""
        from metrics.perplexity import perplexity

        def model_fn(ids):
            with torch.no_grad():
                return model(ids.to(DEVICE))[0].float().cpu()

        uniform = lambda ids: torch.zeros(ids.shape[0], ids.shape[1], V)
        print(f"uniform model: perplexity {perplexity(uniform, val, window=T).perplexity:.1f} (vocab size {V})")
        r = perplexity(model_fn, val, window=T, byte_count=val_bytes)
        print(f"our model, non-overlapping windows: perplexity {r.perplexity:.2f}, {r.bits_per_byte:.3f} bits/byte")
    """),
    md("""
        The model reads at most `block_size` tokens. With **non-overlapping windows** the first tokens of every window
        are predicted from almost no context. A **sliding window** moves by a `stride` smaller than the window and
        scores only the tokens no earlier window scored, so every scored token sees at least `window - stride`
        tokens of context. It costs `window / stride` times more compute. Watch perplexity fall as the stride
        shrinks:
    """),
    code("""
        import time

        strides = [T, T // 2, T // 4] if FAST else [T, T // 2, T // 4, T // 8]
        ppl, secs = [], []
        for s in strides:
            t0 = time.perf_counter()
            ppl.append(perplexity(model_fn, val, window=T, stride=s, batch_size=8).perplexity)
            secs.append(time.perf_counter() - t0)
            print(f"stride {s:4d}: perplexity {ppl[-1]:8.3f}  ({secs[-1]:.2f} s)")

        fig, ax = plt.subplots(1, 2, figsize=(9, 3))
        ax[0].plot(strides, ppl, "o-"); ax[0].set_xlabel("stride"); ax[0].set_ylabel("perplexity")
        ax[0].invert_xaxis(); ax[0].set_title("more context per token -> lower perplexity")
        ax[1].plot(strides, secs, "o-", color="C1"); ax[1].set_xlabel("stride"); ax[1].set_ylabel("seconds")
        ax[1].invert_xaxis(); ax[1].set_title("... at window/stride times the cost")
        show()
    """),
    md("""
        **Baselines.** Perplexity alone says little: is 40 good? Compare with models that only count. A unigram model
        predicts each token by its frequency; a bigram model by its frequency after the previous token (add-k
        smoothed). A transformer must beat both, or it has learned nothing about context.

        **Bits per byte** divides the total NLL (in bits) by the bytes of text: unlike perplexity it does not depend
        on the tokenizer, so two runs with different vocabularies compare.
    """),
    code("""
        from metrics.baselines import bigram_perplexity, unigram_perplexity

        results = {
            "uniform": perplexity(uniform, val, window=T, byte_count=val_bytes),
            "unigram": unigram_perplexity(train_ids, val, V, k=1.0, byte_count=val_bytes),
            "bigram": bigram_perplexity(train_ids, val, V, k=0.01, byte_count=val_bytes),
            "our GPT": perplexity(model_fn, val, window=T, stride=T // 2, byte_count=val_bytes),
        }
        for name, res in results.items():
            print(f"{name:>8}: perplexity {res.perplexity:9.2f}   bits/byte {res.bits_per_byte:.3f}")
        plt.figure(figsize=(5, 3))
        plt.bar(list(results), [res.bits_per_byte for res in results.values()], color=["grey", "C0", "C1", "C2"])
        plt.ylabel("bits per byte (lower is better)"); show()
        verdict = "beats" if results["our GPT"].nll < results["bigram"].nll else "does not yet beat"
        print(f"the GPT {verdict} the bigram baseline")
    """),
    md("""
        In `FAST` mode the GPT has trained for half a minute on a small corpus: it has only started to use its
        context (note how little the stride changed above) and sits near the bigram baseline. That is what an
        undertrained model looks like; the `mini_lm` run (`FAST = False`, notebook 05) should be far below both
        baselines (expected, not measured here).
    """),
    md("""
        ### Exercise 1 — sliding-window perplexity

        Write `my_perplexity(model_fn, token_ids, window, stride)` returning the perplexity of the stream:
        windows start at `0, stride, 2*stride, ...`, each feeds `ids[b : b+window]` and predicts the next token
        at each position, scores only targets no earlier window scored, and the last window is the one that scores
        the final token. Sum the NLLs and count the tokens over all windows, divide once at the end.
        `help(check.perplexity)` has the full contract.

        The cell ships calling the package's version so the notebook runs as committed: **replace the body with
        your own code**, then run the check.
    """),
    code("""
        # YOUR CODE: replace the body below with your own implementation (it calls the reference until you do).
        def my_perplexity(model_fn, token_ids, window, stride):
            return perplexity(model_fn, token_ids, window, stride).perplexity
    """),
    code("""
        assert check.perplexity(my_perplexity)
    """),
    md("""
        ## 3. BLEU

        BLEU compares a system's output with reference texts by n-gram overlap: for n = 1..4, the fraction of the
        hypothesis' n-grams found in a reference (each reference n-gram can be matched at most as often as it occurs
        there: *clipping*), combined by a geometric mean and multiplied by a **brevity penalty**
        `exp(1 - ref_len / sys_len)` when the output is shorter than the references.

        **Corpus BLEU sums the counts over all segments and scores once**; it is not the mean of sentence BLEUs.
        `metrics.bleu` follows `sacrebleu` to the last digit, tokenizer included:
    """),
    code("""
        import sacrebleu

        from metrics.bleu import corpus_bleu, sentence_bleu

        hyps = ["def add(a, b): return a + b", "the loss is falling slowly", "import numpy as np"]
        refs = [["def add(x, y): return x + y", "the training loss falls slowly", "import numpy as np"]]
        ours, theirs = corpus_bleu(hyps, refs), sacrebleu.corpus_bleu(hyps, refs)
        print("ours:     ", ours)
        print("sacrebleu:", theirs)
        print("signature:", ours.signature)
        mean_sentence = np.mean([sentence_bleu(h, [r[i] for r in refs]).score for i, h in enumerate(hyps)])
        print(f"corpus BLEU {ours.score:.2f} vs mean of sentence BLEUs {mean_sentence:.2f}: not the same quantity")
    """),
    code("""
        ratio = np.linspace(0.3, 1.5, 200)  # sys_len / ref_len
        plt.figure(figsize=(5, 3))
        plt.plot(ratio, np.where(ratio >= 1, 1.0, np.exp(1 - 1 / ratio)))
        plt.xlabel("hypothesis length / reference length"); plt.ylabel("brevity penalty")
        plt.title("short outputs are penalised; long ones pay in precision"); show()
    """),
    md("""
        ### Exercise 2 — corpus BLEU

        Write `my_bleu(hypotheses, references)`: the corpus BLEU (0–100) with no smoothing, n-grams up to 4, one or
        more reference streams (`references[k][i]` is the k-th reference of segment `i`). The check's texts are
        lowercase words separated by spaces, so `str.split()` tokenizes them. Per segment, `ref_len` is the
        reference length closest to the hypothesis length (ties: the shorter).
    """),
    code("""
        # YOUR CODE: replace the body below with your own implementation (it calls the reference until you do).
        def my_bleu(hypotheses, references):
            return corpus_bleu(hypotheses, references, smooth_method="none").score
    """),
    code("""
        assert check.bleu(my_bleu)
    """),
    md("""
        ## 4. ROUGE

        ROUGE is recall-oriented and came from summarisation. ROUGE-N counts clipped n-gram matches and reports
        precision, recall and F; ROUGE-L uses the **longest common subsequence** (words in order, gaps allowed).
        `metrics.rouge` reproduces Google's `rouge-score` exactly (tokenizer, Porter stemming, ROUGE-Lsum):
    """),
    code("""
        from rouge_score import rouge_scorer

        from metrics.rouge import rouge_scores

        pred = "the model learns to predict the next token"
        ref = "a language model is trained to predict the next token"
        ours = rouge_scores([pred], [ref], ["rouge1", "rouge2", "rougeL"], use_stemmer=True)[0]
        theirs = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, pred)
        for k in ours:
            print(f"{k:7s} ours F={ours[k].fmeasure:.6f}   rouge-score F={theirs[k].fmeasure:.6f}")
    """),
    md("""
        ### Exercise 3 — ROUGE-1, ROUGE-2, ROUGE-L

        Write `my_rouge(prediction, reference)` returning `{"rouge1": F, "rouge2": F, "rougeL": F}` (F-measures;
        lowercase words separated by spaces; no stemming). Precision divides by the prediction's n-grams, recall by
        the reference's; F = 2PR / (P + R), or 0 when both are 0.
    """),
    code("""
        from metrics.rouge import rouge_pair

        # YOUR CODE: replace the body below with your own implementation (it calls the reference until you do).
        def my_rouge(prediction, reference):
            return rouge_pair(prediction, reference, ["rouge1", "rouge2", "rougeL"])
    """),
    code("""
        assert check.rouge(my_rouge)
    """),
    md("""
        ## 5. Generation metrics

        Overlap with a reference is not the whole story for open-ended text. Samples should be **diverse**
        (distinct-n: the share of unique n-grams; self-BLEU: how similar the samples are to each other) and should
        not **loop** (repetition rate: the share of n-grams repeating an earlier one in the same text). Temperature
        trades one against the other; greedy decoding loops most:
    """),
    code("""
        from metrics.generation import distinct_n, repetition_rate, self_bleu

        prompt = torch.tensor([tok.encode("def ").ids], device=DEVICE)
        temps = [0.0, 0.5, 0.8, 1.0, 1.3]
        rows = []
        for t in temps:  # 6 continuations per temperature, generated as one batch
            batch = model.generate(prompt.repeat(6, 1), 40, temperature=t, top_k=None, seed=SEED)
            outs = [row[prompt.size(1):].tolist() for row in batch]
            texts = [tok.decode(o) for o in outs]
            rows.append((distinct_n(outs, 2), repetition_rate(outs, 4), self_bleu(texts)))
            print(f"T={t}: distinct-2 {rows[-1][0]:.3f}  repetition-4 {rows[-1][1]:.3f}  self-BLEU {rows[-1][2]:.1f}")
        fig, ax = plt.subplots(1, 3, figsize=(10, 2.8))
        for i, name in enumerate(["distinct-2 (higher: diverse)", "repetition-4 (lower: no loops)", "self-BLEU"]):
            ax[i].plot(temps, [r[i] for r in rows], "o-"); ax[i].set_xlabel("temperature"); ax[i].set_title(name)
        show()
        print("a sample at T=0.8:", repr(tok.decode(model.generate(prompt, 40, 0.8, seed=SEED)[0].tolist())))
    """),
    md("""
        ## What you should take away

        - Perplexity depends on the context each token gets (the stride) and on the tokenizer; report both, or
          use bits per byte.
        - A model is only as good as its margin over counting baselines.
        - Corpus BLEU is not a mean of sentence scores; the tokenizer and smoothing are part of the number
          (that is what sacrebleu's signature records).
        - For generated text, measure diversity and repetition as well as overlap.

        Next: [04_efficient_training.ipynb](04_efficient_training.ipynb).
    """),
]


# ============================================================================ week 17 / 04 efficient training

EFFICIENT = header("week17/04_efficient_training.ipynb", "Week 17 · 04 — Making training fit and go fast", """
    Mixed precision with loss scaling, activation checkpointing, gradient accumulation and data-parallel training:
    each built by hand in `efficient_training/`, proven equal to PyTorch's own, and measured. Days 6 and 7 of the
    course ([week17.md](../../course/week17.md)).
""") + [
    md("""
        ## 1. Why half precision needs a loss scale

        float16 has 5 exponent bits: nothing below ~6e-8 survives, and many gradients of a language model are that
        small. bfloat16 keeps float32's exponent range (so it needs no scaling) but only 8 bits of mantissa.
    """),
    code("""
        for v in [1e-3, 1e-5, 1e-7, 1e-8, 1e-9]:
            t = torch.tensor(v)
            print(f"{v:8.0e}  float16 -> {t.half().item():.3e}   bfloat16 -> {t.bfloat16().item():.3e}")
        print("float16 max:", torch.finfo(torch.float16).max, "  bfloat16 max:", torch.finfo(torch.bfloat16).max)
    """),
    md("""
        Multiplying the loss by a scale S multiplies every gradient by S (backward is linear), lifting the small
        ones into range; dividing by S before the optimizer step restores them. If S is so large that a gradient
        overflows to inf/NaN, the step is **skipped** and S is halved; after `growth_interval` clean steps S doubles.
        `efficient_training.amp.LossScaler` does this by hand. Here it trains a small model next to
        `torch.amp.GradScaler`, with overflows injected at steps 2, 3 and 7 and a NaN at step 9:
    """),
    code("""
        from course import check
        from efficient_training.amp import LossScaler, compare_with_grad_scaler

        r = compare_with_grad_scaler(LossScaler, init_scale=2.0**10, growth_interval=3)
        print("same scale sequence:", r["same_scales"], "| same skipped steps:", r["same_skips"],
              "| max parameter difference:", r["max_param_diff"])
        plt.figure(figsize=(6, 3))
        plt.step(range(len(r["torch"]["scales"])), r["torch"]["scales"], where="post", label="torch GradScaler", lw=3)
        plt.step(range(len(r["ours"]["scales"])), r["ours"]["scales"], where="post", label="our LossScaler", ls="--")
        for i, s in enumerate(r["ours"]["skipped"]):
            if s:
                plt.axvline(i, color="red", alpha=0.2)
        plt.yscale("log", base=2); plt.xlabel("step (red: skipped)"); plt.ylabel("loss scale"); plt.legend()
        show()
    """),
    md("""
        ### Exercise 1 — a dynamic loss scaler

        Write `MyScaler(init_scale, growth_factor, backoff_factor, growth_interval)` with GradScaler's interface:
        `scale(loss)`, `unscale_(optimizer)` (divide every gradient by the scale once, and note whether any is
        inf/NaN), `step(optimizer)` (unscale if not done, skip on inf/NaN), `update()` (back off or grow) and
        `get_scale()`. The check trains with your scaler and with `torch.amp.GradScaler` under injected overflows
        and compares the scale before each step, the skipped steps and the final weights.
    """),
    code("""
        # YOUR CODE: write your own class (the line below uses the reference until you do).
        MyScaler = LossScaler
    """),
    code("""
        assert check.loss_scaler(MyScaler, trials=2)
    """),
    md("""
        On a CPU the practical mixed precision is **bfloat16 autocast**: matmuls run in bf16, reductions and the loss
        stay in float32, and no loss scale is needed. Whether it is faster depends on the CPU (AVX-512 BF16 / AMX);
        measure rather than assume:
    """),
    code("""
        import time

        from minilm.config import ModelConfig
        from minilm.model import GPT

        cfg = ModelConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=4, n_embd=128)
        x = torch.randint(0, cfg.vocab_size, (8, cfg.block_size))

        def step_time(dtype, n=3):
            torch.manual_seed(SEED)
            m = GPT(cfg)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            times = []
            for _ in range(n + 1):  # the first step warms up
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    _, loss = m(x, x)
                loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
            return sorted(times[1:])[len(times[1:]) // 2], loss.item()

        for dt in (torch.float32, torch.bfloat16):
            s, loss = step_time(dt)
            print(f"{str(dt):15s} {s * 1000:7.1f} ms/step   loss {loss:.4f}")
    """),
    md("""
        ## 2. Activation checkpointing

        Backward needs the activations of the forward pass; for a transformer they dominate memory and grow with
        batch × sequence × layers × width. Checkpointing keeps only each block's *input* and recomputes the
        block's activations during backward: about one extra forward pass of compute for a large cut in memory.
        `efficient_training.checkpointing` implements it as a `torch.autograd.Function` (restoring the RNG state so
        dropout makes the same choices twice). The gradients are the same; the saved activations are not:
    """),
    code("""
        from efficient_training.checkpointing import activation_memory, apply_checkpointing

        import copy

        torch.manual_seed(SEED)
        plain = GPT(ModelConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.1))
        ckpt = apply_checkpointing(copy.deepcopy(plain))  # the same weights, every block checkpointed
        idx = torch.randint(0, 2048, (4, 128))
        grads = []
        for m in (plain, ckpt):
            m.train(); m.zero_grad(); torch.manual_seed(1)
            m(idx, idx)[1].backward()
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        print("max gradient difference, dropout on:", (grads[0] - grads[1]).abs().max().item())

        depths, mem_plain, mem_ck = [2, 4, 8], [], []
        for L in depths:
            c = ModelConfig(vocab_size=2048, block_size=128, n_layer=L, n_head=4, n_embd=128)
            mem_plain.append(activation_memory(GPT(c), idx, idx) / 2**20)
            mem_ck.append(activation_memory(apply_checkpointing(GPT(c)), idx, idx) / 2**20)
        plt.figure(figsize=(5, 3))
        plt.plot(depths, mem_plain, "o-", label="plain"); plt.plot(depths, mem_ck, "o-", label="checkpointed")
        plt.xlabel("layers"); plt.ylabel("saved activations (MiB)"); plt.legend(); show()
    """),
    md("""
        ## 3. Gradient accumulation

        A batch too big for memory can be processed as k micro-batches whose gradients add up in `.grad` before one
        optimizer step. The trap: the big batch's loss is the mean over **all its tokens**, so each micro-batch's
        summed loss must be divided by the total token count. The common `loss / k` is only right when every
        micro-batch has the same number of target tokens (no padding, no ignored positions):
    """),
    code("""
        from efficient_training.accumulation import accumulate_gradients, concat_micro_batches

        torch.manual_seed(SEED)
        m = GPT(ModelConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64))
        micro = []
        for i in range(4):
            xb = torch.randint(0, 256, (2, 32)); yb = torch.randint(0, 256, (2, 32))
            yb[:, : 8 * i] = -1  # ignored targets: micro-batches hold different numbers of tokens
            micro.append((xb, yb))

        def grad_of(fn):
            m.zero_grad(); fn(); return torch.cat([p.grad.flatten() for p in m.parameters()])

        xb, yb = concat_micro_batches(micro)
        big = grad_of(lambda: m(xb, yb)[1].backward())
        for norm in ("tokens", "micro_batches", "none"):
            g = grad_of(lambda: accumulate_gradients(m, micro, normalize=norm))
            print(f"normalize={norm:14s} max |difference from the big batch| = {(g - big).abs().max().item():.2e}")
    """),
    md("""
        ## 4. Data parallelism (DDP)

        Each process holds a full copy of the model and a shard of the batch; after backward the gradients are
        averaged across processes with an all-reduce (fired from per-parameter hooks, in buckets, overlapping the
        rest of backward), so every copy takes the same step. `efficient_training.ddp.DDP` does this by hand. The
        proof below spawns 2 CPU processes (gloo backend) and compares their parameters after a few steps with
        single-process training on the whole batch:
    """),
    code("""
        from efficient_training.ddp import spawn_proof

        proof = spawn_proof(world_size=2, steps=2, global_batch=4)
        ref, ranks = proof["reference"], proof["ranks"]
        for label, key, ref_key in [("our DDP", "ours", "sgd"), ("torch DistributedDataParallel", "torch_ddp", "sgd"),
                                    ("our DDP + accumulation", "accumulation", "sgd_ignore"),
                                    ("bug: gradients summed, not averaged", "no_average", "sgd"),
                                    ("bug: no initial broadcast", "no_broadcast", "sgd")]:
            diff = max((ranks[r][key][name] - value).abs().max().item()
                       for r in range(2) for name, value in ref[ref_key].items())
            print(f"{label:36s} max |rank's parameters - one process on the whole batch| = {diff:.2e}")
        print("all-reduce calls per step:", ranks[0]["allreduce_per_step"], "in", ranks[0]["n_buckets"], "buckets")
    """),
    md("""
        On a GPU cluster the same code runs under `torchrun`: `torchrun --standalone --nproc_per_node 4 -m
        minilm.train --preset mini_lm` (PyTorch's DistributedDataParallel there; ours is for understanding).

        ## 5. The benchmark

        `python -m efficient_training.bench` times every technique alone and combined on this device and writes a
        markdown table and a plot to `efficient_training/bench_results/`. On a 2-core CPU it takes a few minutes, so
        the notebook shows the saved results when they exist (run the command to refresh them):
    """),
    code("""
        from IPython.display import Image, Markdown, display

        results = ROOT / "efficient_training" / "bench_results"
        tables = sorted(results.glob("*.md")) if results.is_dir() else []
        if tables:
            for t in tables:
                display(Markdown(t.read_text()))
            for png in sorted(results.glob("*.png")):
                display(Image(filename=str(png)))
        else:
            print("no saved benchmark yet: run `python -m efficient_training.bench` from", ROOT)
        if not FAST:  # the full benchmark, on this machine (minutes on a GPU)
            subprocess.run([sys.executable, "-m", "efficient_training.bench", "--preset", "mini_lm"], cwd=ROOT)
    """),
    md("""
        **Task 3** ([course/README.md](../../course/README.md)): choose your week-18 configuration from these numbers
        (batch size, accumulation, dtype, checkpointing) and write down the throughput you expect. GPU figures in
        the course text are expectations until you measure them.

        Next week: [05_training.ipynb](../week18/05_training.ipynb).
    """),
]


# ============================================================================ week 18 / 05 training

TRAINING = header("week18/05_training.ipynb", "Week 18 · 05 — Training the mini LM", """
    The model in `minilm/model.py`, its configs, a training run with learning curves (matplotlib and TensorBoard),
    and resuming. With `FAST = True` a tiny model trains for 500 steps on a subset of the built-in corpus;
    with `FAST = False` this notebook trains the course project, the `mini_lm` preset (48M parameters), on a GPU.
    Days 8–11 of the course ([week18.md](../../course/week18.md)).
""") + [
    md("""
        ## 1. The presets

        Three configurations share one code path. Parameter count (embeddings tied with the output layer, counted
        once) and training FLOPs per token (6N + 12·L·C·T, the PaLM appendix formula) for each:
    """),
    code("""
        import math

        from course import check, nb
        from minilm.config import PRESETS
        from minilm.model import GPT

        print(f"{'preset':8s} {'params':>12s} {'layers':>6s} {'width':>6s} {'context':>7s} {'GFLOP/token':>12s}")
        for name, cfg in PRESETS.items():
            with torch.device("meta"):  # shapes only: no memory, no time
                m = GPT(cfg.model)
            print(f"{name:8s} {m.num_params():12,d} {cfg.model.n_layer:6d} {cfg.model.n_embd:6d} "
                  f"{cfg.model.block_size:7d} {m.flops_per_token() / 1e9:12.3f}")
    """),
    md("""
        At initialisation every token should be about equally likely, so the loss should be close to ln(vocab_size).
        A much larger value means a bad initialisation (this model uses GPT-2's: normal(0, 0.02), residual
        projections scaled by 1/sqrt(2·n_layer)):
    """),
    code("""
        from minilm.config import ModelConfig

        cfg0 = ModelConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=2, n_embd=64)
        m0 = GPT(cfg0)
        x, y = torch.randint(0, cfg0.vocab_size, (2, 8, 64))
        print(f"loss at init {m0(x, y)[1].item():.3f}   ln(vocab) = {math.log(cfg0.vocab_size):.3f}")
    """),
    md(r"""
        ## 2. Attention, by hand

        Each head projects the input to queries, keys and values, scores every earlier position with
        $\mathrm{softmax}(QK^\top/\sqrt{d})$ (later positions masked out: the model must not see the future), and
        mixes the values. `minilm` calls PyTorch's fused `scaled_dot_product_attention`.

        ### Exercise 1 — causal scaled dot-product attention

        Write `my_attention(q, k, v)` for tensors of shape (batch, heads, T, head_dim) without calling
        `scaled_dot_product_attention`.
    """),
    code("""
        import torch.nn.functional as F

        # YOUR CODE: replace the body below with your own implementation (it calls the reference until you do).
        def my_attention(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    """),
    code("""
        assert check.attention(my_attention)
    """),
    md("""
        ### Exercise 2 — the whole attention layer

        Write `my_causal_self_attention(x, attn)` for `x` of shape (B, T, n_embd), using a `minilm` layer's weights:
        `attn.c_attn` (one linear layer producing q, k, v side by side), split into `attn.n_head` heads, attention,
        heads merged back, then `attn.c_proj`. The check compares with the layer itself.
    """),
    code("""
        # YOUR CODE: replace the body below with your own implementation (it calls the reference until you do).
        def my_causal_self_attention(x, attn):
            return attn(x)
    """),
    code("""
        assert check.causal_self_attention(my_causal_self_attention)
    """),
    md("""
        ## 3. A training run

        `minilm.train.train(cfg)` is the same loop as `python -m minilm.train`: AdamW with warm-up and cosine decay,
        gradient clipping, periodic evaluation on the validation split, a sample at each evaluation, atomic
        checkpoints (`ckpt.pt`, `ckpt_best.pt`), `metrics.jsonl` and TensorBoard logs. The config (any field can be
        overridden, as on the command line):
    """),
    code("""
        from minilm.config import get_preset

        data_dir = nb.data_dir(FAST)
        cfg = nb.run_config(FAST, data_dir)
        print(f"data: {data_dir}")
        print(f"model: {cfg.model}")
        print(f"train: max_iters={cfg.train.max_iters} batch_size={cfg.train.batch_size} lr={cfg.train.lr} "
              f"out_dir={cfg.train.out_dir}")
        base = get_preset(cfg.train.preset).to_dict()
        changed = {k: v for part in ("model", "train") for k, v in cfg.to_dict()[part].items() if base[part][k] != v}
        print(f"the same from a shell: python -m minilm.train --preset={cfg.train.preset} "
              + " ".join(f"--{k}={v}" for k, v in changed.items()))
    """),
    code("""
        import shutil

        from minilm.train import train

        run_dir = Path(cfg.train.out_dir)
        if FAST and run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run, so the resume below starts from this one
        final = train(cfg)
        print({k: v for k, v in final.items() if k != "sample"})
    """),
    md("""
        ## 4. Learning curves

        `metrics.jsonl` holds one JSON line per logged step (training loss, learning rate, tokens/s) and per
        evaluation (train and validation loss). Validation loss still falling: train longer. Flat from the start:
        learning rate or data. Rising while training loss falls: overfitting.
    """),
    code("""
        import json

        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if r.get("loss") is not None]
        evals = [r for r in rows if r.get("val_loss") is not None]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3))
        ax[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train (per step)", alpha=0.6)
        ax[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
        ax[0].axhline(math.log(cfg.model.vocab_size), color="grey", ls=":", label="ln(vocab): uniform guess")
        ax[0].set_xlabel("step"); ax[0].set_ylabel("loss"); ax[0].legend()
        lr_rows = [r for r in rows if r.get("lr") is not None]
        ax[1].plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows]); ax[1].set_title("learning rate")
        ax[1].set_xlabel("step"); show()
        print("keys logged:", sorted({k for r in rows for k in r}))
    """),
    md("""
        **TensorBoard** shows the same curves live while a run trains. In JupyterLab or Colab:

        ```
        %load_ext tensorboard
        %tensorboard --logdir ../../out
        ```

        or from a shell: `tensorboard --logdir out/` and open http://127.0.0.1:6006. (Not run here, so the notebook
        finishes on its own in CI.)

        ## 5. Resuming

        A checkpoint holds the model, the optimizer, the step, the RNG states and the data sampler's position, so a
        resumed run continues exactly where it stopped (after a Colab disconnect, say). Train 20 more steps:
    """),
    code("""
        from minilm.checkpoint import load_checkpoint
        from minilm.config import apply_overrides

        # Resume a copy, so the finished run stays as it is for notebooks 06 and 07.
        resumed_dir = run_dir.with_name(run_dir.name + "-resumed")
        shutil.rmtree(resumed_dir, ignore_errors=True)
        shutil.copytree(run_dir, resumed_dir)
        before = load_checkpoint(resumed_dir)["step"]
        more = apply_overrides(nb.run_config(FAST, data_dir, out_dir=str(resumed_dir)),
                               {"resume": True, "max_iters": before + 20, "lr_decay_iters": before + 20})
        resumed = train(more)
        print(f"step {before} -> {load_checkpoint(resumed_dir)['step']}; val loss {resumed['val_loss']:.4f}")
    """),
    md("""
        ## 6. Throughput and MFU

        Model FLOPs utilisation = achieved training FLOP/s / the device's peak. On a CPU there is no published peak,
        so it says so; on a GPU it is the number to watch (40% is good for a model this size).
    """),
    code("""
        tok_s = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
        model = GPT(cfg.model)
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        if tok_s:
            mfu, msg = model.estimate_mfu(float(np.median(tok_s)), name, "bfloat16")
            print(f"median {np.median(tok_s):,.0f} tokens/s; {msg}")
        with torch.device("meta"):
            big = GPT(PRESETS["mini_lm"].model)
        print("mini_lm, if an A100 trained it at 150k tokens/s:",
              big.estimate_mfu(150_000, "NVIDIA A100-SXM4-40GB", "bfloat16")[1])
    """),
    md("""
        **Task 4** ([course/README.md](../../course/README.md)): set `FAST = False` on a GPU to train `mini_lm`
        (2–4 h on a T4, expected), or run `python -m minilm.train --preset mini_lm`; then
        `python -m course status --out_dir out/mini_lm`.

        Next: [06_evaluation.ipynb](06_evaluation.ipynb).
    """),
]


# ============================================================================ week 18 / 06 evaluation

EVALUATION = header("week18/06_evaluation.ipynb", "Week 18 · 06 — Evaluating the model", """
    `minilm.evaluate` turns a run into a report: validation perplexity (sliding window) and bits per byte, the
    counting baselines, a continuation task scored with BLEU and ROUGE, generation metrics and generation speed.
    Day 12 of the course ([week18.md](../../course/week18.md)).
""") + [
    code("""
        from course import nb
        from minilm.evaluate import evaluate

        run_dir = nb.trained_run(FAST)  # the run from notebook 05 (trained now if it is missing)
        kwargs = dict(max_tokens=4_000, num_prompts=6, max_train_tokens=400_000, speed_tokens=32) if FAST else {}
        results = evaluate(run_dir, **kwargs)
        print("wrote", sorted(p.name for p in run_dir.glob("eval*")), f"in {results['seconds']:.0f} s")
        print("sections:", list(results))
    """),
    md("""
        ## 1. Perplexity against the baselines

        The first question is whether the transformer beats counting. Bits per byte makes runs with different
        tokenizers comparable. (In `FAST` mode the model has trained for half a minute: it beats the unigram
        baseline and is near the bigram one; the `mini_lm` run should beat both by a wide margin — expected.)
    """),
    code("""
        ppl, base = results["perplexity"], results["baselines"]
        table = {"unigram (add-k)": base["unigram"], "bigram (add-k)": base["bigram"],
                 "GPT, non-overlapping": ppl["non_overlapping"], "GPT, sliding window": ppl["sliding"]}
        for name, r in table.items():
            print(f"{name:22s} perplexity {r['perplexity']:9.2f}   bits/byte {r['bits_per_byte']:.3f}")
        fig, ax = plt.subplots(1, 2, figsize=(11, 3))
        ax[0].barh(list(table), [r["bits_per_byte"] for r in table.values()], color=["C0", "C1", "C2", "C3"])
        ax[0].set_xlabel("bits per byte (lower is better)")
        ax[1].plot(results["loss_by_position"])
        ax[1].set_xlabel("position in the context window"); ax[1].set_ylabel("mean loss")
        ax[1].set_title("loss by position: falls once the model uses its context")
        show()
    """),
    md("""
        ## 2. The continuation task

        Prompt = the start of a held-out document, reference = what follows. The greedy continuation is scored with
        BLEU and ROUGE (with a bootstrap confidence interval). Absolute numbers are small for open-ended
        continuation — there are many good continuations and only one reference — so compare runs, not to 100.
    """),
    code("""
        c = results["continuation"]
        print(f"{c['prompts']} prompts of {c['prompt_tokens']} tokens, {c['continuation_tokens']} tokens continued")
        print(f"BLEU {c['bleu']:.2f}  precisions {[round(p, 1) for p in c['bleu_precisions']]}  BP {c['bleu_bp']:.3f}")
        for k, v in c["rouge"].items():
            print(f"{k:9s} F {v['f']:.4f}  (95% CI {v['f_low']:.4f} .. {v['f_high']:.4f})")
        for ex in results["examples"][:2]:
            print("\\n--- prompt ---\\n" + ex["prompt"][-200:])
            print("--- reference ---\\n" + ex["reference"][:200])
            print("--- greedy ---\\n" + ex["greedy"][:200])
    """),
    md("""
        ## 3. Generated text: diversity, loops, copying

        The same generation metrics for greedy and sampled continuations, next to the human-written references.
        `copy_rate` is the share of continuations that repeat 16+ training tokens verbatim (memorisation).
    """),
    code("""
        g = results["generation"]
        kinds = [k for k in g if isinstance(g[k], dict)]
        fields = ["distinct_1", "distinct_2", "repetition_4", "self_bleu", "copy_rate"]
        print(f"{'':24s}" + "".join(f"{f:>14s}" for f in fields))
        for k in kinds:
            print(f"{k:24s}" + "".join(f"{g[k][f]:14.3f}" for f in fields))
        sp = results["speed"]
        print(f"\\nspeed: {sp['tokens_per_s']:.0f} tokens/s, first token {sp['time_to_first_token_ms']:.0f} ms, "
              f"{sp['ms_per_token']:.1f} ms/token")
    """),
    md("""
        ## 4. The report

        `eval.md` and its dashboard figure `eval_dashboard.png` put it all on one page:
    """),
    code("""
        from IPython.display import Image, Markdown, display

        png = run_dir / "eval_dashboard.png"
        if png.is_file():
            display(Image(filename=str(png)))
        display(Markdown((run_dir / "eval.md").read_text()[:3000]))
    """),
    md("""
        **Task 5** (first half): run `python -m minilm.evaluate --out_dir out/<your run>` on your project run and
        compare it with the tiny run and the baselines in a table of your own. `python -m course status` then finds
        `eval.json`.

        Next: [07_serving.ipynb](07_serving.ipynb).
    """),
]


# ============================================================================ week 18 / 07 serving

SERVING = header("week18/07_serving.ipynb", "Week 18 · 07 — Sampling and serving", """
    From a checkpoint to text: decoding strategies, the KV cache, the command line, and an HTTP API with
    streaming and latency figures. Day 13 of the course ([week18.md](../../course/week18.md)).
""") + [
    code("""
        import time

        from course import check, nb
        from minilm.sample import eos_of, generate_text, load_run

        run_dir = nb.trained_run(FAST)
        model, tok, ckpt = load_run(run_dir, DEVICE)
        eos = eos_of(tok, ckpt)
        print(f"run {run_dir.name}: step {ckpt['step']}, {model.num_params():,} parameters")
    """),
    md("""
        ## 1. Decoding strategies

        Greedy decoding (temperature 0) always takes the most likely token and tends to loop. Temperature rescales
        the logits (below 1: sharper; above 1: flatter); top-k keeps the k most likely tokens; top-p (nucleus) keeps
        the smallest set whose probability reaches p. Same prompt, same seed:
    """),
    code("""
        prompt = "def "
        for kw in [dict(temperature=0.0), dict(temperature=0.8, top_k=50), dict(temperature=1.0, top_p=0.9),
                   dict(temperature=1.5, top_k=None)]:
            r = generate_text(model, tok, prompt, max_new_tokens=40, seed=SEED, eos_id=eos, **kw)
            print(f"{kw}\\n  {prompt + r['text']!r}\\n")
    """),
    md("""
        How the filters reshape one next-token distribution:
    """),
    code("""
        from minilm.model import sample_next

        ids = torch.tensor([tok.encode(prompt).ids], device=DEVICE)
        with torch.no_grad():
            logits = model(ids)[0][0, -1].float().cpu()
        order = logits.argsort(descending=True)[:30]
        fig, ax = plt.subplots(1, 3, figsize=(11, 2.8), sharey=True)
        for a, (title, t, k, p) in zip(ax, [("T=1", 1.0, None, None), ("T=0.7, top-k=10", 0.7, 10, None),
                                            ("T=1, top-p=0.8", 1.0, None, 0.8)]):
            draws = sample_next(logits.repeat(4000, 1), torch.zeros(4000, 1, dtype=torch.long),
                                torch.ones(4000, 1, dtype=torch.bool), t, k, p, 1.0, torch.Generator().manual_seed(0))
            freq = torch.bincount(draws, minlength=logits.numel()).float() / 4000
            a.bar(range(30), freq[order].numpy()); a.set_title(title); a.set_xlabel("token rank")
        ax[0].set_ylabel("share of 4,000 draws"); show()
    """),
    md("""
        ### Exercise — the filtered distribution

        Write `my_probs(logits, temperature, top_k, top_p)` returning the probabilities a sampler draws from, for
        `logits` of shape (B, vocab): divide by the temperature, keep the `top_k` largest logits (if given), then
        keep the smallest set of most likely tokens whose probability reaches `top_p` (if given; the token that
        crosses the threshold stays), renormalise. The check draws from your distribution and from `minilm`'s
        `sample_next` with the same random numbers: equal distributions pick the same tokens.
    """),
    code("""
        from course.solutions import filtered_probs

        # YOUR CODE: replace the body below with your own implementation (it calls the reference until you do).
        def my_probs(logits, temperature, top_k, top_p):
            return filtered_probs(logits, temperature, top_k, top_p)
    """),
    code("""
        assert check.sampling(my_probs)
    """),
    md("""
        ## 2. The KV cache

        Without a cache every new token recomputes attention over the whole context: the cost of a continuation
        grows with the square of its length. With a cache, each step runs the model on one position and reuses the
        stored keys and values. Same greedy output, different cost:
    """),
    code("""
        start = torch.tensor([tok.encode(prompt).ids], device=DEVICE)
        n_new = min(48, model.config.block_size - start.size(1))
        outs, secs = {}, {}
        for cache in (False, True):
            t0 = time.perf_counter()
            outs[cache] = model.generate(start, n_new, temperature=0.0, use_cache=cache)
            secs[cache] = time.perf_counter() - t0
        print("same tokens:", torch.equal(outs[False], outs[True]))
        print(f"without cache {n_new / secs[False]:.0f} tokens/s, with cache {n_new / secs[True]:.0f} tokens/s "
              f"({secs[False] / secs[True]:.1f}x; the gain grows with context length and model size)")
    """),
    md("""
        ## 3. From the command line
    """),
    code("""
        cmd = [sys.executable, "-m", "minilm.sample", "--out_dir", str(run_dir), "--prompt", "import ",
               "--max_new_tokens", "30", "--temperature", "0.8", "--num_samples", "2"]
        print("$ python", " ".join(cmd[1:]))
        print(subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    """),
    md("""
        ## 4. An HTTP API

        `python -m minilm.serve --out_dir RUN` starts a FastAPI server on 127.0.0.1 (loopback only): `POST
        /v1/generate` (JSON, or server-sent events with `"stream": true`), `GET /health`, `GET /v1/model`,
        `GET /metrics` (Prometheus format) and a playground page at `/`. We start it in a subprocess on a free port,
        call it, stream from it and put it under a little load.
    """),
    code("""
        import socket

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "minilm.serve", "--out_dir", str(run_dir), "--port", str(port),
                                   "--log_level", "warning"], cwd=ROOT)
        for _ in range(300):  # wait up to 60 s for the model to load
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError("the server exited; run the command above in a shell to see why")
            time.sleep(0.2)
        print(httpx.get(url + "/health").json())
        print({k: v for k, v in httpx.get(url + "/v1/model").json().items() if k != "config"})
    """),
    code("""
        body = {"prompt": "def ", "max_new_tokens": 32, "temperature": 0.8, "top_k": 50, "seed": SEED}
        r = httpx.post(url + "/v1/generate", json=body, timeout=60).json()
        print(r)
        same = generate_text(model, tok, "def ", max_new_tokens=32, temperature=0.8, top_k=50, seed=SEED, eos_id=eos)
        print("same text as minilm.sample with the same seed:", r.get("text") == same["text"])
    """),
    code("""
        events = []
        with httpx.stream("POST", url + "/v1/generate", json=body | {"stream": True}, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
        print(f"{len(events)} server-sent events; the first and the last:")
        for line in events[:4] + ["   ..."] + events[-1:]:
            print("  ", line[:160])
        bad = httpx.post(url + "/v1/generate", json=body | {"temperature": -1}, timeout=10)
        print("a bad request gets", bad.status_code, bad.json())
    """),
    md("""
        **Latency under load**: `python -m minilm.serve.loadtest` sends requests from concurrent clients and reports
        latency percentiles and tokens/s (the course's numbers are in the README; `FAST` keeps this one small).
    """),
    code("""
        n_req, conc = (16, 4) if FAST else (200, 8)
        out = subprocess.run([sys.executable, "-m", "minilm.serve.loadtest", "--url", url, "--concurrency", str(conc),
                              "--requests", str(n_req), "--max_new_tokens", "16"],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        print(out.stdout or out.stderr)
        metrics = httpx.get(url + "/metrics").text
        print("\\n".join(line for line in metrics.splitlines() if line and not line.startswith("#"))[:1200])
    """),
    code("""
        server.terminate()
        server.wait(timeout=30)
        print("server stopped, exit code", server.returncode)
    """),
    md("""
        **Task 5** (second half): serve your project run, open the playground at `http://127.0.0.1:8000/`, and record
        p50/p95 latency and tokens/s with the load test. Then `python -m course status` should show all five tasks
        done.
    """),
]


NOTEBOOKS = {
    "week17/01_data_curation.ipynb": CURATION,
    "week17/02_tokenization.ipynb": TOKENIZATION,
    "week17/03_metrics.ipynb": METRICS,
    "week17/04_efficient_training.ipynb": EFFICIENT,
    "week18/05_training.ipynb": TRAINING,
    "week18/06_evaluation.ipynb": EVALUATION,
    "week18/07_serving.ipynb": SERVING,
}


def build(out: Path = HERE) -> list[Path]:
    written = []
    for rel, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "colab": {"provenance": []},
        })
        slug = Path(rel).stem
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{slug}-{i:02d}"  # fixed ids: rebuilding gives byte-identical files
        nbformat.validate(nb)
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".ipynb.tmp")
        nbformat.write(nb, str(tmp))
        os.replace(tmp, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in build():
        print("wrote", p.relative_to(HERE.parent))
