"""Which installed distributions may go into the corpus: their licence from the package metadata.

    licence_of(metadata) -> ("MIT", "permissive") | ("MPL-2.0 AND MIT", "not permissive") | ("", "unknown")

Like The Stack's permissive subset, a file is used only when its distribution declares a permissive licence. The
declaration is read in the order of how precise it is: `License-Expression` (an SPDX expression, PEP 639), then the
`License ::` trove classifiers, then the free-text `License` field (a name, or a whole licence text whose wording
identifies it). An SPDX AND needs every part permissive, an OR any one. Several classifiers count as AND (they may
describe different files).

Weak copyleft (MPL, LGPL, EPL) is not permissive here: MPL-2.0 keeps each covered file under the MPL, so copying
its files into a corpus that is redistributed (token shards) carries file-level conditions the permissive licences
do not. `tqdm` ("MPL-2.0 AND MIT") and `certifi` (MPL-2.0) are left out for this reason.
"""

from __future__ import annotations

import re

PERMISSIVE = frozenset({
    "MIT", "MIT-0", "MIT-CMU", "X11", "0BSD", "BSD-1-Clause", "BSD-2-Clause", "BSD-3-Clause", "BSD-3-Clause-Clear",
    "BSD-4-Clause", "Apache-1.1", "Apache-2.0", "PSF-2.0", "Python-2.0", "CNRI-Python", "ISC", "Zlib", "BSL-1.0",
    "CC0-1.0", "Unlicense", "HPND", "NCSA", "UPL-1.0", "WTFPL", "Public-Domain",
})
EXCEPTIONS = frozenset({"LLVM-exception"})  # only add permissions ("Apache-2.0 WITH LLVM-exception")
# classifiers and free-text names, lowercased, to SPDX ids (None: says nothing)
_NAMES = [
    (r"\bmit[- ]?0\b", "MIT-0"), (r"\bmit[- ]cmu\b", "MIT-CMU"), (r"\bmit\b|expat", "MIT"),
    (r"0bsd|zero-clause bsd", "0BSD"), (r"\bbsd\b.*\b2\b|2-clause|simplified bsd|freebsd", "BSD-2-Clause"),
    (r"\bbsd", "BSD-3-Clause"), (r"apache", "Apache-2.0"),
    (r"python software foundation|\bpsfl?\b|\bpsf-2\.0\b|python license", "PSF-2.0"), (r"\bisc\b|iscl", "ISC"),
    (r"zlib", "Zlib"), (r"boost", "BSL-1.0"), (r"\bcc0\b", "CC0-1.0"), (r"unlicense", "Unlicense"),
    (r"public domain", "Public-Domain"), (r"historical permission", "HPND"),
    (r"mozilla|\bmpl\b", "MPL-2.0"), (r"lesser general public|\blgpl", "LGPL"), (r"eclipse|\bepl\b", "EPL"),
    (r"affero|\bagpl", "AGPL"), (r"general public|\bgpl\b|\bgnu\b", "GPL"),
]
# whole licence texts pasted into the License field, recognised by a sentence each one contains
_TEXTS = [
    ("permission is hereby granted, free of charge", "MIT"),
    ("redistribution and use in source and binary forms", "BSD-3-Clause"),
    ("licensed under the apache license", "Apache-2.0"), ("apache license", "Apache-2.0"),
    ("python software foundation", "PSF-2.0"), ("gnu general public license", "GPL"),
    ("mozilla public license", "MPL-2.0"),
]
_COPYLEFT = re.compile(r"(MPL|LGPL|GPL|AGPL|EPL|EUPL|CDDL|CPL|OSL)-[\d.]+")
_NOT_A_LICENCE = ("unknown", "none", "other", "other/proprietary license", "license.txt", "see license", "")


def _name_to_id(text: str) -> str | None:
    low = text.strip().lower()
    if low in _NOT_A_LICENCE:
        return None
    if len(low) > 120:  # a whole licence text
        return next((spdx for phrase, spdx in _TEXTS if phrase in " ".join(low.split())), None)
    return next((spdx for pattern, spdx in _NAMES if re.search(pattern, low)), None)


def spdx_permissive(expression: str) -> bool | None:
    """Whether an SPDX expression allows use under permissive terms: True, False, or None (unparsable)."""
    tokens = re.findall(r"\(|\)|[^\s()]+", expression)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
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
        if lic.upper() in ("AND", "OR", "WITH", ")"):
            raise ValueError(f"unexpected {lic}")
        ok = lic.rstrip("+") in PERMISSIVE
        if peek() and peek().upper() == "WITH":
            take()
            ok = ok and take() in EXCEPTIONS
        return ok

    def term():
        v = factor()
        while peek() and peek().upper() == "AND":
            take()
            v = factor() and v
        return v

    def expr():
        v = term()
        while peek() and peek().upper() == "OR":
            take()
            v = term() or v
        return v

    try:
        v = expr()
        if pos != len(tokens):
            raise ValueError("trailing tokens")
        return v
    except (ValueError, IndexError):
        return None


def licence_of(metadata) -> tuple[str, str]:
    """(licence as declared, verdict) for a distribution's metadata; verdict is "permissive", "not permissive"
    or "unknown" (nothing usable declared)."""
    expression = (metadata.get("License-Expression") or "").strip()
    if expression:
        ok = spdx_permissive(expression)
        if ok is not None:
            return expression, "permissive" if ok else "not permissive"
    classifiers = [c.split("::")[-1].strip() for c in (metadata.get_all("Classifier") or [])
                   if c.startswith("License ::") and c.count("::") >= 2 and "OSI Approved" != c.split("::")[-1].strip()]
    ids = [i for i in (_name_to_id(c) for c in classifiers) if i]
    if ids:
        ids = sorted(set(ids))
        return " AND ".join(ids), "permissive" if all(i in PERMISSIVE for i in ids) else "not permissive"
    text = (metadata.get("License") or "").strip()
    words = [t for t in re.findall(r"[^\s()]+", text) if t.upper() not in ("AND", "OR", "WITH")]
    if words and len(text) <= 120 and all(w.rstrip("+") in PERMISSIVE or w in EXCEPTIONS or _COPYLEFT.match(w)
                                          for w in words):
        ok = spdx_permissive(text)  # an SPDX expression in the free-text field ("MPL-2.0 AND MIT")
        if ok is not None:
            return text, "permissive" if ok else "not permissive"
    spdx = _name_to_id(text)
    if spdx:
        return spdx, "permissive" if spdx in PERMISSIVE else "not permissive"
    return "", "unknown"
