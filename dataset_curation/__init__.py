"""dataset_curation: raw text -> cleaned, filtered, deduplicated documents -> tokenizer -> token shards.

    python -m dataset_curation build --recipe builtin --out data/builtin-8k        # quick: the standard library
    python -m dataset_curation build --recipe installed --out data/installed-32k --vocab_size 32000  # + site-packages
    from dataset_curation.pipeline import build                                     # the same from Python

Modules, in pipeline order: sources (built-in corpus, installed distributions, local files, Hub), licences (which
distributions are permissive, from their metadata), stages (stats, licence, normalize, PII, split), filters (Gopher
quality and repetition, code rules), dedup (exact, MinHash near-dup, decontamination), minhash (MinHash + LSH from
scratch), shards (tokenizer training, token shards), files (atomic writes, pickle-free caches), report, pipeline
(build, merge).
bpe is a from-scratch byte-level BPE for teaching; bench compares ours with datasketch and tokenizers.
"""
