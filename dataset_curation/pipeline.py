"""The curation pipeline: source -> normalize -> quality -> PII -> exact dedup -> near dedup -> split ->
decontaminate -> tokenizer -> token shards -> data dir (meta.json, stats.json, report.md, plots/).

    from dataset_curation.pipeline import build
    data_dir = build("builtin", "data/builtin-8k", vocab_size=8192)

Every stage's output is cached under <out>/.cache/ by a hash of its inputs and parameters, so a re-run skips
what has not changed and an interrupted run resumes from the last finished stage. Files appear under their final
names only when complete (temp file + os.replace), and meta.json is written last: a data dir with a meta.json is
whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset_curation import dedup, filters, shards, sources, stages
from dataset_curation.files import atomic_json, atomic_write, load_cache, save_cache
from dataset_curation.stages import StageStats


def _code_version() -> str:
    """A hash of the stage code: editing a stage invalidates the caches it produced."""
    here = Path(__file__).parent
    names = ("sources.py", "licences.py", "stages.py", "filters.py", "minhash.py", "dedup.py", "shards.py",
             "files.py", "pipeline.py")
    return hashlib.sha256(b"".join((here / n).read_bytes() for n in names)).hexdigest()[:12]


VERSION = _code_version()
RECIPES = ("builtin", "installed", "files", "wiki_code")
DEFAULTS = {
    # sources (site_paths: where the installed recipe looks for distributions, default sys.path; hub_wiki and
    # hub_code: [dataset, load_dataset kwargs, text column, licence] in place of the Hub's, e.g. local parquet)
    "include_tests": True, "max_files": None, "include_prose": True, "input": None, "kind": "prose",
    "text_field": "text", "license": "unknown", "site_paths": None, "include_stdlib": True,
    "hub_wiki": None, "hub_code": None,
    # how much text to read for --target_tokens: chars per token, and headroom for what curation removes
    "chars_per_token": 4.0, "read_headroom": 1.5,
    # stages 0-3 run over chunks of about this many characters, each cached when done
    "chunk_chars": 1_000_000,
    # stage 1: normalize
    "max_replacement_fraction": 0.01,
    # stage 5: near dedup (FineWeb's 5-gram shingles and 14 bands x 8 rows)
    "ngram": 5, "num_perm": 112, "bands": 14, "rows": 8, "threshold": 0.7, "seed": 0,
    # stage 7: split
    "val_fraction": 0.02,
    # stage 8: decontamination
    "decontam_ngram": 13, "decontam_min_fraction": 0.1, "eval_files": None,
    # stage 9: tokenizer (trained on a sample of at most this many characters of the training split)
    "min_frequency": 2, "tokenizer_sample_chars": 100_000_000,
}
FILTER_PARAMS = {**filters.GOPHER_QUALITY, **filters.GOPHER_REPETITION, **filters.CODE_QUALITY}


class CurationError(ValueError):
    """The build cannot go on (no input, nothing left, bad parameter); the message says what to change."""


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps([VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cached(cache: Path, name: str, key: str, fn, log, used: set | None = None):
    """fn()'s result, from <cache>/<name>-<key>.npz when a previous run already computed it."""
    path = cache / f"{name}-{key}.npz"
    if used is not None:
        used.add(path)
    if path.is_file():
        log(f"  {name}: cached ({path.name})")
        os.utime(path)
        return load_cache(path)
    result = fn()
    save_cache(path, result)
    return result


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'i/N' -> (i, N), 0 <= i < N."""
    if shard is None or isinstance(shard, tuple):
        return shard
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise CurationError(f"--shard must look like i/N (e.g. 0/4), got {shard!r}") from None
    if not 0 <= i < n:
        raise CurationError(f"--shard {shard}: need 0 <= i < N")
    return i, n


def check_params(params: dict) -> tuple[dict, dict]:
    """(pipeline params with defaults, filter params) from the user's keyword arguments; unknown names raise."""
    unknown = sorted(set(params) - set(DEFAULTS) - set(FILTER_PARAMS))
    if unknown:
        raise CurationError(f"unknown parameter(s) {unknown}; known: {sorted(DEFAULTS)} and the filter "
                            f"thresholds {sorted(FILTER_PARAMS)}")
    p = {**DEFAULTS, **{k: v for k, v in params.items() if k in DEFAULTS}}
    if p["bands"] * p["rows"] > p["num_perm"]:
        raise CurationError(f"bands x rows = {p['bands'] * p['rows']} exceeds num_perm = {p['num_perm']}")
    if not 0 < p["val_fraction"] < 1:
        raise CurationError(f"val_fraction must be in (0, 1), got {p['val_fraction']}")
    return p, {k: v for k, v in params.items() if k in FILTER_PARAMS}


# ---------------------------------------------------------------------------------------------------------------
# Per-document stages, run over chunks of documents in num_proc worker processes

DOC_STAGES = ("licence", "normalize", "quality", "pii")


def _doc_stages(args) -> tuple[list[dict], list[StageStats], list[int], np.ndarray]:
    docs, p, fp = args
    st = [StageStats(name) for name in DOC_STAGES]
    lengths_in = [len(d["text"]) for d in docs]
    out = list(stages.mask_pii(filters.quality_filter(stages.normalize(stages.licence_filter(
        docs, st[0]), st[1], p["max_replacement_fraction"]), st[2], **fp), st[3]))
    sig = dedup.doc_signatures(out, p["ngram"], p["num_perm"], p["seed"])
    return out, st, lengths_in, sig


def _chunked(docs: list[dict], max_chars: int = 1_000_000) -> list[list[dict]]:
    chunks, batch, size = [], [], 0
    for d in docs:
        batch.append(d)
        size += len(d["text"])
        if size >= max_chars:
            chunks.append(batch)
            batch, size = [], 0
    if batch:
        chunks.append(batch)
    return chunks


def run_doc_stages(docs: list[dict], p: dict, fp: dict, num_proc: int = 1, progress: bool = False,
                   cache: Path | None = None, key: str = "", used: set | None = None, log=lambda msg: None):
    """Stages 0-3 (licence, normalize, quality, PII) plus MinHash signatures, in parallel over chunks of documents.
    Returns (kept docs, [4 StageStats], input lengths in chars, signatures of the kept docs).

    With `cache`, each finished chunk is saved as it completes (doc_chunkNNNNN-<key>.npz), so a run killed in the
    middle redoes only the chunks it had not finished."""
    chunks = _chunked(docs, p["chunk_chars"])
    paths = [cache / f"doc_chunk{k:05d}-{_hash(key, k)}.npz" if cache else None for k in range(len(chunks))]
    if used is not None:
        used.update(x for x in paths if x)
    results: list = [None] * len(chunks)
    todo = []
    for k, path in enumerate(paths):
        if path is not None and path.is_file():
            results[k] = load_cache(path)
            os.utime(path)
        else:
            todo.append(k)
    if cache is not None:
        log(f"  doc_stages: cached ({len(chunks) - len(todo)} of {len(chunks)} chunks)" if len(todo) < len(chunks)
            else f"  doc_stages: {len(chunks)} chunks to run")
    bar = tqdm(total=sum(len(chunks[k]) for k in todo), desc="licence+normalize+filter+pii+minhash", unit="doc",
               disable=not progress, leave=False)
    parallel = num_proc > 1 and len(todo) > 1
    jobs = ((chunks[k], p, fp) for k in todo)
    with shards.mp_context().Pool(num_proc) if parallel else contextlib.nullcontext() as pool:
        # imap keeps chunk order, so the output does not depend on num_proc
        for k, result in zip(todo, pool.imap(_doc_stages, jobs) if parallel else map(_doc_stages, jobs)):
            if paths[k] is not None:
                save_cache(paths[k], result)
            results[k] = result
            bar.update(len(chunks[k]))
    bar.close()
    st = [StageStats(name) for name in DOC_STAGES]
    kept, lengths, sigs = [], [], []
    for out, cst, lin, sig in results:
        kept += out
        lengths += lin
        sigs.append(np.asarray(sig, dtype=np.uint32).reshape(-1, p["num_perm"]))
        for a, b in zip(st, cst):
            a.merge(b)
    for s in st:
        s.check()
    sig = np.concatenate(sigs) if sigs else np.empty((0, p["num_perm"]), dtype=np.uint32)
    return kept, st, lengths, sig


# ---------------------------------------------------------------------------------------------------------------
# Sources

def read_source(recipe: str, p: dict, target_tokens: int | None, log, progress: bool = False
                ) -> tuple[list[dict], dict]:
    budget = None if target_tokens is None else int(target_tokens * p["chars_per_token"] * p["read_headroom"])
    if recipe == "builtin":
        docs, manifest = sources.builtin_documents(p["include_tests"], p["max_files"], p["include_prose"])
        for d in docs:
            d["group"] = d["path"]  # a file's code and prose documents land in the same split
    elif recipe == "installed":
        docs, manifest = sources.installed_documents(p["site_paths"], p["include_tests"], p["include_prose"],
                                                     budget, progress, p["include_stdlib"])
    elif recipe == "files":
        if not p["input"]:
            raise CurationError("the files recipe needs --input PATH (a .txt/.jsonl/.parquet file or a folder)")
        docs, manifest = sources.file_documents(p["input"], p["kind"], p["text_field"], p["license"])
    elif recipe == "wiki_code":
        target = target_tokens or 100_000_000
        specs = {k: tuple(p[f"hub_{k}"]) for k in ("wiki", "code") if p[f"hub_{k}"]}
        docs = list(tqdm(sources.hub_documents(target, p["chars_per_token"], seed=p["seed"], **specs),
                         desc="stream", unit="doc", leave=False, disable=not progress))
        manifest = sources.hub_manifest(target, seed=p["seed"], **specs)
    else:
        raise CurationError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")
    if not docs:
        raise CurationError(f"the {recipe} source gave no documents; check --input or use --recipe builtin")
    manifest["documents"] = len(docs)
    manifest["chars"] = sum(len(d["text"]) for d in docs)
    return docs, manifest


def _in_shard(doc: dict, shard: tuple[int, int]) -> bool:
    key = doc.get("group", doc["id"])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % shard[1] == shard[0]


# ---------------------------------------------------------------------------------------------------------------
# Build

def build(recipe: str = "builtin", out: str | Path = "data/builtin-8k", vocab_size: int = 8192, num_proc: int = 2,
          target_tokens: int | None = None, progress: bool = True, shard: str | None = None, **params) -> Path:
    """Build a data dir from a recipe ("builtin", "installed", "files" with input=PATH, "wiki_code"); returns its
    path.

    params: source options (include_tests, max_files, input, kind, text_field, site_paths, hub_wiki, hub_code),
    stage parameters (see DEFAULTS) and filter thresholds (see filters.GOPHER_QUALITY, GOPHER_REPETITION,
    CODE_QUALITY). target_tokens stops reading once about that many tokens' worth of text is in (plus headroom
    for what curation removes) and cuts the train shard there. With shard="i/N" it runs only stages 0-3 on the
    i-th of N hash-partitions of the documents and leaves them for `merge`.
    """
    t0 = time.time()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if target_tokens is not None and target_tokens < 1:
        raise CurationError(f"target_tokens must be a positive number of tokens, got {target_tokens}")
    if num_proc < 1:
        raise CurationError(f"num_proc must be >= 1, got {num_proc}")
    p, fp = check_params(params)
    sh = parse_shard(shard)
    out = Path(out)
    timings: dict[str, float] = {}

    t = time.time()
    docs, manifest = read_source(recipe, p, target_tokens, log, progress)
    cache = out / ".cache"  # created only once the source could be read
    cache.mkdir(parents=True, exist_ok=True)
    timings["read"] = time.time() - t
    log(f"[read] {recipe}: {len(docs):,} documents, {manifest['chars']:,} chars ({timings['read']:.1f}s)")
    if sh is not None:
        docs = [d for d in docs if _in_shard(d, sh)]
        manifest["shard"] = f"{sh[0]}/{sh[1]}"
    src_key = _hash(manifest, recipe, sh)
    doc_key = _hash(src_key, "doc_stages", p["max_replacement_fraction"], fp, p["ngram"], p["num_perm"], p["seed"],
                    p["chunk_chars"])
    used: set[Path] = set()
    t = time.time()
    kept, st, lengths_in, sig = run_doc_stages(docs, p, fp, num_proc, progress, cache, doc_key, used, log)
    del docs  # the kept documents are new dicts: the raw texts can go
    timings["licence+normalize+quality+pii+minhash"] = time.time() - t
    for s in st:
        log(f"[{s.name}] {s.docs_in:,} in, {s.docs_kept:,} kept, removed {s.removed} {s.counters}")
    if sh is not None:
        path = out / "shards" / f"shard-{sh[0]}-of-{sh[1]}.npz"
        path.parent.mkdir(exist_ok=True)
        save_cache(path, {"docs": kept, "stats": st, "lengths_in": lengths_in, "sig": sig, "manifest": manifest,
                          "params": [p, fp], "shard": list(sh)})
        log(f"[shard {sh[0]}/{sh[1]}] wrote {path}; run `python -m dataset_curation merge --out {out} "
            f"--num_shards {sh[1]}` when all {sh[1]} jobs are done")
        return path
    b = _Build(out, cache, used, manifest, doc_key, p, vocab_size, num_proc, target_tokens, progress, log, timings,
               t0, recipe)
    return _curate_and_write(b, kept, st, lengths_in, sig)


def merge(out: str | Path, num_shards: int, vocab_size: int = 8192, num_proc: int = 2,
          target_tokens: int | None = None, progress: bool = True, **params) -> Path:
    """Combine the outputs of `build(..., shard="i/N")` for i = 0..N-1 and run the global stages (dedup across
    shards, split, decontamination, tokenizer, shards); returns the data dir."""
    t0 = time.time()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    p, fp = check_params(params)
    out = Path(out)
    paths = [out / "shards" / f"shard-{i}-of-{num_shards}.npz" for i in range(num_shards)]
    missing = [str(x) for x in paths if not x.is_file()]
    if missing:
        raise CurationError(f"merge needs all {num_shards} shard outputs; missing: {missing}. Run "
                            f"`python -m dataset_curation build ... --shard i/{num_shards}` for each")
    parts = [load_cache(path) for path in paths]
    if any(part["params"] != json.loads(json.dumps([p, fp])) for part in parts):
        raise CurationError("the shard jobs ran with other parameters than this merge; pass the same ones")
    st = [StageStats(name) for name in DOC_STAGES]
    kept, lengths_in, sigs = [], [], []
    for part in parts:
        kept += part["docs"]
        lengths_in += part["lengths_in"]
        sigs.append(part["sig"])
        for a, b in zip(st, part["stats"]):
            a.merge(b)
    manifest = {**parts[0]["manifest"], "shard": f"merged {num_shards}",
                "documents": sum(pt["manifest"]["documents"] for pt in parts)}
    manifest.pop("chars", None)
    cache = out / ".cache"
    cache.mkdir(exist_ok=True)
    key = _hash([pt["manifest"] for pt in parts], "merge", p, fp)
    b = _Build(out, cache, set(), manifest, key, p, vocab_size, num_proc, target_tokens, progress, log, {}, t0,
               manifest.get("recipe", "?"))
    return _curate_and_write(b, kept, st, lengths_in, np.concatenate(sigs))


def tokenizer_sample(docs: list[dict], max_chars: int) -> list[str]:
    """All texts when they fit in max_chars, else a sample: documents in the order of a hash of their id until
    max_chars (so the sample is spread over the corpus and the same on every run), then put back in corpus order."""
    if sum(len(d["text"]) for d in docs) <= max_chars:
        return [d["text"] for d in docs]
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha1(docs[i]["id"].encode()).digest())
    chosen, size = [], 0
    for i in order:
        if size >= max_chars:
            break
        chosen.append(i)
        size += len(docs[i]["text"])
    return [docs[i]["text"] for i in sorted(chosen)]


@dataclass
class _Build:
    """One build's (or merge's) settings and bookkeeping, shared by the global stages (4-10) and the outputs."""

    out: Path
    cache: Path
    used: set
    manifest: dict
    key: str  # each stage's cache key hashes the one before, so changing a stage invalidates every later one
    p: dict
    vocab_size: int
    num_proc: int
    target_tokens: int | None
    progress: bool
    log: Callable
    timings: dict
    t0: float
    recipe: str

    def stage(self, name: str, fn: Callable, *key_parts):
        """fn()'s result, cached under this stage's link of the key chain, and timed."""
        self.key = _hash(self.key, name, *key_parts)
        t = time.time()
        result = _cached(self.cache, name, self.key, fn, self.log, self.used)
        self.timings[name] = time.time() - t
        return result


# Stages 4, 5 and 8 cache the rows they keep and stage 7 the split labels, not the documents: a cache entry stays
# small and the documents are held once.

def _kept_rows(docs: list[dict], keep: list[dict]) -> np.ndarray:
    """The indices in docs of the documents in keep."""
    ids = {id(d) for d in keep}
    return np.array([i for i, d in enumerate(docs) if id(d) in ids], dtype=np.int64)


def _exact_dedup(b: _Build, kept: list[dict], sig: np.ndarray) -> tuple[list[dict], np.ndarray, StageStats]:
    """Stage 4: drop exact duplicates; returns the documents left, their signatures and the stage's stats."""
    def run():
        s = StageStats("exact_dedup")
        return _kept_rows(kept, list(dedup.exact_dedup(
            tqdm(kept, desc="exact dedup", disable=not b.progress, leave=False), s))), s

    rows, s = b.stage("exact_dedup", run)
    s.check()
    return [kept[i] for i in rows.tolist()], sig[rows], s


def _near_dedup(b: _Build, docs: list[dict], sig: np.ndarray) -> tuple[list[dict], StageStats, list]:
    """Stage 5: drop near duplicates by MinHash LSH; returns the documents left, the stats and the clusters."""
    p = b.p

    def run():
        s = StageStats("near_dedup")
        keep, clusters = dedup.near_dedup(docs, s, p["ngram"], p["num_perm"], p["bands"], p["rows"], p["threshold"],
                                          p["seed"], signatures=sig)
        return _kept_rows(docs, keep), s, clusters

    rows, s, clusters = b.stage("near_dedup", run, p["bands"], p["rows"], p["threshold"])
    s.check()
    return [docs[i] for i in rows.tolist()], s, clusters


def _split(b: _Build, docs: list[dict]) -> tuple[list[dict], StageStats]:
    """Stage 7: label each document train or val; returns new dicts with a "split" key."""
    def run():
        s = StageStats("split")
        try:
            return [d["split"] for d in stages.split_train_val(docs, s, b.p["val_fraction"], b.p["seed"])], s
        except ValueError as e:
            raise CurationError(str(e)) from None

    labels, s = b.stage("split", run, b.p["val_fraction"])
    return [{**d, "split": sp} for d, sp in zip(docs, labels)], s


def _decontaminate(b: _Build, docs: list[dict]) -> tuple[list[dict], StageStats]:
    """Stage 8: drop documents that share long n-grams with the eval texts."""
    p = b.p

    def run():
        s = StageStats("decontaminate")
        extra = [Path(f).read_text(encoding="utf-8", errors="replace") for f in (p["eval_files"] or [])]
        keep = dedup.decontaminate(docs, s, extra, p["decontam_ngram"], p["decontam_min_fraction"], b.progress)
        return _kept_rows(docs, keep), s

    rows, s = b.stage("decontaminate", run, p["decontam_ngram"], p["decontam_min_fraction"], p["eval_files"])
    return [docs[i] for i in rows.tolist()], s


def _global_stages(b: _Build, kept: list[dict], st: list[StageStats], sig: np.ndarray
                   ) -> tuple[list[dict], list[StageStats], list]:
    """Stages 4-8 over what stages 0-3 kept; returns the documents left, every stage's stats and the clusters."""
    docs, sig, s_exact = _exact_dedup(b, kept, sig)
    docs, s_near, clusters = _near_dedup(b, docs, sig)
    docs, s_split = _split(b, docs)
    docs, s_decon = _decontaminate(b, docs)
    all_stats = [*st, s_exact, s_near, s_split, s_decon]
    for s in all_stats[len(st):]:
        s.check()
        b.log(f"[{s.name}] {s.docs_in:,} in, {s.docs_kept:,} kept, removed {s.removed} {s.counters}")
    return docs, all_stats, clusters


def _by_split(docs: list[dict]) -> dict[str, list[dict]]:
    """{"train": [...], "val": [...]}; raises when either is empty."""
    by_split = {sp: [d for d in docs if d["split"] == sp] for sp in ("train", "val")}
    for sp, ds in by_split.items():
        if not ds:
            raise CurationError(f"no {sp} documents are left after curation ({len(docs)} in all); add more input "
                                "text or loosen the filters")
    return by_split


def _train_tokenizer(b: _Build, train: list[dict]) -> tuple[str, int]:
    """Stage 9: train (or take from the cache) the tokenizer on the training split only, a sample of it when it is
    large, and write <out>/tokenizer.json; returns (the build key, the characters it was trained on)."""
    p = b.p
    tok_key = _hash(b.key, "tokenizer", b.vocab_size, p["min_frequency"], p["tokenizer_sample_chars"])
    tok_cache = b.cache / f"tokenizer-{tok_key}.json"
    b.used.add(tok_cache)
    t = time.time()
    texts = tokenizer_sample(train, p["tokenizer_sample_chars"])
    tok_chars = sum(map(len, texts))
    if not tok_cache.is_file():
        b.log(f"[tokenizer] training on {len(texts):,} of {len(train):,} train documents ({tok_chars:,} chars)")
        tok = shards.train_tokenizer(texts, b.vocab_size, p["min_frequency"], length=len(texts),
                                     progress=b.progress)
        atomic_write(tok_cache, tok.to_str(pretty=True))
    else:
        b.log(f"  tokenizer: cached ({tok_cache.name})")
        os.utime(tok_cache)
    del texts
    atomic_write(b.out / "tokenizer.json", tok_cache.read_bytes())
    b.timings["tokenizer"] = time.time() - t
    return tok_key, tok_chars


def _load_tokenizer(b: _Build) -> tuple[int, int, str]:
    """(eot_id, vocab size, token dtype) of <out>/tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(b.out / "tokenizer.json"))
    eot_id = tok.token_to_id(shards.EOT)
    n_vocab = tok.get_vocab_size()
    dtype = shards.dtype_for(n_vocab)
    b.log(f"[tokenizer] byte-level BPE, vocab {n_vocab:,} (asked {b.vocab_size:,}), eot_id {eot_id} "
          f"({b.timings['tokenizer']:.1f}s)")
    return eot_id, n_vocab, dtype


def _write_token_files(b: _Build, by_split: dict[str, list[dict]], eot_id: int, dtype: str) -> dict[str, np.ndarray]:
    """Stage 10: tokenize each split into <out>/{train,val}.bin; returns each split's tokens per document.
    target_tokens cuts the train split, and by_split["train"] is cut to the documents written."""
    t = time.time()
    counts = {}
    for sp in ("train", "val"):
        texts = [d["text"] for d in by_split[sp]]
        limit = b.target_tokens if sp == "train" else None
        counts[sp] = shards.write_split(texts, b.out / f"{sp}.bin", b.out / "tokenizer.json", eot_id, dtype,
                                        b.num_proc, b.progress, f"tokenize {sp}", limit)
        if len(counts[sp]) < len(texts):
            by_split[sp] = by_split[sp][: len(counts[sp])]
    b.timings["shards"] = time.time() - t
    return counts


def _short_of_target(b: _Build, tokens: dict[str, int]) -> str | None:
    """Why the train split has fewer tokens than target_tokens, or None when it does not."""
    if b.target_tokens is None or tokens["train"] >= b.target_tokens:
        return None
    m, p = b.manifest, b.p
    if m.get("max_chars") and m.get("files", 0) < sum(r["files"] for r in m.get("distributions", [])):
        return (f"target_tokens={b.target_tokens:,} not reached ({tokens['train']:,} training tokens): reading "
                f"stopped at about {m['max_chars']:,} characters (target x chars_per_token "
                f"{p['chars_per_token']} x read_headroom {p['read_headroom']}); this corpus needs more per "
                "token: raise them with --set chars_per_token=... or --set read_headroom=...")
    return (f"target_tokens={b.target_tokens:,} is larger than the data: the {b.recipe} corpus gives only "
            f"{tokens['train']:,} training tokens after curation; all of it was used")


def _per_source_and_dist(by_split: dict[str, list[dict]], counts: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Documents, tokens and bytes per source and per distribution."""
    per_source: dict[str, dict] = {}
    per_dist: dict[str, dict] = {}
    for sp in ("train", "val"):
        for d, c in zip(by_split[sp], counts[sp].tolist()):
            for table, name in ((per_source, d["source"]), (per_dist, d.get("dist"))):
                if name is None:
                    continue
                row = table.setdefault(name, {"documents": 0, "tokens": 0, "bytes": 0})
                row["documents"] += 1
                row["tokens"] += c
                row["bytes"] += len(d["text"].encode("utf-8", "surrogatepass"))
    return per_source, per_dist


def _stats(b: _Build, all_stats: list[StageStats], clusters: list, by_split: dict[str, list[dict]],
           counts: dict[str, np.ndarray], tokens: dict[str, int], note: str | None, tok_chars: int) -> dict:
    """The content of stats.json."""
    n_bytes = {sp: sum(len(d["text"].encode("utf-8", "surrogatepass")) for d in ds) for sp, ds in by_split.items()}
    per_source, per_dist = _per_source_and_dist(by_split, counts)
    stats = {"stages": [s.to_dict() for s in all_stats],
             "near_duplicate_clusters": {"count": len(clusters), "sizes": sorted(map(len, clusters), reverse=True),
                                         "examples": clusters[:10]},
             "tokens": tokens, "documents": {sp: len(ds) for sp, ds in by_split.items()}, "bytes": n_bytes,
             "bytes_per_token": round(sum(n_bytes.values()) / max(sum(tokens.values()), 1), 4),
             "per_source": per_source, "target_tokens": b.target_tokens, "note": note,
             "tokenizer_trained_on_chars": tok_chars}
    if "distributions" in b.manifest:
        empty = {"documents": 0, "tokens": 0, "bytes": 0}
        stats["distributions"] = [{**row, **{f"{k}_after_curation": v for k, v in
                                             per_dist.get(row["name"], empty).items()}}
                                  for row in b.manifest["distributions"]]
    return stats


def _write_report(b: _Build, stats: dict, lengths_in: list[int], by_split: dict[str, list[dict]],
                  counts: dict[str, np.ndarray]) -> None:
    """report.md and plots/, timed."""
    from dataset_curation import report

    t = time.time()
    report.write_report(b.out, stats, lengths_in, [len(d["text"]) for ds in by_split.values() for d in ds],
                        np.concatenate([counts["train"], counts["val"]]))
    b.timings["report"] = time.time() - t


def _write_timings(b: _Build) -> None:
    """timings.json: each stage's seconds, the total, and CPU time and peak memory where the OS reports them."""
    b.timings["total"] = time.time() - b.t0
    try:
        import resource  # Unix only

        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        b.timings["cpu_seconds_all_processes"] = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        # ru_maxrss is in KiB on Linux: the largest single process, and the largest child
        b.timings["peak_rss_mb_main"] = own.ru_maxrss / 1024
        b.timings["peak_rss_mb_largest_worker"] = kids.ru_maxrss / 1024
    except ImportError:
        pass
    atomic_json(b.out / "timings.json", {k: round(v, 2) for k, v in b.timings.items()})


def _write_meta(b: _Build, stats: dict, n_vocab: int, dtype: str, eot_id: int, tok_key: str) -> None:
    """meta.json, written last: a data dir with one is whole."""
    meta = {"vocab_size": n_vocab, "dtype": dtype, "eot_id": eot_id, "eot_token": shards.EOT,
            "tokenizer": "tokenizer.json", "tokens": stats["tokens"], "documents": stats["documents"],
            "bytes": stats["bytes"],
            "manifest": {**b.manifest, "vocab_size_requested": b.vocab_size, "target_tokens": b.target_tokens,
                         "params": {k: v for k, v in b.p.items() if v is not None}, "build_key": tok_key}}
    atomic_json(b.out / "meta.json", meta)


def _curate_and_write(b: _Build, kept: list[dict], st: list[StageStats], lengths_in: list[int],
                      sig: np.ndarray) -> Path:
    """Stages 4-10 over what stages 0-3 kept (one build's, or all shards' in a merge), then the outputs: stats,
    removed samples, report, timings and meta.json last. Returns the data dir."""
    docs, all_stats, clusters = _global_stages(b, kept, st, sig)
    by_split = _by_split(docs)
    meta_path = b.out / "meta.json"
    if meta_path.exists():
        meta_path.unlink()  # from here on the data dir changes: it is not whole until the new meta.json lands
    tok_key, tok_chars = _train_tokenizer(b, by_split["train"])
    eot_id, n_vocab, dtype = _load_tokenizer(b)
    counts = _write_token_files(b, by_split, eot_id, dtype)
    tokens = {sp: int(c.sum()) for sp, c in counts.items()}
    note = _short_of_target(b, tokens)
    if note:
        warnings.warn(note, stacklevel=2)  # 2: the warning points at build() or merge(), as the caller sees them
        b.log(f"NOTE: {note}")
    stats = _stats(b, all_stats, clusters, by_split, counts, tokens, note, tok_chars)
    atomic_json(b.out / "stats.json", stats)
    atomic_json(b.out / "removed_samples.json", {s.name: s.samples for s in all_stats if s.samples})
    _write_report(b, stats, lengths_in, by_split, counts)
    _write_timings(b)
    _write_meta(b, stats, n_vocab, dtype, eot_id, tok_key)
    _prune_cache(b.cache, b.used)
    b.log(f"[done] {b.out}: {tokens['train']:,} train + {tokens['val']:,} val tokens, "
          f"{stats['bytes_per_token']} bytes/token, {b.timings['total']:.1f}s")
    return b.out


def _prune_cache(cache: Path, used: set) -> None:
    """Drop cache files this run did not use (older parameter sets, temp files of killed runs); this run's own
    stay, so an identical re-run is instant. A merge (used empty) keeps the newest file per stage instead."""
    if used:
        for f in cache.iterdir():
            if f not in used:
                f.unlink(missing_ok=True)
        return
    newest: dict[str, Path] = {}
    for f in sorted(cache.iterdir(), key=lambda f: f.stat().st_mtime):
        if f.name.endswith(".tmp"):
            f.unlink(missing_ok=True)
            continue
        name = f.name.rsplit("-", 1)[0]
        if name in newest:
            newest[name].unlink(missing_ok=True)
        newest[name] = f
