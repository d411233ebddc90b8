"""A code-completion task built from held-out Python files, and its metrics with bootstrap intervals.

    from metrics.completion import TrainIndex, build_task, score_examples, aggregate, compare
    index = TrainIndex(train_texts)                                   # for decontamination
    task = build_task(val_texts, index, n_total=360)                   # {"examples": [...], "counts": {...}}
    preds = [cut_completion(ex["kind"], generated_text) for ...]      # the stop rules
    rows = score_examples(task["examples"], preds); aggregate(task["examples"], rows)
    compare(task["examples"], rows, baseline_rows)                    # paired differences, a minus b

Two kinds of example, both taken from validation documents only:
  function  prompt = decorators + signature + docstring (dedented to column 0); reference = the body.
            A completion ends where a line comes back to column 0 (the function is over).
  line      prompt = the 8 lines before a code line that follows a non-blank line; reference = that line,
            indentation included.
            A completion ends at the end of its first line.
The prompt stops at the end of its last line, without the newline: the newline and the next line's
indentation are one token for a byte-level BPE, so the model writes them itself. The text a model produces
before its first newline (a continuation of the prompt's last line) is therefore not part of the answer.

Decontamination: an example is dropped when its prompt (compared line by line, whitespace stripped, blank
lines ignored) occurs in any training document, or, for a function, when its body of 3+ lines does.
The same validation text gives the same examples every time (a seeded, order-independent selection).

Metrics per example, then in aggregate with a 95% percentile-bootstrap interval. Examples from one file are not
independent, so the interval is a cluster bootstrap: it resamples the source documents (ex["doc"], the index of
the validation document) and keeps all of a drawn document's examples. compare() gives paired differences
between two systems on the same examples, resampled the same way. The metrics:
  exact        prediction == reference (trailing whitespace of each line ignored)
  edit_sim     1 - Levenshtein(prediction, reference) / max(len of either), on characters
  bleu         BLEU over code tokens (below); corpus BLEU is computed from summed statistics, as sacrebleu
  chrf         chrF (character 6-grams, beta 2), sacrebleu's definition; corpus-level likewise
  rougeL       ROUGE-L F over code tokens (LCS of token sequences, rouge-score's formula)
  ast_valid    prompt + newline + prediction parses with `ast` and the prediction is not empty; only for
               examples whose reference parses with the prompt (a line example's window is dedented first)
Code tokens: identifiers, numbers and single punctuation characters, whitespace ignored. sacrebleu's 13a
tokenizer is built for English (it splits snake_case at '_'), "char" scores character 4-grams, which
rewards fragments, and splitting on whitespace glues `f(x)` into one token; BLEU is sacrebleu's
corpus_bleu with tokenize="none" over the space-joined code tokens.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Callable, Sequence

from metrics.bleu import corpus_bleu, ngram_counts, score_from_stats, segment_stats
from metrics.bootstrap import bootstrap_corpus, bootstrap_difference, bootstrap_mean
from metrics.chrf import chrf_from_stats, chrf_stats
from metrics.rouge import lcs_score

CONTEXT_LINES = 8
MAX_BODY_LINES = 12
MAX_LINE_CHARS = 100
METRICS = ("exact", "edit_sim", "bleu", "chrf", "rougeL", "ast_valid")
_CODE_TOKEN = re.compile(r"[^\W\d]\w*|\d[\w.]*|\S")


# ---------------------------------------------------------------------------------------------------------------
# Metrics of one pair.


def code_tokens(text: str) -> list[str]:
    """Identifiers, numbers and single punctuation characters; whitespace separates and is dropped."""
    return _CODE_TOKEN.findall(text)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each).

    Bit-parallel (Myers 1999, in Hyyrö's form): one column of the DP table is held as bit vectors of
    +1/-1 vertical differences in Python integers, so each character of `a` costs a few integer operations.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[str, int] = {}
    for i, ch in enumerate(b):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    full, top = (1 << m) - 1, 1 << (m - 1)
    pv, mv, score = full, 0, m
    for ch in a:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = (mv | ~(xh | pv)) & full
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & full
        mh = (mh << 1) & full
        pv = (mh | ~(xv | ph)) & full
        mv = ph & xv
    return score


def edit_similarity(prediction: str, reference: str) -> float:
    """1 - Levenshtein / the longer length; 1.0 for two empty strings."""
    longest = max(len(prediction), len(reference))
    return 1.0 if longest == 0 else 1 - levenshtein(prediction, reference) / longest


def _strip_lines(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False
    return True


def bleu_stats(prediction: str, reference: str) -> list[int]:
    """[hyp_len, ref_len, correct_1..4, total_1..4] over code tokens (metrics.bleu's segment statistics)."""
    ref = code_tokens(reference)
    return segment_stats(code_tokens(prediction), ngram_counts(ref, 4), [len(ref)], 4)


def bleu_from_stats(stats: Sequence[float]) -> float:
    """BLEU (0-100, exp smoothing as sacrebleu's default) from summed bleu_stats."""
    return score_from_stats(list(stats[2:6]), list(stats[6:10]), stats[0], stats[1], "exp").score


def score_pair(prompt: str, prediction: str, reference: str, kind: str) -> dict:
    """Every per-example metric of one prediction (dict keyed as METRICS, plus the statistics used)."""
    pred, ref = _strip_lines(prediction), _strip_lines(reference)
    bstats = bleu_stats(pred, ref)
    cstats = chrf_stats(pred, ref)
    p_tok, r_tok = code_tokens(pred), code_tokens(ref)
    ast_valid = None
    if _frame_parses(kind, prompt, ref):
        # An empty answer would "parse" (a docstring alone is a body) while completing nothing.
        ast_valid = bool(pred.strip()) and _frame_parses(kind, prompt, pred)
    # Sentence BLEU with effective order: short lines have no 4-grams, and that should not zero them.
    sent_bleu = score_from_stats(bstats[2:6], bstats[6:10], bstats[0], bstats[1], "exp",
                                 effective_order=True).score
    return {"exact": float(pred == ref), "edit_sim": edit_similarity(pred, ref), "bleu": sent_bleu,
            "chrf": chrf_from_stats(cstats), "rougeL": lcs_score(r_tok, p_tok).fmeasure,
            "ast_valid": None if ast_valid is None else float(ast_valid), "bleu_stats": bstats,
            "chrf_stats": cstats}


def _frame_parses(kind: str, prompt: str, text: str) -> bool:
    """Does prompt + newline + text parse? A line example's window is first dedented to its first line."""
    source = prompt + "\n" + text
    if kind == "line":
        source = _dedent_block(source)
    return source is not None and parses(source)


def _dedent_block(text: str) -> str | None:
    """text with its first line's indentation removed from every line, or None if a line is indented less."""
    lines = text.split("\n")
    first = next((ln for ln in lines if ln.strip()), "")
    cut = len(first) - len(first.lstrip())
    if any(ln.strip() and ln[:cut].strip() for ln in lines):
        return None
    return "\n".join(ln[cut:] for ln in lines)


# ---------------------------------------------------------------------------------------------------------------
# Stop rules: where a generated continuation ends.


def cut_completion(kind: str, generated: str) -> str:
    """The answer inside a model's raw continuation of a prompt (see the module docstring)."""
    if "\n" not in generated:
        return ""
    body = generated.split("\n", 1)[1]
    if kind == "line":
        return body.split("\n", 1)[0].rstrip()
    kept = []
    for line in body.split("\n"):
        if line.strip() and not line[0].isspace():
            break  # back at column 0: the function is over
        kept.append(line)
    return _strip_lines("\n".join(kept))


def is_finished(kind: str, generated: str) -> bool:
    """True once the stop rule has fired, so generation can end early (the cut answer no longer changes)."""
    if kind == "line":
        return generated.count("\n") >= 2
    lines = generated.split("\n")[1:-1]  # whole lines after the first newline
    return any(ln.strip() and not ln[0].isspace() for ln in lines)


# ---------------------------------------------------------------------------------------------------------------
# Decontamination against the training split.


def normalized_lines(text: str) -> list[str]:
    """Lines with surrounding whitespace stripped, blank lines dropped: the unit of comparison with training."""
    return [s for s in (line.strip() for line in text.split("\n")) if s]


class TrainIndex:
    """Answers "does this text occur in a training document?" line by line, ignoring indentation and blanks.

    A set of hashed consecutive line pairs rejects most queries at once; the rest are confirmed by a substring
    search in the training text with one normalised line per row and a separator row between documents.
    """

    def __init__(self, train_texts: Sequence[str]):
        docs = [normalized_lines(t) for t in train_texts]
        self.lines = {_h(ln) for d in docs for ln in d}
        self.pairs = {_h(a + "\n" + b) for d in docs for a, b in zip(d, d[1:])}
        self.text = "\n" + "\n\x00\n".join("\n".join(d) for d in docs) + "\n"
        self.documents = len(docs)

    def contains(self, text: str) -> bool:
        lines = normalized_lines(text)
        if not lines:
            return False
        if len(lines) == 1:
            return _h(lines[0]) in self.lines
        if not all(_h(a + "\n" + b) in self.pairs for a, b in zip(lines, lines[1:])):
            return False
        return ("\n" + "\n".join(lines) + "\n") in self.text


def _h(s: str) -> bytes:
    return hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest()


# ---------------------------------------------------------------------------------------------------------------
# Extracting examples.


def function_candidates(text: str) -> list[dict]:
    """Functions with a docstring and a short body below it, as (prompt, reference) dedented to column 0."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.split("\n")
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if node.body[1].lineno <= doc.end_lineno or doc.lineno == node.lineno:
            continue  # body on the docstring's line, or a one-line def: no clean cut
        col = node.col_offset
        block = lines[start - 1 : node.end_lineno]
        if any(ln.strip() and ln[:col].strip() for ln in block):
            continue
        block = [ln[col:] for ln in block]
        split = doc.end_lineno - start + 1
        prompt, reference = "\n".join(block[:split]), _strip_lines("\n".join(block[split:]))
        n_body = len(reference.split("\n"))
        if not reference.strip() or n_body > MAX_BODY_LINES or not parses(prompt + "\n" + reference):
            continue
        out.append({"kind": "function", "prompt": prompt, "reference": reference, "line": node.lineno,
                    "name": node.name})
    return out


def _string_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside multi-line string literals (docstrings): prose, not code, so not line targets."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.end_lineno > node.lineno:
            inside.update(range(node.lineno, node.end_lineno + 1))
    return inside


def line_candidates(text: str) -> list[dict]:
    """Code lines (8-100 characters, not comments or docstrings) with the CONTEXT_LINES lines before them."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    skip = _string_lines(tree)
    lines = text.split("\n")
    out = []
    for i in range(CONTEXT_LINES, len(lines)):
        target = lines[i].rstrip()
        s = target.strip()
        if i + 1 in skip or not 8 <= len(s) <= MAX_LINE_CHARS or s.startswith("#"):
            continue
        context = lines[i - CONTEXT_LINES : i]
        # The prompt must end on a non-blank line: its last newline is the model's to write (module docstring).
        if not context[-1].strip() or sum(bool(ln.strip()) for ln in context) < 3:
            continue
        out.append({"kind": "line", "prompt": "\n".join(context), "reference": target, "line": i + 1})
    return out


def _pick(cands: list[dict], n: int, seed: int) -> list[dict]:
    """Up to n candidates spread over documents: round-robin over documents, each in seeded-hash order.

    Ranking by a hash of each candidate's own text (not its position in a list) keeps the choice the same
    when unrelated documents are added or removed.
    """
    key = lambda c: hashlib.blake2b(f"{seed}\x00{c['prompt']}\x00{c['reference']}".encode("utf-8", "replace"),
                                    digest_size=8).digest()
    by_doc: dict[int, list[dict]] = {}
    for c in sorted(cands, key=key):
        by_doc.setdefault(c["doc"], []).append(c)
    queues = sorted(by_doc.values(), key=lambda q: key(q[0]))
    taken: list[dict] = []
    for rank in range(max(map(len, queues), default=0)):
        for q in queues:
            if rank < len(q) and len(taken) < n:
                taken.append(q[rank])
    return sorted(taken, key=lambda c: (c["doc"], c["line"]))


def build_task(val_texts: Sequence[str], train_index: TrainIndex, n_total: int = 360, n_function: int = 160,
               seed: int = 0, fits: Callable[[dict], bool] | None = None) -> dict:
    """The completion task: examples from val_texts whose prompt training never saw, and the counts dropped.

    Up to n_function function examples, then line examples up to n_total in all, each kind spread as evenly
    over documents as the candidates allow. fits(example) -> False drops an example the caller cannot run (e.g. a
    reference longer than its token cap).
    """
    counts = {"function": {"candidates": 0, "prompt_in_train": 0, "body_in_train": 0, "too_long": 0},
              "line": {"candidates": 0, "prompt_in_train": 0, "body_in_train": 0, "too_long": 0}}
    kept: dict[str, list[dict]] = {"function": [], "line": []}
    for d, text in enumerate(val_texts):
        for c in function_candidates(text) + line_candidates(text):
            c["doc"] = d
            k = counts[c["kind"]]
            k["candidates"] += 1
            if train_index.contains(c["prompt"]):
                k["prompt_in_train"] += 1
            elif c["kind"] == "function" and len(normalized_lines(c["reference"])) >= 3 and \
                    train_index.contains(c["reference"]):
                k["body_in_train"] += 1
            elif fits is not None and not fits(c):
                k["too_long"] += 1
            else:
                kept[c["kind"]].append(c)
    functions = _pick(kept["function"], min(n_function, n_total), seed)
    examples = functions + _pick(kept["line"], n_total - len(functions), seed)
    for i, ex in enumerate(examples):
        ex["id"] = i
    for kind in counts:
        counts[kind]["usable"] = len(kept[kind])
        counts[kind]["chosen"] = sum(ex["kind"] == kind for ex in examples)
    return {"examples": examples, "counts": counts, "train_documents": train_index.documents,
            "val_documents": len(val_texts)}


# ---------------------------------------------------------------------------------------------------------------
# Scoring a system's predictions.


def score_examples(examples: Sequence[dict], predictions: Sequence[str]) -> list[dict]:
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions: pass one per example")
    return [score_pair(ex["prompt"], p, ex["reference"], ex["kind"]) for ex, p in zip(examples, predictions)]


MEAN_METRICS = ("exact", "edit_sim", "rougeL", "ast_valid")
CORPUS_METRICS = {"bleu": ("bleu_stats", bleu_from_stats), "chrf": ("chrf_stats", chrf_from_stats)}


def _groups(examples: Sequence[dict]):
    """(group, example indices) for all examples and each kind present."""
    for group in ("all", "function", "line"):
        idx = [i for i, ex in enumerate(examples) if group == "all" or ex["kind"] == group]
        if idx:
            yield group, idx


def _documents(examples: Sequence[dict], idx: list[int]) -> list:
    missing = [examples[i].get("id", i) for i in idx if "doc" not in examples[i]]
    if missing:
        raise ValueError(f"examples {missing[:5]} have no 'doc' (the id of the document they come from), which the "
                         "interval resamples by; build them with build_task or set ex['doc']")
    return [examples[i]["doc"] for i in idx]


def aggregate(examples: Sequence[dict], rows: Sequence[dict], n_samples: int = 1000, seed: int = 0) -> dict:
    """Every metric with its bootstrap interval, for all examples and per kind: {"all"|kind: {metric: {...}}}.

    The interval is a cluster bootstrap over the examples' source documents (ex["doc"]): a file gives many
    examples that succeed or fail together, so resampling examples one by one would make it too narrow.
    """
    out = {}
    for group, idx in _groups(examples):
        docs = _documents(examples, idx)
        g: dict = {"n": len(idx), "documents": len(set(docs))}
        for m in MEAN_METRICS:
            keep = [j for j, i in enumerate(idx) if rows[i][m] is not None]
            g[m] = bootstrap_mean([rows[idx[j]][m] for j in keep], n_samples, seed=seed,
                                  clusters=[docs[j] for j in keep]) if keep else None
        for m, (key, score_fn) in CORPUS_METRICS.items():
            g[m] = bootstrap_corpus([rows[i][key] for i in idx], score_fn, n_samples, seed=seed, clusters=docs)
        out[group] = g
    return out


def compare(examples: Sequence[dict], rows_a: Sequence[dict], rows_b: Sequence[dict], n_samples: int = 1000,
            seed: int = 0) -> dict:
    """System a minus system b on every metric, paired on the same examples, with a cluster-bootstrap interval.

    {"all"|kind: {"n", "documents", metric: {"value", "low", "high", ...}}}; an interval that excludes 0 says
    that a beats (or loses to) b on documents like these, which two overlapping intervals cannot tell.
    """
    out = {}
    for group, idx in _groups(examples):
        docs = _documents(examples, idx)
        g: dict = {"n": len(idx), "documents": len(set(docs))}
        for m in MEAN_METRICS:
            keep = [j for j, i in enumerate(idx) if rows_a[i][m] is not None and rows_b[i][m] is not None]
            g[m] = bootstrap_difference([rows_a[idx[j]][m] for j in keep], [rows_b[idx[j]][m] for j in keep],
                                        None, n_samples, seed=seed, clusters=[docs[j] for j in keep]) if keep else None
        for m, (key, score_fn) in CORPUS_METRICS.items():
            g[m] = bootstrap_difference([rows_a[i][key] for i in idx], [rows_b[i][key] for i in idx], score_fn,
                                        n_samples, seed=seed, clusters=docs)
        out[group] = g
    return out


def corpus_bleu_code(predictions: Sequence[str], references: Sequence[str]):
    """Corpus BLEU over code tokens through metrics.bleu (tokenize="none"): the number sacrebleu gives."""
    join = lambda s: " ".join(code_tokens(_strip_lines(s)))
    return corpus_bleu([join(p) for p in predictions], [[join(r) for r in references]], tokenize="none")


__all__ = ["METRICS", "TrainIndex", "aggregate", "build_task", "code_tokens", "compare", "corpus_bleu_code",
           "cut_completion",
           "edit_similarity", "is_finished", "levenshtein", "score_examples"]
