"""Which installed distributions may go into the corpus: their licence from the package metadata.

    licence_of(metadata) -> ("MIT", "permissive") | ("MPL-2.0 AND MIT", "not permissive") | ("", "unknown")
    licence_of_text(text) -> ("MPL", "not permissive")      # a LICENSE file's text (vendored copies)

Like The Stack's permissive subset, a file is used only when its licence is known to be permissive, and the verdict
is conservative: permissive only when everything the metadata declares is permissive. Every declaration counts:
the `License-Expression` (an SPDX expression, PEP 639), each `License ::` trove classifier, and the free-text
`License` field (an SPDX expression, one licence's name, or a whole licence text). Any declaration that is not
permissive makes the verdict "not permissive"; else any declaration we cannot read (an unparsable expression, an
unrecognised classifier such as Other/Proprietary or EUPL, free text naming two licences or words beyond one
licence's name, such as "Commercial license, not MIT") makes it "unknown".

In an SPDX expression an AND needs every part permissive, an OR any one; ids are case-insensitive; a `WITH`
exception keeps the result permissive only for exceptions that just add permissions (LLVM-exception). Weak
copyleft (MPL, LGPL, EPL) is not permissive here: MPL-2.0 keeps each covered file under the MPL, so copying its
files into a corpus that is redistributed (token shards) carries file-level conditions the permissive licences do
not. `tqdm` ("MPL-2.0 AND MIT") and `certifi` (MPL-2.0) are left out for this reason.
"""

from __future__ import annotations

import re

PERMISSIVE = frozenset({
    "MIT", "MIT-0", "MIT-CMU", "X11", "0BSD", "BSD-1-Clause", "BSD-2-Clause", "BSD-3-Clause", "BSD-3-Clause-Clear",
    "BSD-4-Clause", "Apache-1.1", "Apache-2.0", "PSF-2.0", "Python-2.0", "CNRI-Python", "ISC", "Zlib", "BSL-1.0",
    "CC0-1.0", "Unlicense", "HPND", "NCSA", "UPL-1.0", "WTFPL", "Public-Domain",
})
EXCEPTIONS = frozenset({"LLVM-exception"})  # only add permissions ("Apache-2.0 WITH LLVM-exception")
_CANONICAL = {i.upper(): i for i in PERMISSIVE | EXCEPTIONS}  # SPDX ids are case-insensitive
# SPDX ids of copyleft licences (so "MPL-2.0 AND MIT" in the free-text field parses as an expression)
_COPYLEFT = re.compile(r"(MPL|LGPL|GPL|AGPL|EPL|EUPL|CDDL|CPL|OSL|CECILL|Artistic)-[\d.]+(-only|-or-later|\+)?$",
                       re.IGNORECASE)
# Licence names in classifiers and short free text, lowercased -> id. Matched in order; each match blanks its span
# so "GNU Lesser General Public License" is LGPL only, not also GPL.
_NAMES = [
    (r"\bmit no attribution\b|\bmit[- ]?0\b", "MIT-0"), (r"\bmit[- ]cmu\b", "MIT-CMU"),
    (r"\bmit(/x11)?\b|\bexpat\b", "MIT"),
    (r"\b0bsd\b|\bzero[- ]clause bsd\b|\bbsd zero[- ]clause\b", "0BSD"),
    (r"\b(2[- ]clause|two[- ]clause|simplified|freebsd)[- ]bsd\b|\bbsd[- ](2|two)([- ]clause)?\b", "BSD-2-Clause"),
    (r"\b(4[- ]clause|original)[- ]bsd\b|\bbsd[- ]4([- ]clause)?\b", "BSD-4-Clause"),
    (r"\b(3[- ]clause|three[- ]clause|new|modified|revised)[- ]bsd\b|\bbsd[- ](3|three)([- ]clause)?\b",
     "BSD-3-Clause"), (r"\bbsd\b", "BSD"),
    (r"\bapache( software)?( license)?,?( version| v)? ?1\.1\b", "Apache-1.1"), (r"\bapache\b", "Apache-2.0"),
    (r"python software foundation|\bpsfl?\b|\bpsf-2\.0\b|\bpython license\b", "PSF-2.0"), (r"\biscl?\b", "ISC"),
    (r"\bzlib(/libpng)?\b", "Zlib"), (r"\bboost\b|\bbsl\b", "BSL-1.0"), (r"\bcc0\b", "CC0-1.0"),
    (r"\bunlicense\b", "Unlicense"), (r"\bpublic domain\b", "Public-Domain"),
    (r"historical permission notice and disclaimer|\bhpnd\b", "HPND"),
    (r"university of illinois/ncsa open source|\bncsa\b", "NCSA"), (r"universal permissive|\bupl\b", "UPL-1.0"),
    (r"\bwtfpl\b", "WTFPL"),
    (r"mozilla public licen[cs]e|\bmpl\b", "MPL"),
    (r"(gnu )?(library or lesser|library|lesser) general public licen[cs]e|\blgpl\w*\+?", "LGPL"),
    (r"(gnu )?affero general public licen[cs]e|\bagpl\w*\+?", "AGPL"),
    (r"(gnu )?general public licen[cs]e|\bgpl\w*\+?|\bgnu\b", "GPL"),
    (r"eclipse public licen[cs]e|\bepl\b", "EPL"),
]
# words that may stand beside one licence's name ("The MIT License", "Apache Software License, Version 2.0")
_FILLER = frozenset({"the", "license", "licence", "licensed", "licenses", "licences", "version", "v", "software",
                     "clause", "style", "like", "or", "later", "only", "any", "universal", "dedication", "agreement"})
# whole licence texts, recognised by a sentence each one contains
_TEXTS = [
    ("permission is hereby granted, free of charge", "MIT"),
    ("redistribution and use in source and binary forms", "BSD"),
    ("licensed under the apache license", "Apache-2.0"), ("apache license, version 2.0", "Apache-2.0"),
    ("apache license version 2.0", "Apache-2.0"),
    ("python software foundation license", "PSF-2.0"), ("psf license agreement", "PSF-2.0"),
    ("permission to use, copy, modify, and/or distribute this software for any purpose", "ISC"),
    ("permission to use, copy, modify, and distribute this software for any purpose with or without fee", "ISC"),
    ("permission to use, copy, modify, and distribute this software and its documentation for any purpose",
     "HPND"),
    ("this is free and unencumbered software released into the public domain", "Unlicense"),
    ("altered source versions must be plainly marked as such", "Zlib"), ("boost software license", "BSL-1.0"),
    ("cc0 1.0 universal", "CC0-1.0"), ("public domain", "Public-Domain"),
    ("mozilla public license", "MPL"), ("gnu lesser general public license", "LGPL"),
    ("gnu library general public license", "LGPL"), ("gnu affero general public license", "AGPL"),
    ("gnu general public license", "GPL"), ("eclipse public license", "EPL"),
    ("european union public licen", "EUPL"), ("artistic license", "Artistic"),
    ("common development and distribution license", "CDDL"),
]
# a licence whose own text names another of the same verdict: the LGPL text cites the GPL, the Unlicense and CC0
# dedicate to the public domain. Absorbing one into the other never changes a verdict.
_ABSORBS = {"LGPL": {"GPL"}, "AGPL": {"GPL"}, "Unlicense": {"Public-Domain"}, "CC0-1.0": {"Public-Domain"}}
_NOT_A_LICENCE = ("unknown", "none", "license.txt", "license", "see license", "see license file", "")
_UNINFORMATIVE_CLASSIFIERS = ("osi approved", "dfsg approved")
# names that say which family but not which member; every member is permissive ("BSD License": 2-, 3- or 4-clause)
PERMISSIVE_FAMILIES = frozenset({"BSD"})
PERMISSIVE_V, NOT_PERMISSIVE_V, UNKNOWN_V = "permissive", "not permissive", "unknown"


def spdx_permissive(expression: str) -> bool | None:
    """Whether an SPDX expression allows use under permissive terms: True, False, or None (unparsable).
    Ids are case-insensitive; `X WITH exc` is permissive only when X is and exc is in EXCEPTIONS."""
    tokens = re.findall(r"\(|\)|[^\s()]+", expression)
    pos = 0

    def peek():
        return tokens[pos].upper() if pos < len(tokens) else None

    def take():
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError("unexpected end")
        pos += 1
        return tokens[pos - 1]

    def factor():
        if peek() == "(":
            take()
            v = expr()
            if take() != ")":
                raise ValueError("unbalanced parentheses")
            return v
        lic = take()
        if lic.upper() in ("AND", "OR", "WITH", ")") or not re.fullmatch(r"[A-Za-z0-9.+:-]+", lic):
            raise ValueError(f"unexpected {lic}")
        ok = _CANONICAL.get(lic.rstrip("+").upper()) in PERMISSIVE
        if peek() == "WITH":
            take()
            exception = take()  # always consumed, whatever the licence before it
            if exception.upper() in ("AND", "OR", "WITH", "(", ")"):
                raise ValueError(f"WITH needs an exception, got {exception}")
            ok = ok and _CANONICAL.get(exception.upper()) in EXCEPTIONS
        return ok

    def term():
        v = factor()
        while peek() == "AND":
            take()
            v = factor() and v
        return v

    def expr():
        v = term()
        while peek() == "OR":
            take()
            v = term() or v
        return v

    try:
        v = expr()
        if pos != len(tokens):
            raise ValueError("trailing tokens")
        return v
    except ValueError:
        return None


def _verdict(ids: set[str]) -> str:
    return PERMISSIVE_V if all(i in PERMISSIVE | PERMISSIVE_FAMILIES for i in ids) else NOT_PERMISSIVE_V


def _absorb(ids: set[str]) -> set[str]:
    return {i for i in ids if not any(i in _ABSORBS.get(j, ()) for j in ids)}


def licence_of_name(text: str) -> tuple[str, str] | None:
    """One licence's name ("The MIT License", "GPLv3+", "BSD-style") -> (id, verdict); ("", "unknown") when it names
    several licences or says more than a name; None when it says nothing ("UNKNOWN", "see LICENSE")."""
    low = " ".join(text.strip().lower().split())
    if low.rstrip(".") in _NOT_A_LICENCE:
        return None
    ids = set()
    for pattern, spdx in _NAMES:
        low, n = re.subn(pattern, " ", low)
        if n:
            ids.add(spdx)
    ids = _absorb(ids)
    rest = [w for w in re.findall(r"[a-z]+", low) if w not in _FILLER]
    if len(ids) != 1 or rest:
        return "", UNKNOWN_V
    (spdx,) = ids
    return spdx, _verdict(ids)


def licence_of_text(text: str) -> tuple[str, str]:
    """A whole licence text (a LICENSE file, or one pasted into the License field) -> (id, verdict). Known only when
    exactly one licence is recognised in it: a GPL text that quotes an MIT sentence is "unknown"."""
    low = " ".join(text.lower().split())
    ids = {spdx for phrase, spdx in _TEXTS if phrase in low}
    if "BSD" in ids:
        ids.discard("BSD")
        ids.add("BSD-4-Clause" if "advertising materials" in low else
                "BSD-3-Clause" if "neither the name" in low or "names of its contributors" in low else "BSD-2-Clause")
    ids = _absorb(ids)
    if len(ids) != 1:
        return "", UNKNOWN_V
    (spdx,) = ids
    return spdx, _verdict(ids)


def _free_text(text: str) -> tuple[str, str] | None:
    if not text:
        return None
    words = [t for t in re.findall(r"[^\s()]+", text) if t.upper() not in ("AND", "OR", "WITH")]
    if "\n" not in text and all(_CANONICAL.get(w.rstrip("+").upper()) or _COPYLEFT.match(w) for w in words):
        ok = spdx_permissive(text)  # an SPDX expression in the free-text field ("MPL-2.0 AND MIT", "mit")
        if ok is not None:
            return text, PERMISSIVE_V if ok else NOT_PERMISSIVE_V
    if len(text) > 120 or "\n" in text:
        return licence_of_text(text)
    return licence_of_name(text)


def _classifiers(metadata) -> list[tuple[str, str]]:
    found = []
    for c in metadata.get_all("Classifier") or []:
        parts = [p.strip() for p in c.split("::")]
        if parts[0] != "License" or len(parts) < 2 or parts[-1].lower() in _UNINFORMATIVE_CLASSIFIERS:
            continue
        found.append(_named(licence_of_name(parts[-1]) or ("", UNKNOWN_V), parts[-1]))  # Other/Proprietary: unknown
    return found


def _named(result: tuple[str, str], raw: str) -> tuple[str, str]:
    """An unreadable declaration keeps its own words (shortened, quoted), so the ledger says what was declared."""
    if result[0]:
        return result
    raw = " ".join(raw.split())
    return f'"{raw[:40]}{"..." if len(raw) > 40 else ""}"', result[1]


def licence_of(metadata) -> tuple[str, str]:
    """(licence as declared, verdict) for a distribution's metadata; verdict is "permissive", "not permissive"
    or "unknown" (nothing declared, or something declared that we cannot read)."""
    declared: list[tuple[str, str]] = []
    expression = (metadata.get("License-Expression") or "").strip()
    if expression:
        ok = spdx_permissive(expression)
        declared.append((expression, UNKNOWN_V if ok is None else PERMISSIVE_V if ok else NOT_PERMISSIVE_V))
    declared += _classifiers(metadata)
    raw = (metadata.get("License") or "").strip()
    text = _free_text(raw)
    if text:
        declared.append(_named(text, raw))
    if not declared:
        return "", UNKNOWN_V
    verdicts = {v for _, v in declared}
    verdict = (NOT_PERMISSIVE_V if NOT_PERMISSIVE_V in verdicts else UNKNOWN_V if UNKNOWN_V in verdicts
               else PERMISSIVE_V)
    names = list(dict.fromkeys(f"({n})" if " OR " in n.upper() and len(declared) > 1 else n for n, _ in declared))
    names = [n for n in names if not any(m.startswith(f"{n}-") for m in names)]  # "MPL AND MPL-2.0": MPL-2.0
    return " AND ".join(names), verdict
