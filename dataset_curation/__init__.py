"""dataset_curation: raw text -> cleaned, filtered, deduplicated documents -> tokenizer -> token shards.

    python -m dataset_curation build --recipe builtin --out data/builtin-8k     # the offline default corpus
    from dataset_curation.pipeline import build                                  # the same from Python

Modules, in pipeline order: sources (built-in corpus, local files, Hub), stages (stats, normalize, PII, split),
filters (Gopher quality and repetition, code rules), dedup (exact, MinHash near-dup, decontamination), minhash
(MinHash + LSH from scratch), shards (tokenizer training, token shards), report, pipeline (build, merge).
bpe is a from-scratch byte-level BPE for teaching; bench compares ours with datasketch and tokenizers.
"""
