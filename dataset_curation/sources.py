"""Where documents come from: the built-in corpus (this interpreter's standard library), the installed corpus
(the standard library plus every installed distribution's source, licence-checked), local files, the Hub.

Each source returns (documents, manifest). A document is {"id", "text", "source", "path", "license", "kind"};
the manifest records what was read and a hash of the inputs, so the cache and the data dir know when to rebuild.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import re
import socket
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

PSF = "PSF-2.0"
SKIP_DIRS = ("site-packages", "__pycache__", "dist-packages")


class SourceError(RuntimeError):
    """A source cannot be read (missing path, no documents, no network); the message says what to do instead."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_test(rel: str) -> bool:
    parts = rel.split("/")
    return any(p in ("test", "tests", "idle_test") for p in parts[:-1])


def stdlib_files(include_tests: bool = True, max_files: int | None = None) -> list[Path]:
    """The standard library's .py files, sorted by relative path (third-party site-packages excluded)."""
    root = stdlib_root()
    if not root.is_dir():
        raise SourceError(f"the standard library was not found at {root}; use --recipe files --input PATH instead")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        if not include_tests and _is_test(f"{rel_dir}/x.py"):
            continue
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_files is not None:
        if max_files < 1:
            raise SourceError(f"max_files must be >= 1, got {max_files}")
        files = files[:max_files]
    return files


def decode_source(data: bytes) -> tuple[str, str]:
    """Bytes of a .py file -> (text, how). UTF-8 when valid; else the file's coding cookie (PEP 263); else UTF-8
    with undecodable bytes kept as lone surrogates, which the normalize stage replaces and counts."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        if encoding.replace("_", "-").lower() not in ("utf-8", "utf-8-sig"):
            return data.decode(encoding), f"cookie:{encoding}"
    except (SyntaxError, LookupError, UnicodeDecodeError):
        pass
    return data.decode("utf-8", "surrogateescape"), "invalid-utf-8"


_HASH = re.compile(r"#[^\n]*")
_CODING = re.compile(r"^#.*coding[:=]", re.IGNORECASE)


def extract_prose(source: str) -> str:
    """The English inside a Python file: its docstrings (triple-quoted strings that open a line) and its blocks of
    whole-line comments, in file order, one paragraph each. (str.find and literal-led regexes: a line-anchored
    regex over 30 MB of source was the slowest step of the built-in recipe.)"""
    pieces = []
    pos = 0
    while True:
        i1, i2 = source.find('"""', pos), source.find("'''", pos)
        i = i1 if i2 < 0 or (0 <= i1 < i2) else i2
        if i < 0:
            break
        end = source.find(source[i : i + 3], i + 3)
        if end < 0:
            break
        line_start = source.rfind("\n", 0, i) + 1
        if source[line_start:i].strip() in ("", "r", "R", "u", "U"):
            text = inspect.cleandoc(source[i + 3 : end])
            if text:
                pieces.append((i, text))
        pos = end + 3
    block: list[str] = []
    block_at, prev_end = 0, -2
    for m in _HASH.finditer(source):
        i = m.start()
        line_start = source.rfind("\n", 0, i) + 1
        if source[line_start:i].strip(" \t"):
            continue  # an inline comment, or a '#' inside code
        line = m.group(0)
        if line.startswith("#!") or _CODING.match(line):
            continue
        if line_start != prev_end + 1 and block:
            pieces.append((block_at, " ".join(block)))
            block = []
        if not block:
            block_at = i
        words = line.lstrip("#").strip()
        if words:
            block.append(words)
        prev_end = m.end()
    if block:
        pieces.append((block_at, " ".join(block)))
    return "\n\n".join(t for _, t in sorted(pieces))


def _doc(id: str, text: str, source: str, path: str, kind: str, license: str = PSF) -> dict:
    return {"id": id, "text": text, "source": source, "path": path, "license": license, "kind": kind}


def python_doc_dirs() -> list[Path]:
    """Folders of the Python documentation sources (.rst), when this machine has them."""
    candidates = [Path(sys.prefix) / "share" / "doc" / f"python{sys.version_info.major}.{sys.version_info.minor}",
                  Path(sys.prefix) / "Doc", stdlib_root().parent.parent / "Doc"]
    return [c for c in candidates if c.is_dir() and any(c.rglob("*.rst"))]


def builtin_documents(include_tests: bool = True, max_files: int | None = None,
                      include_prose: bool = True) -> tuple[list[dict], dict]:
    """The built-in corpus: every stdlib .py file as code, its docstrings and comments as prose, the help topics
    of pydoc_data as prose, and the .rst documentation when present. All PSF-licensed."""
    root = stdlib_root()
    files = stdlib_files(include_tests, max_files)
    digest = hashlib.sha256(f"python {sys.version}".encode())
    docs, decoding = [], {}
    n_bytes = 0
    for p in files:
        rel = p.relative_to(root).as_posix()
        data = p.read_bytes()
        n_bytes += len(data)
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        text, how = decode_source(data)
        decoding[how.split(":")[0]] = decoding.get(how.split(":")[0], 0) + 1
        docs.append(_doc(f"stdlib:{rel}", text, "stdlib-code", rel, "code"))
        if include_prose:
            prose = extract_prose(text)
            if prose:
                docs.append(_doc(f"stdlib-prose:{rel}", prose, "stdlib-docstrings", rel, "prose"))
    n_topics = 0
    if include_prose and max_files is None:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            docs.append(_doc(f"pydoc-topic:{name}", topics[name], "pydoc-topics", f"pydoc_data/topics.py#{name}",
                             "prose"))
            digest.update(name.encode() + topics[name].encode("utf-8", "surrogatepass"))
        n_topics = len(topics)
    rst = []
    if include_prose and max_files is None:
        for d in python_doc_dirs():
            for p in sorted(d.rglob("*.rst")):
                data = p.read_bytes()
                digest.update(str(p).encode() + hashlib.sha256(data).digest())
                rst.append(_doc(f"python-docs:{p.relative_to(d).as_posix()}", data.decode("utf-8", "surrogateescape"),
                                "python-docs", str(p), "prose"))
    docs += rst
    manifest = {"recipe": "builtin", "python": sys.version.split()[0], "implementation": sys.implementation.name,
                "stdlib": str(root), "files": len(files), "bytes": n_bytes, "include_tests": include_tests,
                "max_files": max_files, "pydoc_topics": n_topics, "rst_files": len(rst), "decoding": decoding,
                "license": PSF, "input_sha256": digest.hexdigest()}
    return docs, manifest


# ---------------------------------------------------------------------------------------------------------------
# The installed corpus: the standard library plus every installed distribution's Python source, licence-checked

VENDORED = frozenset({"_vendor", "vendor", "_vendored", "vendored", "extern", "_extern", "third_party",
                      "_bundled"})
_LICENCE_FILE = re.compile(r"(licen[cs]e|copying)([._-][\w.-]*)?", re.IGNORECASE)
_RANK = {"permissive": 0, "unknown": 1, "not permissive": 2}


def _is_vendored(rel: str) -> bool:
    return bool(_vendor_levels(rel))


def _vendor_levels(rel: str) -> list[tuple[str, str]]:
    """(vendor dir, path inside it) for each vendored folder a file sits in, outermost first. A vendor dir's own
    `__init__.py` belongs to the distribution that vendors."""
    parts = rel.split("/")
    return [("/".join(parts[: i + 1]), "/".join(parts[i + 1:])) for i, p in enumerate(parts[:-1])
            if p in VENDORED and not (i == len(parts) - 2 and parts[-1] == "__init__.py")]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _vendor_index(vdir: Path) -> dict:
    """What a vendor dir says about its contents: the files of each `*.dist-info` it ships (with that metadata's
    licence) and the names and versions pinned in `vendor.txt`."""
    from importlib import metadata

    from dataset_curation.licences import licence_of

    files: dict[str, dict] = {}
    for info in sorted(vdir.glob("*.dist-info")) if vdir.is_dir() else []:
        dist = metadata.PathDistribution(info)
        if not dist.metadata["Name"]:
            continue
        licence, verdict = licence_of(dist.metadata)
        entry = {"name": dist.metadata["Name"], "version": dist.metadata["Version"] or "", "licence": licence,
                 "verdict": verdict, "evidence": f"{info.name}/METADATA"}
        for f in dist.files or []:
            files[f.as_posix()] = entry
    pins = {}
    if (vdir / "vendor.txt").is_file():
        for line in (vdir / "vendor.txt").read_text(errors="replace").splitlines():
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
            if m:
                pins[_norm(m.group(1))] = (m.group(1), m.group(2))
    return {"files": files, "pins": pins}


def _vendored_origin(vdir: Path, inner: str, index: dict) -> tuple[str, dict]:
    """(the vendored package's folder or module inside vdir, its name, version, licence, verdict and evidence):
    from a dist-info in the vendor dir that lists the file, else from LICENSE/COPYING files beside the package
    (name and version from vendor.txt when it pins them), else unknown."""
    from dataset_curation.licences import licence_of_text

    top = inner.split("/")[0]
    stem = top[:-3] if top.endswith(".py") else top
    if inner in index["files"]:
        return top, index["files"][inner]
    name, version = index["pins"].get(_norm(stem), (stem, ""))
    beside = vdir / top
    texts = sorted(f for f in beside.iterdir() if f.is_file() and _LICENCE_FILE.fullmatch(f.name)) \
        if beside.is_dir() else sorted(f for f in vdir.glob(f"{stem}.*") if _LICENCE_FILE.search(f.suffix))
    if not texts:
        return top, {"name": name, "version": version, "licence": "", "verdict": "unknown",
                     "evidence": "no dist-info or licence file says what it is"}
    found = [licence_of_text(f.read_text(errors="replace")) for f in texts]
    verdict = max((v for _, v in found), key=_RANK.__getitem__)
    licence = " AND ".join(dict.fromkeys(lic or f"unreadable {f.name}" for (lic, _), f in zip(found, texts)))
    return top, {"name": name, "version": version, "licence": licence, "verdict": verdict,
                 "evidence": ", ".join(f.relative_to(vdir).as_posix() for f in texts)}


def _classify_files(dist, files: list[tuple[str, str]], verdict: str, licence: str) -> tuple[list, list]:
    """Each file of a distribution with its own verdict: the distribution's, or for a vendored copy the worst of
    the distribution's and each enclosing vendored package's own. Returns (files, vendored table)."""
    indexes: dict[str, dict] = {}
    vendored: dict[str, dict] = {}
    out = []
    for rel, full in files:
        v, lic, where = verdict, licence, None
        for vdir_rel, inner in _vendor_levels(rel):
            vdir = Path(dist.locate_file(vdir_rel))
            index = indexes.setdefault(vdir_rel, _vendor_index(vdir))
            top, origin = _vendored_origin(vdir, inner, index)
            where = f"{vdir_rel}/{top}"
            key = (where, origin["name"])  # a namespace folder (jaraco/) may hold several vendored distributions
            vendored.setdefault(key, {"path": where, **origin, "files": 0, "bytes": 0,
                                      "kept": origin["verdict"] == "permissive"})
            v = max(v, origin["verdict"], key=_RANK.__getitem__)
            lic = origin["licence"]
        if where:
            row = vendored[key]
            row.update(files=row["files"] + 1, bytes=row["bytes"] + Path(full).stat().st_size, kept=v == "permissive")
        out.append((rel, full, v, lic, where))
    return out, sorted(vendored.values(), key=lambda r: (r["path"], r["name"]))


def installed_distributions(paths: list[str] | None = None, include_tests: bool = True) -> list[dict]:
    """One row per installed distribution (on `paths`, default sys.path): name, version, licence, verdict, its
    .py files (relative paths, tests dropped unless include_tests), their bytes, kept = permissive licence, and
    its vendored copies (`_vendor/`, `extern/`, ...), each with its own licence and verdict (`vendored`).
    Sorted by name; a distribution found twice on the path counts once (the first, as imports would)."""
    from importlib import metadata

    from dataset_curation.licences import licence_of

    rows, seen = [], set()
    for dist in metadata.distributions(path=paths if paths is not None else sys.path):
        name = dist.metadata["Name"] or ""
        key = _norm(name)
        if not name or key in seen:
            continue
        seen.add(key)
        licence, verdict = licence_of(dist.metadata)
        files, n_bytes = [], 0
        for f in dist.files or []:
            rel = f.as_posix()
            if not rel.endswith(".py") or ".." in f.parts or "__pycache__" in f.parts or "__editable__" in rel:
                continue
            if not include_tests and _is_test(rel):
                continue
            full = Path(dist.locate_file(f))
            if full.is_file():
                files.append((rel, str(full)))
                n_bytes += full.stat().st_size
        files, vendored = _classify_files(dist, files, verdict, licence)
        rows.append({"name": name, "version": dist.metadata["Version"], "licence": licence, "verdict": verdict,
                     "kept": verdict == "permissive", "files": len(files), "bytes": n_bytes, "vendored": vendored,
                     "_files": files})
    rows.sort(key=lambda r: r["name"].lower())
    return rows


def installed_documents(paths: list[str] | None = None, include_tests: bool = True, include_prose: bool = True,
                        max_chars: int | None = None, progress: bool = False,
                        include_stdlib: bool = True) -> tuple[list[dict], dict]:
    """The installed corpus: the standard library's and every installed distribution's .py files as code (and
    their docstrings and comments as prose), each tagged with its distribution's licence and verdict; the licence
    stage removes the files of distributions that are not permissive.

    Files come in a fixed pseudo-random order (by a hash of distribution and path), so the corpus read up to
    max_chars (--target_tokens) is a sample across all distributions; vendored copies (`_vendor/`, `extern/`, ...)
    come last, so exact and near dedup keep the library's own copy.
    """
    from tqdm import tqdm

    root = stdlib_root()
    dists = []
    if include_stdlib:
        files = [(p.relative_to(root).as_posix(), str(p), "permissive", PSF, None) for p in stdlib_files(include_tests)]
        dists.append({"name": "python-stdlib", "version": sys.version.split()[0], "licence": PSF,
                      "verdict": "permissive", "kept": True, "files": len(files),
                      "bytes": sum(Path(f[1]).stat().st_size for f in files), "vendored": [], "_files": files})
    dists += installed_distributions(paths, include_tests)
    order = sorted(((where is not None, hashlib.sha1(f"{d['name']}/{rel}".encode()).digest(), i, rel, full,
                     verdict, licence, where)
                    for i, d in enumerate(dists) for rel, full, verdict, licence, where in d["_files"]))
    digest = hashlib.sha256(f"python {sys.version}".encode())
    docs: list[dict] = []
    chars, n_bytes, read = 0, 0, [0] * len(dists)
    bar = tqdm(order, desc="read installed", unit="file", disable=not progress, leave=False)
    for _, _, i, rel, full, verdict, licence, where in bar:
        if max_chars is not None and chars >= max_chars:
            break
        d = dists[i]
        data = Path(full).read_bytes()
        n_bytes += len(data)
        digest.update(f"{d['name']}/{rel}".encode() + b"\0" + hashlib.sha256(data).digest())
        text, _ = decode_source(data)
        src = "stdlib" if d["name"] == "python-stdlib" else "installed"
        extra = {"dist": d["name"], "licence_verdict": verdict, "group": f"{d['name']}/{rel}"}
        if where:
            extra["vendored"] = where
        docs.append({**_doc(f"{d['name']}:{rel}", text, f"{src}-code", rel, "code", licence), **extra})
        if include_prose:
            prose = extract_prose(text)
            if prose:
                docs.append({**_doc(f"{d['name']}-prose:{rel}", prose, f"{src}-docstrings", rel, "prose",
                                    licence), **extra})
        chars += len(text) if verdict == "permissive" else 0  # what the licence stage removes does not fill it
        read[i] += 1
    table = [{k: v for k, v in d.items() if k != "_files"} | {"files_read": n} for d, n in zip(dists, read)]
    manifest = {"recipe": "installed", "python": sys.version.split()[0], "stdlib": str(root), "site_paths": paths,
                "files": sum(read), "bytes": n_bytes,
                "include_tests": include_tests, "include_stdlib": include_stdlib, "max_chars": max_chars,
                "distributions": table,
                "license": "per distribution (see distributions)", "input_sha256": digest.hexdigest()}
    return docs, manifest


# ---------------------------------------------------------------------------------------------------------------
# Local files

FILE_EXTS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}


def local_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise SourceError(f"input {p} does not exist; pass --input a file or folder of .txt, .jsonl or .parquet")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FILE_EXTS)
    bad = [f for f in files if f.suffix not in FILE_EXTS]
    if bad:
        raise SourceError(f"{bad[0]}: unsupported file type {bad[0].suffix!r}; use one of {sorted(FILE_EXTS)}")
    if not files:
        raise SourceError(f"no .txt, .jsonl or .parquet files under {p}")
    return files


def _load_dataset_fn():
    """`datasets.load_dataset`, or a SourceError that says how to install it (it is the optional `data` extra)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SourceError("this recipe reads files and the Hub through Hugging Face `datasets`, which is not "
                          "installed: pip install -e '.[data]' (the built-in and installed recipes need "
                          "nothing extra)") from None
    return load_dataset


def file_documents(input: str | Path, kind: str = "prose", text_field: str = "text",
                   license: str = "unknown") -> tuple[list[dict], dict]:
    """Documents from local files through `datasets`: a .txt file is one document; .jsonl and .parquet give one
    document per row from `text_field` (a `kind` column, when present, overrides the default kind)."""
    load_dataset = _load_dataset_fn()

    files = local_files(input)
    digest = hashlib.sha256()
    docs: list[dict] = []
    for f in files:
        digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        builder = FILE_EXTS[f.suffix]
        extra = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
        try:
            ds = load_dataset(builder, data_files=str(f), split="train", **extra)
        except Exception as e:  # datasets raises many types for unreadable files
            raise SourceError(f"{f}: could not be read as {builder} ({type(e).__name__}: {e})") from None
        if text_field not in ds.column_names:
            raise SourceError(f"{f} has no {text_field!r} column (columns: {ds.column_names}); "
                              "set --text_field to the column holding the text")
        kinds = ds["kind"] if "kind" in ds.column_names else None
        for i, text in enumerate(ds[text_field]):
            k = kinds[i] if kinds is not None and kinds[i] in ("code", "prose") else kind
            docs.append(_doc(f"file:{f.name}#{i}", text or "", "files", str(f), k, license))
    manifest = {"recipe": "files", "input": str(input), "files": len(files),
                "bytes": sum(f.stat().st_size for f in files), "input_sha256": digest.hexdigest()}
    return docs, manifest


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub (streaming)

# (dataset, load_dataset keyword arguments, text column, licence). The code set is GitHub Python under the MIT
# licence from the parquet conversion of codeparrot/github-code-clean (columns code, repo_name, path, license).
WIKI = ("wikimedia/wikipedia", {"name": "20231101.en"}, "text", "CC-BY-SA-4.0")
CODE = ("codeparrot/github-code-clean",
        {"revision": "refs/convert/parquet", "data_files": {"train": "Python-mit/partial-train/*.parquet"}},
        "code", "MIT")


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> str | None:
    """None when the Hub answers, else why not: offline mode set, or no connection within `timeout` seconds."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            return f"{var} is set"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {host} ({e})"
    return None


LOCAL_BUILDERS = ("parquet", "json", "text", "csv", "arrow")  # dataset "names" that read local files


def hub_documents(target_tokens: int = 100_000_000, chars_per_token: float = 4.0, code_share: float = 0.3,
                  wiki: tuple = WIKI, code: tuple = CODE, seed: int = 0, buffer_size: int = 10_000) -> Iterator[dict]:
    """Stream English Wikipedia and permissively licensed code until about target_tokens worth of characters
    (with 30% headroom for what the filters remove). Fails at once, naming the built-in recipe, when offline.

    Documents are sampled across each dump, not its first rows: the stream's shard (file) order is shuffled and
    rows pass through a shuffle buffer of buffer_size (datasets' IterableDataset.shuffle, seeded). `wiki` and
    `code` may name a local builder ("parquet" with data_files) instead: the same path, without the Hub."""
    if any(spec[0] not in LOCAL_BUILDERS for spec in (wiki, code)):
        why = hub_reachable()
        if why:
            raise SourceError(f"the wiki_code recipe needs the Hugging Face Hub, but {why}. Offline, use the "
                              "built-in corpus: `python -m dataset_curation build --recipe builtin --out "
                              "data/builtin-8k`")
    load_dataset = _load_dataset_fn()

    budget = target_tokens * chars_per_token * 1.3
    for (name, kwargs, field, licence), kind, chars in [(wiki, "prose", budget * (1 - code_share)),
                                                       (code, "code", budget * code_share)]:
        ds = load_dataset(name, split="train", streaming=True, **kwargs).shuffle(seed=seed, buffer_size=buffer_size)
        got = 0
        for i, row in enumerate(ds):
            text = row.get(field) or ""
            where = str(row.get("url") or "/".join(str(row.get(k, "")) for k in ("repo_name", "path")) or i)
            key = row.get("id") or where
            source = f"{name}:{kind}" if name in LOCAL_BUILDERS else name
            yield _doc(f"{name}#{key}", text, source, where, kind, str(row.get("license") or licence))
            got += len(text)
            if got >= chars:
                break


def hub_manifest(target_tokens: int, wiki: tuple = WIKI, code: tuple = CODE, seed: int = 0) -> dict:
    spec = {"recipe": "wiki_code", "wiki": list(wiki), "code": list(code), "target_tokens": target_tokens,
            "seed": seed}
    local = [f for spec in (wiki, code) if spec[0] in LOCAL_BUILDERS for f in _data_files(spec[1])]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for f in local:  # local files: their content decides the cache, not only their names
        if Path(f).is_file():
            digest.update(hashlib.sha256(Path(f).read_bytes()).digest())
    spec["input_sha256"] = digest.hexdigest()
    return spec


def _data_files(kwargs: dict) -> list[str]:
    files = kwargs.get("data_files") or []
    if isinstance(files, dict):
        files = [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    return [files] if isinstance(files, str) else list(files)
