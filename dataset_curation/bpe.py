"""Byte-level BPE from scratch, for teaching: the trainer and the encoder, in plain Python.

    tok = train_bpe(text, vocab_size=1000)          # 256 byte tokens + merges + "<|endoftext|>"
    ids = tok.encode("hello<|endoftext|>world")     # the special token is one id, never split or merged across
    assert tok.decode(ids) == "hello<|endoftext|>world"

Training: split text into pre-tokens (GPT-2's pattern: words with their leading space, numbers, punctuation runs,
whitespace), count them, then repeatedly merge the most frequent adjacent pair of tokens inside pre-tokens into a
new token. Pair counts are updated incrementally (only the words that contain the merged pair are touched) and the
best pair comes off a heap with lazy deletion, so 1 MB of text trains to vocab 1,000 in seconds. Ties go to the
smallest pair of ids, so training is deterministic. Because the base alphabet is all 256 bytes, any string
encodes, and decode(encode(text)) == text for every str that is valid Unicode.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer with the stdlib `re`: \p{L} ~ [^\W\d_], \p{N} ~ \d, and the rest (incl. "_") punctuation.
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""


def pretokenize(text: str, pattern: str = PATTERN) -> list[str]:
    """The pre-tokens of text; they concatenate back to text exactly."""
    return re.findall(pattern, text)


def _merge_word(word: tuple[int, ...], a: int, b: int, new: int) -> tuple[int, ...]:
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_bpe(text: str | Iterable[str], vocab_size: int, special_tokens: Iterable[str] = (EOT,),
              pattern: str = PATTERN, progress: bool = False) -> BPETokenizer:
    """Train a byte-level BPE tokenizer with vocab_size tokens in all (256 bytes + merges + special tokens).

    text: one string or an iterable of documents. Special tokens appearing in the text are cut out before
    counting, so no merge ever spans one. Stops early when no pair occurs twice.
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 byte tokens + {len(special_tokens)} special")
    docs = [text] if isinstance(text, str) else text
    split = _special_splitter(special_tokens)
    counts: Counter = Counter()
    for doc in docs:
        for piece in split(doc) if split else [doc]:
            if piece not in special_tokens:
                counts.update(re.findall(pattern, piece))
    words = [tuple(w.encode("utf-8", "surrogatepass")) for w in counts]
    freqs = list(counts.values())
    pair_count: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for i, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pair_count[p] += f
            where.setdefault(p, set()).add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_merges, desc="bpe merges", disable=not progress, leave=False)
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue  # a stale entry: the pair's count changed after it was pushed
        if -neg < 2:
            break  # nothing left that occurs twice
        new = 256 + len(merges)
        merges.append(pair)
        changed: set[tuple[int, int]] = set()
        for i in where.pop(pair, ()):
            old, f = words[i], freqs[i]
            w = _merge_word(old, pair[0], pair[1], new)
            if len(w) == len(old):
                continue  # an index left over from an earlier merge: the pair is no longer in this word
            for p in zip(old, old[1:]):  # take the word's old pairs out, put its new pairs in
                pair_count[p] -= f
                changed.add(p)
            for p in zip(w, w[1:]):
                pair_count[p] += f
                where.setdefault(p, set()).add(i)
                changed.add(p)
            words[i] = w
        pair_count.pop(pair, None)
        for p in changed:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_count.pop(p, None)
        bar.update()
    bar.close()
    return BPETokenizer(merges, special_tokens, pattern)


def _special_splitter(special_tokens: list[str]):
    if not special_tokens:
        return None
    # longest first, so a special token that contains another one wins
    rx = re.compile("(" + "|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True)) + ")")
    return rx.split


class BPETokenizer:
    """A trained byte-level BPE: merges in rank order, special tokens after them.

    Ids 0..255 are the bytes; id 256 + r is the token made by merge r; special tokens follow the merges.
    """

    def __init__(self, merges: list[tuple[int, int]], special_tokens: Iterable[str] = (EOT,),
                 pattern: str = PATTERN):
        self.merges = [tuple(m) for m in merges]
        self.pattern = pattern
        self._rx = re.compile(pattern)
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self.vocab = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.special_tokens = {s: len(self.vocab) + k for k, s in enumerate(dict.fromkeys(special_tokens))}
        for s in self.special_tokens:
            self.vocab.append(s.encode("utf-8"))
        self._split = _special_splitter(list(self.special_tokens))
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        seq = list(word.encode("utf-8", "surrogatepass"))
        while len(seq) > 1:
            # merge the adjacent pair that was learned first, everywhere in the word, then look again
            best = min(zip(seq, seq[1:]), key=lambda p: self.ranks.get(p, 1 << 30))
            rank = self.ranks.get(best)
            if rank is None:
                break
            seq = list(_merge_word(tuple(seq), best[0], best[1], 256 + rank))
        if len(self._cache) < 200_000:
            self._cache[word] = seq
        return seq

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of text. With allow_special, each special-token string becomes its single id; without it,
        special-token strings are encoded as ordinary text."""
        pieces = self._split(text) if (allow_special and self._split) else [text]
        ids: list[int] = []
        for piece in pieces:
            if not piece:
                continue
            sid = self.special_tokens.get(piece) if allow_special else None
            if sid is not None:
                ids.append(sid)
                continue
            for word in self._rx.findall(piece):
                ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; invalid UTF-8 (e.g. a multi-byte character cut in half) becomes U+FFFD."""
        try:
            data = b"".join(self.vocab[i] for i in ids)
        except (IndexError, TypeError):
            bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < len(self.vocab)]
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{len(self.vocab) - 1})") from None
        return data.decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "byte-level-bpe", "pattern": self.pattern,
                                          "merges": self.merges, "special_tokens": list(self.special_tokens)}))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        d = json.loads(Path(path).read_text())
        return cls([tuple(m) for m in d["merges"]], d["special_tokens"], d["pattern"])
