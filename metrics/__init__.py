"""Language-model metrics written from scratch and checked against the tools the field trusts.

    metrics.perplexity  perplexity(model_fn, token_ids, window, stride): sliding-window perplexity, bits per byte
    metrics.bleu        corpus_bleu / sentence_bleu, equal to sacrebleu
    metrics.rouge       rouge_scores / rouge_pair / bootstrap_aggregate, equal to rouge-score
    metrics.chrf        corpus_chrf / sentence_chrf, equal to sacrebleu's chrF
    metrics.bootstrap   percentile-bootstrap intervals for per-example means and corpus scores
    metrics.kneser_ney  interpolated Kneser-Ney n-gram model counted with numpy
    metrics.completion  the code-completion task (decontaminated), stop rules, edit similarity, per-example scores
    metrics.generation  distinct-n, repetition, self-BLEU, verbatim copies of training data
    metrics.baselines   unigram / bigram add-k language models
    python -m metrics.bench   speed and agreement against sacrebleu and rouge-score

This package never imports minilm: any model that maps token ids to logits can be measured.
"""
