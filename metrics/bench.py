"""Speed and agreement of our BLEU and ROUGE against sacrebleu and rouge-score, in one run.

    python -m metrics.bench                      # 10,000 BLEU segments, 2,000 ROUGE pairs
    python -m metrics.bench --bleu_segments 2000 --rouge_pairs 500

Inputs are synthetic but text-like (Zipf-distributed words, casing, numbers, punctuation, several sentences
per ROUGE text), generated from a fixed seed. Each side runs once, from a cold start: our stemming cache is
emptied first, and sacrebleu builds a fresh tokenizer cache per call.
"""

from __future__ import annotations

import argparse
import random
import time

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will more can who said "
         "model models training trained language network networks running runs ran connection connected "
         "generalization evaluation evaluated data tokens token perplexity quickly happily studies studying "
         "Paris London Monday U.S. e.g. café naïve").split()


def synthetic_text(rng: random.Random, n_words: int, sentences: int = 1) -> str:
    """A few sentences of Zipf-ish words with capitals, numbers and punctuation."""
    out = []
    for _ in range(sentences):
        words = []
        for _ in range(max(1, n_words // sentences)):
            r = rng.random()
            if r < 0.05:
                words.append(str(rng.randint(0, 2000)) + rng.choice(["", ".5", ",000", "%"]))
            elif r < 0.12:
                words.append(rng.choice([",", ";", "-", "(", ")", '"', ":", "'s"]))
            else:
                words.append(WORDS[min(int(rng.paretovariate(1.0)) - 1, len(WORDS) - 1) if rng.random() < 0.6
                                   else rng.randrange(len(WORDS))])
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?"]))
    return "\n".join(out)


def perturb(rng: random.Random, text: str) -> str:
    """A noisy copy: drop, swap or replace some words, as a system output would differ from its reference."""
    lines = []
    for line in text.split("\n"):
        words = line.split()
        words = [w for w in words if rng.random() > 0.15]
        for i in range(len(words)):
            if rng.random() < 0.15:
                words[i] = rng.choice(WORDS)
        if len(words) > 2 and rng.random() < 0.5:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        lines.append(" ".join(words))
    return "\n".join(lines)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_bleu(n: int, seed: int = 0) -> dict:
    import sacrebleu

    from metrics.bleu import corpus_bleu

    rng = random.Random(seed)
    refs = [synthetic_text(rng, rng.randint(5, 40)) for _ in range(n)]
    hyps = [perturb(rng, r) for r in refs]
    ours, t_ours = timed(lambda: corpus_bleu(hyps, [refs]))
    theirs, t_ref = timed(lambda: sacrebleu.corpus_bleu(hyps, [refs]))
    same = (abs(ours.score - theirs.score) <= 1e-9 and ours.counts == theirs.counts and ours.totals == theirs.totals
            and ours.sys_len == theirs.sys_len and ours.ref_len == theirs.ref_len)
    return {"what": f"corpus BLEU, {n:,} segments", "ours": t_ours, "ref": t_ref, "ref_name": "sacrebleu",
            "same": same, "value": f"{ours.score:.4f} vs {theirs.score:.4f}"}


def bench_rouge(n: int, seed: int = 0) -> dict:
    from rouge_score import rouge_scorer

    from metrics.rouge import rouge_scores, stem

    rng = random.Random(seed)
    refs = [synthetic_text(rng, 60, sentences=3) for _ in range(n)]
    preds = [perturb(rng, r) for r in refs]
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    stem.cache_clear()
    ours, t_ours = timed(lambda: rouge_scores(preds, refs, types, use_stemmer=True))
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
    theirs, t_ref = timed(lambda: [scorer.score(r, p) for p, r in zip(preds, refs)])
    same = all(tuple(a[k]) == tuple(b[k]) for a, b in zip(ours, theirs) for k in types)
    mean_f = sum(s["rougeLsum"].fmeasure for s in ours) / n
    return {"what": f"ROUGE-1/2/L/Lsum + stemming, {n:,} pairs", "ours": t_ours, "ref": t_ref,
            "ref_name": "rouge-score", "same": same, "value": f"mean Lsum F {mean_f:.4f}"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bleu_segments", type=int, default=10_000)
    ap.add_argument("--rouge_pairs", type=int, default=2_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = [bench_bleu(args.bleu_segments, args.seed), bench_rouge(args.rouge_pairs, args.seed)]
    print(f"{'task':<40} {'ours s':>8} {'reference':>12} {'ref s':>8} {'speedup':>8}  identical  result")
    for r in rows:
        print(f"{r['what']:<40} {r['ours']:>8.3f} {r['ref_name']:>12} {r['ref']:>8.3f} {r['ref'] / r['ours']:>7.2f}x"
              f"  {'yes' if r['same'] else 'NO':<9}  {r['value']}")


if __name__ == "__main__":
    main()
