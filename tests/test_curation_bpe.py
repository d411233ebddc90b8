"""From-scratch byte-level BPE: round trips, special tokens, training semantics, and compression vs `tokenizers`."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest

from dataset_curation.bpe import EOT, BPETokenizer, pretokenize, train_bpe


def stdlib_text(n_chars: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for p in sorted(root.glob("*.py")):
        parts.append(p.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size >= n_chars:
            break
    return "".join(parts)[:n_chars]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return train_bpe(stdlib_text(60_000), vocab_size=400)


def random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4E80), (0x1F600, 0x1F64F),
              (0x0300, 0x036F), (0x9, 0xD)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_pretokenize_covers_the_text():
    rng = random.Random(0)
    for _ in range(50):
        text = random_unicode(rng, 200)
        assert "".join(pretokenize(text)) == text
    assert pretokenize("Hello world, it's 2024!\n  x") == ["Hello", " world", ",", " it", "'s", " 2024", "!", "\n ",
                                                          " x"]


def test_round_trip_on_random_unicode(tok):
    rng = random.Random(1)
    for _ in range(100):
        text = random_unicode(rng, rng.randint(0, 300))
        assert tok.decode(tok.encode(text)) == text


def test_vocab_size_and_merges(tok):
    assert tok.vocab_size == 400
    assert len(tok.merges) == 400 - 256 - 1
    assert tok.special_tokens == {EOT: 399}
    # every merged token is the concatenation of its parts, and merges only use earlier tokens
    for r, (a, b) in enumerate(tok.merges):
        assert a < 256 + r and b < 256 + r
        assert tok.vocab[256 + r] == tok.vocab[a] + tok.vocab[b]


def test_special_tokens_are_never_split_or_merged_across(tok):
    text = f"def f():{EOT}return 1{EOT}{EOT}x"
    ids = tok.encode(text)
    assert ids.count(tok.special_tokens[EOT]) == 3
    assert tok.decode(ids) == text
    # the pieces between special tokens encode exactly as they do on their own
    assert ids[: ids.index(399)] == tok.encode("def f():")
    # without allow_special the marker is ordinary text, several tokens, none of them the special id
    plain = tok.encode(EOT, allow_special=False)
    assert 399 not in plain and len(plain) > 1 and tok.decode(plain) == EOT
    # special strings in training text are cut out before counting: no learned token contains one
    t2 = train_bpe((f"ab{EOT}" * 200), vocab_size=300)
    assert all(b"<|" not in v for v in t2.vocab[256:-1])


def test_training_follows_the_most_frequent_pair():
    t = train_bpe("aaab " * 50 + "xy " * 10, vocab_size=256 + 3 + 1)
    # "aa" occurs 100 times; then (aa, a) and (a, b) tie at 50 and the smaller pair of ids, (a, b), wins
    assert [t.vocab[256 + r] for r in range(3)] == [b"aa", b"ab", b"aaab"]
    assert train_bpe("abc", vocab_size=300).merges == []  # no pair occurs twice: stops early


def test_training_is_deterministic_and_saves(tmp_path):
    text = stdlib_text(20_000)
    a, b = train_bpe(text, 350), train_bpe([text[:10_000], text[10_000:]], 350)
    assert a.merges == train_bpe(text, 350).merges
    assert len(b.merges) == len(a.merges)
    a.save(tmp_path / "bpe.json")
    c = BPETokenizer.load(tmp_path / "bpe.json")
    assert c.merges == a.merges and c.encode(text[:500]) == a.encode(text[:500])
    with pytest.raises(ValueError, match="smaller than 256"):
        train_bpe(text, 200)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        a.decode([1, 10_000])


def test_compression_close_to_tokenizers():
    """Same text, same vocab size: our bytes/token on held-out text is within 10% of the library's."""
    from dataset_curation.shards import train_tokenizer

    text = stdlib_text(300_000)
    train, held = text[:250_000], text[250_000:]
    ours = train_bpe(train, 600)
    lib = train_tokenizer([train], 600, min_frequency=2)
    n = len(held.encode())
    ours_bpt = n / len(ours.encode(held))
    lib_bpt = n / len(lib.encode(held).ids)
    assert ours_bpt > 1.5 and abs(ours_bpt - lib_bpt) / lib_bpt < 0.10, (ours_bpt, lib_bpt)


def test_library_tokenizer_round_trips_random_unicode():
    """The production tokenizer (tokenizers, byte-level) decodes back to any input text, EOT included."""
    from dataset_curation.shards import EOT as LIB_EOT
    from dataset_curation.shards import train_tokenizer

    lib = train_tokenizer([stdlib_text(50_000)], 500)
    rng = random.Random(2)
    for _ in range(100):
        text = random_unicode(rng, rng.randint(0, 300))
        assert lib.decode(lib.encode(text).ids, skip_special_tokens=False) == text
    ids = lib.encode(f"a{LIB_EOT}b").ids
    assert lib.token_to_id(LIB_EOT) in ids
