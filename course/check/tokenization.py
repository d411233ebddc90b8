"""Self-checks for byte-level BPE: training the merges and encoding with them."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable

from course.check._harness import (
    Result,
    _calls_reference,
    _check,
    _crash,
    _finish,
    _seed,
    watching,
)

_SYLLABLES = ("th", "e", "an", "in", "er", "s", "ing", "re", "on", "at", "é", "ü", "x", "qu", "o", "a")


def _random_text(rng: random.Random, words: int) -> str:
    out = []
    for _ in range(words):
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        out.append(w.capitalize() if rng.random() < 0.1 else w)
        out.append(rng.choice([" "] * 12 + [", ", ". ", "\n", "  ", " 42 ", "'s "]))
    return "".join(out)


def _pair_counts(words: Counter, merges: list[tuple[int, int]]) -> Counter:
    """Pair counts over pre-tokens (weighted by frequency) after applying merges in order."""
    counts: Counter = Counter()
    for w, f in words.items():
        seq = list(w.encode("utf-8"))
        for r, (a, b) in enumerate(merges):
            out, i = [], 0
            while i < len(seq):  # left to right, non-overlapping
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(256 + r)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seq = out
        for p in zip(seq, seq[1:]):
            counts[p] += f
    return counts


def _bpe_mismatch(text: str, got: list, expected: list, what: str) -> str:
    """Where the learner's merges first differ, with both pairs' bytes and counts at that step."""
    from dataset_curation.bpe import pretokenize

    r = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    counts = _pair_counts(Counter(pretokenize(text)), expected[:r])
    vocab = [bytes([i]) for i in range(256)]
    for a, b in expected:
        vocab.append(vocab[a] + vocab[b])

    def show(p):
        try:
            return f"{p} = {(vocab[p[0]] + vocab[p[1]]).decode('utf-8', 'replace')!r} (count {counts.get(p, 0)})"
        except (IndexError, TypeError):
            return f"{p} (ids outside the vocabulary so far)"

    if r >= len(got):
        return (f"{what}\n  you returned {len(got)} merges; the reference learns {len(expected)}: "
                f"the next is {show(expected[r])}")
    if r >= len(expected):
        return f"{what}\n  the reference stops after {len(expected)} merges (no pair occurs twice); you go on"
    msg = f"{what}\n  merge {r} (new id {256 + r}): expected {show(expected[r])}, got {show(got[r])}"
    if counts.get(got[r], 0) == 0:
        msg += ("\n  hint: your pair never occurs inside a pre-token: count and merge within the pieces of "
                "pretokenize(text) only, never across them")
    elif counts.get(got[r], 0) == counts.get(expected[r], 0):
        msg += "\n  hint: a tie in counts: break it by taking the smallest pair of ids"
    elif counts.get(got[r], 0) < counts.get(expected[r], 0):
        msg += ("\n  hint: the expected pair occurs more often: count pairs in every pre-token, weighted by how "
                "often it occurs, after applying all earlier merges")
    return msg


WATCH_BPE = ("dataset_curation.bpe.train_bpe", "tokenizers.trainers.BpeTrainer.__init__")


@_check(hints=(
    "Start every pre-token as its UTF-8 bytes, count adjacent pairs weighted by how often the pre-token occurs, "
    "merge the most frequent pair into the next new id everywhere, repeat. Invariant: merge r creates id 256 + r, no "
    "merge crosses a pre-token, and every merged pair occurred at least twice.",
    "Count the pre-tokens once and work on the distinct ones with their frequencies. A tie between equally frequent "
    "pairs goes to the smallest pair as a tuple of ids; replace occurrences left to right without overlap (in a run "
    "of three equal ids only the first two merge), and stop when the best pair occurs fewer than two times."))
def bpe(fn: Callable, trials: int = 3, seed: int | None = None, log: bool = True) -> Result:
    """fn(text, num_merges) -> merges: a byte-level BPE trainer, a list of (id, id) pairs in the order learned.

    Split text into pre-tokens with dataset_curation.bpe.pretokenize (merges never cross a pre-token), start from
    the UTF-8 bytes (ids 0..255), count every adjacent pair in every pre-token (weighted by how often the
    pre-token occurs), merge the most frequent pair into the new id 256 + r everywhere (left to right), repeat.
    Ties go to the smallest pair (compare the id tuples); stop early when no pair occurs twice.
    Reference: dataset_curation.bpe.train_bpe, compared merge by merge (exact).
    """
    from dataset_curation.bpe import train_bpe

    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    for trial in range(trials):
        text = _random_text(rng, rng.randint(150, 400))
        n = rng.randint(20, 60)
        what = f"trial {trial}: {len(text)} characters of random syllables, num_merges={n}; text starts {text[:60]!r}"
        expected = train_bpe(text, vocab_size=256 + n + 1).merges
        try:
            with watching(WATCH_BPE, called, fn):
                got = [tuple(int(i) for i in m) for m in fn(text, n)]
        except Exception as e:
            return _finish("bpe", False, _crash(e, what), s, log)
        if got == expected:
            continue
        if len(got) != len(expected) and got == expected[: len(got)]:
            return _finish("bpe", False, f"{what}\n  your first {len(got)} merges are right, but the reference "
                           f"learns {len(expected)} (stop only when no pair occurs twice)", s, log)
        msg = _bpe_mismatch(text, got, expected, what)
        return _finish("bpe", False, msg, s, log)
    return _finish("bpe", True, f"{trials} random texts (with multi-byte characters), 20-60 merges each: every merge "
                   "equal to dataset_curation.bpe.train_bpe's, in order", s, log,
                   uses_reference=called or _calls_reference(fn, {"train_bpe"}))

WATCH_BPE_ENCODE = ("dataset_curation.bpe.BPETokenizer.encode", "dataset_curation.bpe.BPETokenizer._encode_word",
                    "tokenizers.Tokenizer.encode")


@_check(hints=(
    "In each pre-token start from the UTF-8 bytes and keep merging the adjacent pair whose merge was learned "
    "earliest (lowest rank) until no adjacent pair is a merge. Invariant: concatenating the bytes of the ids gives "
    "the text back, and with no merges the ids are just the bytes.",
    "The order is by rank, not by position or by frequency: find the lowest-ranked pair present in the piece, "
    "replace all its occurrences left to right, then look again. Merging whichever known pair comes first in the "
    "text gives other ids on some pieces."))
def bpe_encode(fn: Callable, trials: int = 3, seed: int | None = None, log: bool = True) -> Result:
    """fn(text, merges) -> token ids: encode text with learned byte-level BPE merges (a list of (id, id) pairs).

    Split text with dataset_curation.bpe.pretokenize; in each piece start from its UTF-8 bytes, then repeatedly
    merge the adjacent pair with the lowest rank (merge r makes id 256 + r) everywhere in the piece, until no
    adjacent pair is a merge. Reference: dataset_curation.bpe.BPETokenizer(merges, special_tokens=()).encode (exact).
    """
    from dataset_curation.bpe import BPETokenizer, pretokenize, train_bpe

    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    for trial in range(trials):
        merges = train_bpe(_random_text(rng, rng.randint(150, 300)), vocab_size=256 + rng.randint(30, 90) + 1,
                           special_tokens=()).merges
        text = _random_text(rng, rng.randint(20, 60))
        tok = BPETokenizer(merges, special_tokens=())
        what = f"trial {trial}: {len(merges)} merges, text of {len(text)} characters starting {text[:50]!r}"
        expected = tok.encode(text)
        try:
            with watching(WATCH_BPE_ENCODE, called, fn):
                got = [int(i) for i in fn(text, [tuple(m) for m in merges])]
        except Exception as e:
            return _finish("bpe_encode", False, _crash(e, what), s, log)
        try:
            hf = hf_encode(text, merges)  # Hugging Face tokenizers with the same merges: a second oracle
        except ValueError:  # two merges spell the same bytes: a string-keyed vocabulary cannot hold them
            hf = expected
        if got == expected and got != hf:
            return _finish("bpe_encode", False, f"{what}\n  equal to BPETokenizer, but HF tokenizers gives "
                           f"{hf[:20]}... for the same merges: report this", s, log)
        if got != expected:
            msg = f"{what}\n  expected {len(expected)} ids, got {len(got)}"
            for piece in pretokenize(text):
                want = tok.encode(piece)
                try:
                    mine = [int(i) for i in fn(piece, [tuple(m) for m in merges])]
                except Exception:
                    break
                if mine != want:
                    vocab = tok.vocab
                    show = lambda ids, vocab=vocab: [vocab[i].decode("utf-8", "replace") if 0 <= i < len(vocab) else i
                                                     for i in ids]
                    msg += (f"\n  first piece that differs: {piece!r}\n  expected {want} = {show(want)}\n"
                            f"  got      {mine} = {show(mine)}\n  hint: among the adjacent pairs that are merges, "
                            "merge the one learned first (lowest rank), not the leftmost or the longest token")
                    break
            return _finish("bpe_encode", False, msg, s, log)
    return _finish("bpe_encode", True, f"{trials} random merge lists and texts (with multi-byte characters): the same "
                   "ids as dataset_curation.bpe.BPETokenizer.encode and as HF tokenizers given the same merges", s, log,
                   uses_reference=called or _calls_reference(fn, {"BPETokenizer", "_encode_word", "Tokenizer"}))


# ----------------------------------------------------------------------------- the incremental trainer


def _recount_bpe(text: str, num_merges: int) -> list[tuple[int, int]]:
    """BPE merges by the definition: every pair recounted over every pre-token before each merge (slow, plain)."""
    from dataset_curation.bpe import pretokenize

    words = Counter(pretokenize(text))
    seqs = {w: list(w.encode("utf-8")) for w in words}
    merges: list[tuple[int, int]] = []
    for r in range(num_merges):
        counts: Counter = Counter()
        for w, f in words.items():
            for p in zip(seqs[w], seqs[w][1:]):
                counts[p] += f
        top = max(counts.values(), default=0)
        if top < 2:
            break
        pair = min(p for p, c in counts.items() if c == top)
        merges.append(pair)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if s[i:i + 2] == list(pair):
                    out.append(256 + r)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def _timed(fn: Callable, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


@_check(hints=(
    "keep the pair counts from one merge to the next: merging a pair changes the counts of the words that hold it "
    "only. Invariant: after every merge, your counts equal a full recount over the merged words.",
    "keep, for every pair, the set of words that contain it. To merge, visit only those words: subtract each "
    "word's old pairs (times its frequency), merge, add its new pairs. To find the most frequent pair fast, push "
    "(-count, pair) on a heap whenever a count changes and skip popped entries whose count is out of date: the "
    "heap's order also gives the tie-break (the smallest pair) for free."))
def bpe_incremental(fn: Callable, trials: int = 3, seed: int | None = None, log: bool = True,
                    min_speedup: float = 3.0) -> Result:
    """fn(text, num_merges) -> merges, like check.bpe, but with pair counts updated per merge (no recount).

    The merges must equal a recount-every-merge trainer's (the definition) on random texts, and on a larger text
    fn must be at least min_speedup times faster than that recount, timed in this run.
    Reference: the recount by the definition here (and dataset_curation.bpe.train_bpe, which is watched).
    """
    s = _seed(seed)
    called = Counter()
    rng = random.Random(s)
    cases = [(_random_text(rng, rng.randint(150, 400)), rng.randint(20, 60)) for _ in range(trials)]
    cases.append((_random_text(rng, 3000), 150))  # the timed one
    for trial, (text, n) in enumerate(cases):
        timed = trial == len(cases) - 1
        what = (f"{'timed ' if timed else ''}trial {trial}: {len(text)} characters of random syllables, "
                f"num_merges={n}; text starts {text[:60]!r}")
        t_ref, expected = _timed(_recount_bpe, text, n)
        try:
            with watching(WATCH_BPE, called, fn):
                t_fn, got = _timed(fn, text, n)
                if timed:  # the faster of two runs: a busy machine slows one run, rarely both
                    t_fn = min(t_fn, _timed(fn, text, n)[0])
            got = [tuple(int(i) for i in m) for m in got]
        except Exception as e:
            return _finish("bpe_incremental", False, _crash(e, what), s, log)
        if got != expected:
            return _finish("bpe_incremental", False, _bpe_mismatch(text, got, expected, what), s, log)
        if timed and t_fn * min_speedup > t_ref:
            return _finish("bpe_incremental", False, (
                f"{what}\n  your merges are right, but they took {t_fn:.2f} s against {t_ref:.2f} s for recounting "
                f"every pair before each merge: at least {min_speedup:g}x faster is expected from updating the "
                "counts of the words that hold the merged pair only"), s, log)
    return _finish("bpe_incremental", True, (
        f"{trials} random texts and a timed one of {len(cases[-1][0]):,} characters: every merge equal to a full "
        f"recount's, {t_ref / max(t_fn, 1e-9):.1f}x faster than recounting ({t_fn:.2f} s vs {t_ref:.2f} s)"), s, log,
        uses_reference=called or _calls_reference(fn, {"train_bpe"}))


# ----------------------------------------------------------------------------- the same merges in HF tokenizers


def _byte_chars() -> list[str]:
    """The printable character byte-level BPE (GPT-2, HF ByteLevel) writes for each byte value 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def hf_tokenizer(merges: list[tuple[int, int]]):
    """A Hugging Face `tokenizers` BPE holding exactly these merges (merge r is id 256 + r), byte-level, with no
    pre-tokenizer regex of its own: feed it the pieces of dataset_curation.bpe.pretokenize (see hf_encode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    strings = _byte_chars()
    for a, b in merges:
        strings.append(strings[a] + strings[b])
    vocab = {t: i for i, t in enumerate(strings)}
    if len(vocab) != len(strings):
        raise ValueError("two merges make the same string of bytes: a string-keyed vocabulary cannot hold both ids")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(strings[a], strings[b]) for a, b in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def hf_encode(text: str, merges: list[tuple[int, int]], tok=None) -> list[int]:
    """Token ids of text from HF `tokenizers` given the same merges and the same pre-tokens as ours."""
    from dataset_curation.bpe import pretokenize

    tok = tok or hf_tokenizer(merges)
    pieces = pretokenize(text)
    return [i for e in tok.encode_batch(pieces, add_special_tokens=False) for i in e.ids] if pieces else []
