"""metrics.completion and metrics.chrf: equal to reference implementations, and a task free of training prompts."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sacrebleu
from conftest import stdlib_documents
from sacrebleu.metrics import CHRF

from metrics.bootstrap import bootstrap_corpus, bootstrap_difference, bootstrap_mean
from metrics.chrf import corpus_chrf, sentence_chrf
from metrics.completion import (
    TrainIndex,
    aggregate,
    bleu_from_stats,
    build_task,
    code_tokens,
    compare,
    corpus_bleu_code,
    cut_completion,
    edit_similarity,
    is_finished,
    levenshtein,
    normalized_lines,
    score_examples,
    score_pair,
)


def dp_levenshtein(a: str, b: str) -> int:
    """The textbook O(len(a) * len(b)) table."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def random_code(rng: random.Random, n: int) -> str:
    pieces = ["def", " ", "x", "_y", "(", ")", ":", "\n", "    ", "return", "1", "0.5", "+", "é", "猫", "\t", "'a'",
              "self", ".", ",", "=", "#", "A", "b"]
    return "".join(rng.choice(pieces) for _ in range(n))


def test_levenshtein_equals_dynamic_programming_on_random_strings():
    rng = random.Random(0)
    for trial in range(400):
        alphabet = "ab" if trial % 2 else "abcdefgh éx\n"
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))  # > 64: multi-word bit vectors
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
        d = dp_levenshtein(a, b)
        assert levenshtein(a, b) == d == levenshtein(b, a)
        longest = max(len(a), len(b))
        assert edit_similarity(a, b) == pytest.approx(1 - d / longest if longest else 1.0, abs=1e-15)
    for _ in range(50):
        a, b = random_code(rng, rng.randint(0, 60)), random_code(rng, rng.randint(0, 60))
        assert levenshtein(a, b) == dp_levenshtein(a, b)
    assert edit_similarity("", "") == 1.0 and edit_similarity("abc", "") == 0.0


@pytest.mark.parametrize("opts", [{}, {"lowercase": True}, {"whitespace": True}, {"char_order": 4, "beta": 1}])
def test_chrf_equals_sacrebleu_on_random_inputs(opts):
    rng = random.Random(len(opts))
    for _ in range(30):
        n = rng.randint(1, 8)
        hyps = [random_code(rng, rng.randint(0, 25)) for _ in range(n)]
        refs = [random_code(rng, rng.randint(0, 25)) if rng.random() > 0.1 else hyps[i] for i in range(n)]
        if rng.random() < 0.2:
            hyps[0] = ""
        ref_metric = CHRF(**opts)
        want = ref_metric.corpus_score(hyps, [refs]).score
        assert corpus_chrf(hyps, refs, **opts).score == pytest.approx(want, abs=1e-9)
        assert sentence_chrf(hyps[-1], refs[-1], **opts) == pytest.approx(
            ref_metric.sentence_score(hyps[-1], [refs[-1]]).score, abs=1e-9)


def test_code_bleu_equals_sacrebleu_and_its_bootstrap_point():
    rng = random.Random(5)
    refs = [random_code(rng, rng.randint(3, 30)) for _ in range(40)]
    hyps = [r if i % 5 == 0 else random_code(rng, rng.randint(0, 30)) for i, r in enumerate(refs)]
    ours = corpus_bleu_code(hyps, refs)
    join = lambda s: " ".join(code_tokens(s))
    want = sacrebleu.corpus_bleu([join(h) for h in hyps], [[join(r) for r in refs]], tokenize="none").score
    assert ours.score == pytest.approx(want, abs=1e-9) and "tok:none" in ours.signature
    rows = [score_pair("", h, r, "line") for h, r in zip(hyps, refs)]
    ci = bootstrap_corpus([r["bleu_stats"] for r in rows], bleu_from_stats, n_samples=200)
    assert ci["value"] == pytest.approx(want, abs=1e-9) and ci["low"] <= ci["value"] <= ci["high"]
    assert code_tokens("self.max_len=f(x_1, 2.5)") == ["self", ".", "max_len", "=", "f", "(", "x_1", ",", "2.5", ")"]


def test_stop_rules():
    gen = ' doc"""\n    x = 1\n\n    return x\ndef g():\n    pass'
    assert cut_completion("function", gen) == "    x = 1\n\n    return x"
    assert is_finished("function", gen) and not is_finished("function", gen.split("def g")[0])
    assert cut_completion("line", "\n    y = 2\n    z") == "    y = 2"
    assert is_finished("line", "\n    y = 2\n") and not is_finished("line", "\n    y = 2")
    assert cut_completion("line", "no newline yet") == "" and cut_completion("function", "x") == ""


def test_scores_of_a_perfect_and_a_broken_prediction():
    prompt = 'def f(x):\n    """Double."""'
    good = score_pair(prompt, "    return 2 * x", "    return 2 * x", "function")
    assert good["exact"] == good["ast_valid"] == 1.0 and good["edit_sim"] == 1.0
    assert good["bleu"] == pytest.approx(100) and good["chrf"] == pytest.approx(100) and good["rougeL"] == 1.0
    bad = score_pair(prompt, "    return (2 *", "    return 2 * x", "function")
    assert bad["exact"] == 0 and bad["ast_valid"] == 0.0 and 0 < bad["edit_sim"] < 1
    assert score_pair(prompt, "", "    return 2 * x", "function")["ast_valid"] == 0.0  # empty is not a body
    # a line example whose context cannot parse on its own has no validity score
    assert score_pair("    else:", "        y = 2", "        y = 2", "line")["ast_valid"] is None


def test_task_never_takes_a_prompt_from_a_training_document():
    docs = stdlib_documents(40)
    train, val = docs[:30], docs[30:]
    # Contaminate: a whole training file re-indented, and training functions pasted into a held-out file.
    val = val + ["\n".join("    " + ln if ln.strip() else ln for ln in train[3].split("\n")).replace("    ", "", 0),
                 val[0] + "\n\n" + train[5], train[7].replace("\n\n\n", "\n\n")]
    index = TrainIndex(train)
    task = build_task(val, index, n_total=10_000, n_function=10_000)
    c = task["counts"]
    assert c["function"]["chosen"] > 20 and c["line"]["chosen"] > 200
    assert c["line"]["prompt_in_train"] > 50 and c["function"]["prompt_in_train"] > 5  # the copies were caught
    train_rows = ["\n" + "\n".join(normalized_lines(t)) + "\n" for t in train]
    for ex in task["examples"]:
        assert ex["prompt"].split("\n")[-1].strip()  # ends on a non-blank line: the newline is the model's
        needle = "\n" + "\n".join(normalized_lines(ex["prompt"])) + "\n"
        assert not any(needle in t for t in train_rows), ex
        src = "\n".join(normalized_lines(val[ex["doc"]]))
        assert "\n".join(normalized_lines(ex["prompt"] + "\n" + ex["reference"])) in src  # from its val doc
    # the same texts give the same task, whatever else is in the list
    again = build_task(val, index, n_total=10_000, n_function=10_000)
    assert [(e["prompt"], e["reference"]) for e in again["examples"]] == \
        [(e["prompt"], e["reference"]) for e in task["examples"]]
    small = build_task(val, index, n_total=50, n_function=20)
    assert len(small["examples"]) == 50 and small["counts"]["function"]["chosen"] == 20


def test_aggregate_has_an_interval_for_every_metric():
    ex = [{"kind": k, "prompt": "x = 1", "reference": r, "doc": i // 3} for i, (k, r) in
          enumerate([("line", "y = 2"), ("line", "z = x + 1"), ("function", "    return 1"), ("line", "print(x)")] * 5)]
    preds = [e["reference"] if i % 3 else "y = 3" for i, e in enumerate(ex)]
    rows = score_examples(ex, preds)
    agg = aggregate(ex, rows, n_samples=200)
    assert set(agg) == {"all", "function", "line"} and agg["all"]["n"] == 20
    for m in ("exact", "edit_sim", "rougeL", "bleu", "chrf"):
        v = agg["all"][m]
        assert v["low"] <= v["value"] <= v["high"], m
    assert agg["all"]["exact"]["value"] == pytest.approx(np.mean([r["exact"] for r in rows]))
    assert agg["all"]["chrf"]["value"] == pytest.approx(
        sacrebleu.corpus_chrf([p.strip() for p in preds], [[e["reference"] for e in ex]]).score)


def clustered_task(n_docs: int = 12, per_doc: int = 10):
    """Examples grouped by document; a document is either solved as a whole or missed as a whole."""
    ex = [{"id": d * per_doc + j, "kind": "line" if j % 4 else "function", "prompt": "x = 1",
           "reference": f"y = {d} + {j}", "doc": d} for d in range(n_docs) for j in range(per_doc)]
    good = [e["reference"] for e in ex]
    patchy = [e["reference"] if e["doc"] % 3 == 0 else "q" for e in ex]
    return ex, good, patchy


def test_intervals_resample_documents_not_examples():
    ex, _, patchy = clustered_task()
    rows = score_examples(ex, patchy)
    agg = aggregate(ex, rows, n_samples=300, seed=1)
    docs = [e["doc"] for e in ex]
    exact = [r["exact"] for r in rows]
    assert agg["all"]["documents"] == 12 and agg["all"]["exact"]["clusters"] == 12
    assert agg["all"]["exact"] == bootstrap_mean(exact, 300, seed=1, clusters=docs)
    line = [i for i, e in enumerate(ex) if e["kind"] == "line"]
    assert agg["line"]["edit_sim"] == bootstrap_mean([rows[i]["edit_sim"] for i in line], 300, seed=1,
                                                     clusters=[docs[i] for i in line])
    # Whole documents right or wrong: 120 examples carry the information of 12, and the interval says so.
    iid = bootstrap_mean(exact, 300, seed=1)
    assert agg["all"]["exact"]["high"] - agg["all"]["exact"]["low"] > 2.5 * (iid["high"] - iid["low"])
    assert agg["all"]["bleu"]["clusters"] == 12 and agg["all"]["chrf"]["low"] < agg["all"]["chrf"]["high"]
    with pytest.raises(ValueError, match="'doc'"):
        aggregate([{k: v for k, v in e.items() if k != "doc"} for e in ex], rows)


def test_compare_gives_paired_clustered_differences():
    ex, good, patchy = clustered_task()
    a, b = score_examples(ex, good), score_examples(ex, patchy)
    d = compare(ex, a, b, n_samples=300, seed=2)
    docs = [e["doc"] for e in ex]
    agg_a, agg_b = aggregate(ex, a, 300, 2), aggregate(ex, b, 300, 2)
    for m in ("exact", "edit_sim", "rougeL", "bleu", "chrf"):
        assert d["all"][m]["value"] == pytest.approx(agg_a["all"][m]["value"] - agg_b["all"][m]["value"]), m
        assert d["all"][m]["low"] <= d["all"][m]["value"] <= d["all"][m]["high"], m
    assert d["all"]["exact"] == bootstrap_difference([r["exact"] for r in a], [r["exact"] for r in b], None, 300,
                                                     seed=2, clusters=docs)
    assert d["all"]["bleu"] == bootstrap_difference([r["bleu_stats"] for r in a], [r["bleu_stats"] for r in b],
                                                    bleu_from_stats, 300, seed=2, clusters=docs)
    assert d["all"]["exact"]["low"] > 0  # a solves every document b misses, and never loses one
    assert set(d) == {"all", "function", "line"} and d["function"]["n"] == 36
