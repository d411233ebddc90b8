"""Document-level stages: the stats every stage keeps, normalization, PII masking and the train/val split.

A document is a plain dict: {"id", "text", "source", "path", "license", "kind"} with kind "code" or "prose".
A stage is a generator over documents that records in a StageStats what came in, what it kept and what it removed
and why; documents in = kept + removed, always (and the same for characters, counted on the way in).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

SAMPLES_PER_REASON = 3
_SURROGATE = re.compile(r"[\ud800-\udfff]")
SAMPLE_CHARS = 600


@dataclass
class StageStats:
    """Counts for one stage. chars_* are measured on the documents as they entered; chars_out on what left."""

    name: str
    docs_in: int = 0
    docs_kept: int = 0
    docs_removed: int = 0
    chars_in: int = 0
    chars_kept: int = 0
    chars_removed: int = 0
    chars_out: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    removed_chars: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list] = field(default_factory=dict)

    def keep(self, doc_in_chars: int, doc: dict) -> dict:
        self.docs_in += 1
        self.docs_kept += 1
        self.chars_in += doc_in_chars
        self.chars_kept += doc_in_chars
        self.chars_out += len(doc["text"])
        return doc

    def remove(self, doc: dict, reason: str, note: str = "") -> None:
        n = len(doc["text"])
        self.docs_in += 1
        self.docs_removed += 1
        self.chars_in += n
        self.chars_removed += n
        self.removed[reason] = self.removed.get(reason, 0) + 1
        self.removed_chars[reason] = self.removed_chars.get(reason, 0) + n
        bucket = self.samples.setdefault(reason, [])
        if len(bucket) < SAMPLES_PER_REASON:  # a few removed documents per reason, for the learner to look at
            text = _SURROGATE.sub("\ufffd", doc["text"][:SAMPLE_CHARS])  # JSON-safe even before normalize
            bucket.append({"id": doc["id"], "kind": doc.get("kind"), "note": note, "chars": n, "text": text})

    def count(self, key: str, n: int = 1) -> None:
        if n:
            self.counters[key] = self.counters.get(key, 0) + n

    def check(self) -> None:
        """Conservation: every document (and character) that came in was either kept or removed."""
        if self.docs_in != self.docs_kept + self.docs_removed or self.chars_in != self.chars_kept + self.chars_removed:
            raise AssertionError(f"stage {self.name}: counts do not add up: {self.to_dict()}")
        if sum(self.removed.values()) != self.docs_removed:
            raise AssertionError(f"stage {self.name}: removals by reason do not add up to docs_removed")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "docs_in", "docs_kept", "docs_removed", "chars_in",
                                              "chars_kept", "chars_removed", "chars_out", "removed",
                                              "removed_chars", "counters")}

    def merge(self, other: StageStats) -> None:
        """Add another job's counts for the same stage (the merge step of sharded runs)."""
        for k in ("docs_in", "docs_kept", "docs_removed", "chars_in", "chars_kept", "chars_removed", "chars_out"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k in ("removed", "removed_chars", "counters"):
            mine = getattr(self, k)
            for key, v in getattr(other, k).items():
                mine[key] = mine.get(key, 0) + v
        for reason, items in other.samples.items():
            bucket = self.samples.setdefault(reason, [])
            bucket.extend(items[: SAMPLES_PER_REASON - len(bucket)])


# ---------------------------------------------------------------------------------------------------------------
# 0. Licence

def licence_filter(docs: Iterable[dict], stats: StageStats) -> Iterator[dict]:
    """Stage 0. Drop documents whose distribution's licence is not permissive, or says nothing usable (the
    verdict of dataset_curation.licences, set by the installed source); documents without a verdict pass. A
    vendored copy (`pip/_vendor/certifi`) has its own verdict and its own reasons."""
    for doc in docs:
        verdict = doc.get("licence_verdict", "permissive")
        where = doc.get("vendored")
        if where and verdict != "permissive":
            reason = "vendored_not_permissive" if verdict == "not permissive" else "vendored_unknown_licence"
            said = doc.get("license") or "no dist-info or licence file says what it is"
            stats.remove(doc, reason, f"{doc.get('dist')}: vendored {where}: {said}")
        elif verdict == "not permissive":
            stats.remove(doc, "not_permissive", f"{doc.get('dist')}: {doc.get('license')}")
        elif verdict == "unknown":
            stats.remove(doc, "unknown_licence", f"{doc.get('dist')} declares no licence we can read")
        else:
            yield stats.keep(len(doc["text"]), doc)


# ---------------------------------------------------------------------------------------------------------------
# 1. Normalize

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200c\u200d\u2060\ufeff]")
_TRAILING_WS = re.compile(r"[ \t\u00a0]+$", re.MULTILINE)
_MANY_BLANKS = re.compile(r"\n{3,}")
_INLINE_WS = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]{2,}|[\t\u00a0\u2000-\u200a\u202f\u205f\u3000]")
# Lines that carry no content for a language model: licence and copyright notices, "generated" banners.
_BOILER = (r"(copyright\b|\(c\)\s*\d{4}|all rights reserved|licensed under the|permission is hereby granted|"
    r"this (?:file|program|library) is free software|without warranty of any kind|"
    r"distributed under the|see the license|spdx-license-identifier)[^\n]*$")
_BOILER_HINTS = ("copyright", "(c)", "rights reserved", "licensed under", "permission is hereby", "free software",
                 "without warranty", "distributed under", "the license", "spdx")
BOILERPLATE = re.compile(r"^[ \t#*/;\-]*" + _BOILER, re.IGNORECASE | re.MULTILINE)
BOILERPLATE_CODE = re.compile(r"^[ \t]*#[ \t#*]*" + _BOILER, re.IGNORECASE | re.MULTILINE)  # comments only


def normalize_text(text: str, kind: str = "prose") -> tuple[str, dict[str, int]]:
    """One document's text normalized, and what was changed: invalid bytes (lone surrogates from a lenient decode)
    -> U+FFFD, newlines -> \\n, Unicode NFC, control and zero-width characters dropped, trailing whitespace
    stripped, at most one blank line in a row, boilerplate lines dropped; prose also gets inner whitespace runs
    collapsed (code keeps its indentation)."""
    counts: dict[str, int] = {}
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text, n = _SURROGATE.subn("\ufffd", text)
        counts["invalid_bytes_replaced"] = n
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        nfc = unicodedata.normalize("NFC", text)
        if nfc != text:
            counts["nfc_changed_docs"] = 1
            text = nfc
    text, n = _CONTROL.subn("", text)
    counts["control_chars_removed"] = n
    low = text.lower()
    if any(k in low for k in _BOILER_HINTS):
        text, n = (BOILERPLATE_CODE if kind == "code" else BOILERPLATE).subn("", text)
        counts["boilerplate_lines_removed"] = n
    if kind != "code":
        text = _INLINE_WS.sub(" ", text)
    if " \n" in text or "\t\n" in text or "\u00a0\n" in text:  # the regex is slow, and rarely needed
        text = _TRAILING_WS.sub("", text)
    if "\n\n\n" in text:
        text = _MANY_BLANKS.sub("\n\n", text)
    text = text.strip("\n").rstrip()
    if kind != "code":
        text = text.strip()
    return text, counts


def normalize(docs: Iterable[dict], stats: StageStats, max_replacement_fraction: float = 0.01) -> Iterator[dict]:
    """Stage 1. Normalize every document (see normalize_text); drop those left empty and binary-looking ones
    (NUL bytes, or more than max_replacement_fraction of characters undecodable)."""
    for doc in docs:
        raw = doc["text"]
        if "\x00" in raw:
            stats.remove(doc, "binary", "contains NUL bytes")
            continue
        text, counts = normalize_text(raw, doc.get("kind", "prose"))
        for k, v in counts.items():
            stats.count(k, v)
        bad = text.count("\ufffd")
        if bad > max_replacement_fraction * max(len(text), 1):
            stats.remove(doc, "binary", f"{bad} undecodable characters out of {len(text)}")
            continue
        if not text.strip():
            stats.remove(doc, "empty", "nothing left after normalization")
            continue
        yield stats.keep(len(raw), {**doc, "text": text})


# ---------------------------------------------------------------------------------------------------------------
# 3. PII

# Regexes anchored on a literal ("@", ".") are found quickly; the address is then checked around the anchor.
_EMAIL_DOMAIN = re.compile(r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,})\b")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+-]{1,64}$")
# Boundaries: an address may sit before a full stop, comma or colon ending a sentence ("at 192.0.2.1."), but not
# inside a longer dotted or coloned run ("1.2.3.4.5" is a version, "a:b:c:d:e" a slice or a time).
IPV4 = re.compile(r"(?<!\w)(?<!\d\.)\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)")
_IPV6_CANDIDATE = re.compile(r"(?<![\w.])(?<![0-9A-Fa-f:]:)[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"
                             r"(?!\w|:[\w:])")
_IPV4_HINT = re.compile(r"\.\d{1,3}\.\d{1,3}\.")
_IPV6_HINT = re.compile(r"::|:[0-9A-Fa-f]{1,4}:")
EMAIL_MASK = "<EMAIL>"
IP_MASK = "<IP_ADDRESS>"


def _mask_emails(text: str) -> tuple[str, int]:
    out, last, n = [], 0, 0
    for m in _EMAIL_DOMAIN.finditer(text):
        local = _EMAIL_LOCAL.search(text, max(last, m.start() - 64), m.start())
        if not local:
            continue
        # the address starts at its first letter or digit: "...jo@x.org" and "-jo@x.org" mask "jo@x.org"
        start = local.start() + len(local.group(0)) - len(local.group(0).lstrip("._%+-"))
        if start == m.start():
            continue
        out.append(text[last:start])
        out.append(EMAIL_MASK)
        last = m.end()
        n += 1
    return ("".join(out) + text[last:], n) if n else (text, 0)


def _ipv4(m: re.Match) -> str:
    return IP_MASK if all(int(x) <= 255 for x in m.group(0).split(".")) else m.group(0)


def _ipv6(m: re.Match) -> str:
    s, tail = m.group(0), ""
    if s.endswith(":") and not s.endswith("::"):  # a colon after the address ends the sentence, it is not a group
        s, tail = s[:-1], ":"
    # "x[1::2]" is a slice, not an address: ask for enough hex digits and a real parse
    if sum(c in "0123456789abcdefABCDEF" for c in s) < 4:
        return m.group(0)
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return m.group(0)
    return IP_MASK + tail


def mask_pii_text(text: str) -> tuple[str, int, int]:
    """Text with e-mail addresses and IPv4/IPv6 addresses masked; returns (text, n_emails, n_ips)."""
    n_email = 0
    if "@" in text:
        text, n_email = _mask_emails(text)
    before = text.count(IP_MASK)
    if _IPV4_HINT.search(text):  # the full patterns are slow; a literal-led hint skips most documents
        text = IPV4.sub(_ipv4, text)
    if _IPV6_HINT.search(text):
        text = _IPV6_CANDIDATE.sub(_ipv6, text)
    return text, n_email, text.count(IP_MASK) - before


def mask_pii(docs: Iterable[dict], stats: StageStats) -> Iterator[dict]:
    """Stage 3. Mask e-mail and IP addresses (counted); removes nothing."""
    for doc in docs:
        text, n_email, n_ip = mask_pii_text(doc["text"])
        stats.count("emails_masked", n_email)
        stats.count("ips_masked", n_ip)
        stats.count("docs_with_pii", int(bool(n_email or n_ip)))
        yield stats.keep(len(doc["text"]), {**doc, "text": text} if (n_email or n_ip) else doc)


# ---------------------------------------------------------------------------------------------------------------
# 7. Split

def split_of(doc_id: str, val_fraction: float, seed: int = 0) -> str:
    """'val' or 'train' from a hash of the document id: the same document always lands on the same side."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def split_train_val(docs: list[dict], stats: StageStats, val_fraction: float = 0.01, seed: int = 0) -> list[dict]:
    """Stage 7. Tag every document with "split" by a deterministic hash of its "group" (default: its id), so
    documents of one group (a source file's code and its prose) stay together; whole documents only.

    If the hash puts no document in val (tiny corpora), the document with the smallest hash goes there, so both
    splits exist; a corpus of one document cannot be split and raises ValueError.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise ValueError(f"only {len(docs)} document(s) survived curation; train and val need at least one whole "
                         "document each: add more input text or loosen the filters")
    key = lambda d: d.get("group", d["id"])
    out = [{**d, "split": split_of(key(d), val_fraction, seed)} for d in docs]
    if not any(d["split"] == "val" for d in out):
        i = min(range(len(out)), key=lambda k: hashlib.sha256(f"{seed}:{key(out[k])}".encode()).digest())
        out[i]["split"] = "val"
        stats.count("forced_one_val_doc")
    if all(d["split"] == "val" for d in out):
        out[0]["split"] = "train"
    for d in out:
        stats.keep(len(d["text"]), d)
        stats.count(f"{d['split']}_docs")
    return out
