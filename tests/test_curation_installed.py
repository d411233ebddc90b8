"""The installed corpus on a synthetic site-packages (fake dist-info of several licences), the licence rules, a
kill -9 in the middle of a build, and the wiki_code recipe offline on local parquet shaped like the Hub's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataset_curation.licences import licence_of, spdx_permissive
from dataset_curation.pipeline import build
from dataset_curation.sources import hub_documents, installed_distributions

ROOT = Path(__file__).resolve().parents[1]
# name -> (metadata licence lines, expected verdict)
DISTS = {
    "goodpkg": ("License-Expression: MIT", "permissive"),
    "bsdpkg": ("Classifier: License :: OSI Approved :: BSD License", "permissive"),
    "duallic": ("License-Expression: GPL-3.0-only OR Apache-2.0", "permissive"),
    "gplpkg": ("License-Expression: GPL-3.0-or-later", "not permissive"),
    "mplpkg": ("License: MPL-2.0 AND MIT", "not permissive"),
    "nolicence": ("License: UNKNOWN", "unknown"),
}


def module_source(rng: random.Random, n_funcs: int = 6) -> str:
    """A plausible, unique Python module: functions with docstrings, arithmetic and loops."""
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9))) for _ in range(60)]
    out = [f'"""Helpers for the {rng.choice(words)} of {rng.choice(words)} records and the {rng.choice(words)}."""',
           "", "import math", ""]
    for _ in range(n_funcs):
        name, a, b = rng.sample(words, 3)
        out += [f"def {name}({a}, {b}=None):",
                f'    """Return the {rng.choice(words)} of {a} with the {rng.choice(words)} of {b} and the rest."""',
                f"    total = {rng.randint(0, 99)}",
                f"    for item in range(len({a})):",
                f"        total += math.{rng.choice(['sqrt', 'log1p', 'fabs'])}(item) * {rng.randint(2, 9)}",
                f"    if {b} is not None and total > {rng.randint(10, 500)}:",
                f"        return total - len(str({b}))",
                "    return total", "", ""]
    return "\n".join(out)


# goodpkg's vendored copies, laid out as pip and setuptools ship theirs, with their real licence strings:
# path inside goodpkg/_vendor -> (.py files, licence files, expected verdict)
BSD3_TEXT = ("Copyright (c) 2013, Someone.\nAll rights reserved.\n\nRedistribution and use in source and binary forms, "
             "with or without modification, are permitted provided that the following conditions are met:\n"
             "3. Neither the name of the copyright holder nor the names of its contributors may be used to endorse.")
CERTIFI_LICENSE = ("This package contains a modified version of ca-bundle.crt:\n\nca-bundle.crt -- Bundle of CA Root "
                   "Certificates\n\nIt contains the certificates in PEM format and therefore\ncan be directly used "
                   "with curl / libcurl / php_curl, or with\nan Apache+mod_ssl webserver for SSL client "
                   "authentication.\n\n***** BEGIN LICENSE BLOCK *****\nThis Source Code Form is subject to the "
                   "terms of the Mozilla Public License,\nv. 2.0. If a copy of the MPL was not distributed with this "
                   "file, You can obtain\none at http://mozilla.org/MPL/2.0/.\n\n***** END LICENSE BLOCK *****\n")
AUTOCOMMAND_METADATA = ("Metadata-Version: 2.1\nName: autocommand\nVersion: 2.2.2\nLicense: LGPLv3\n"
                        "Classifier: License :: OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)\n")
VENDORED = {
    "bsdpkg": (["mod0.py"], {"bsdpkg/LICENSE": BSD3_TEXT}, "permissive"),
    "certifi": (["__init__.py", "core.py"], {"certifi/LICENSE": CERTIFI_LICENSE}, "not permissive"),
    "autocommand": (["__init__.py", "autocommand.py"], {"autocommand-2.2.2.dist-info/METADATA": AUTOCOMMAND_METADATA,
                                                        "autocommand-2.2.2.dist-info/RECORD":
                                                        "autocommand/__init__.py,,\nautocommand/autocommand.py,,\n"},
                    "not permissive"),
    "mystery": (["thing.py"], {}, "unknown"),
}


def make_site(root: Path, seed: int = 0, files_per_dist: int = 4) -> dict[str, list[str]]:
    """A site-packages with one package per entry of DISTS (dist-info with METADATA and RECORD), plus goodpkg
    vendoring the packages of VENDORED (one an exact copy of one of bsdpkg's files) with a pip-style vendor.txt.
    Returns the .py files per distribution."""
    rng = random.Random(seed)
    site = root / "site-packages"
    made: dict[str, list[str]] = {}
    for name, (licence, _) in DISTS.items():
        files = [f"{name}/__init__.py"] + [f"{name}/mod{i}.py" for i in range(files_per_dist - 1)]
        if name == "goodpkg":
            files += [f"goodpkg/_vendor/{pkg}/{f}" for pkg, (fs, _, _) in VENDORED.items() for f in fs]
            for _, extra, _ in VENDORED.values():
                for rel, text in extra.items():
                    (site / "goodpkg/_vendor" / rel).parent.mkdir(parents=True, exist_ok=True)
                    (site / "goodpkg/_vendor" / rel).write_text(text)
            (site / "goodpkg/_vendor/vendor.txt").write_text("certifi==2024.2.2\nautocommand==2.2.2\n")
        for rel in files:
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            (site / rel).write_text(module_source(rng))
        info = site / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.0\n{licence}\n")
        (info / "RECORD").write_text("".join(f"{f},,\n" for f in [*files, f"{info.name}/METADATA"]))
        made[name] = files
    (site / "goodpkg/_vendor/bsdpkg/mod0.py").write_text((site / "bsdpkg/mod0.py").read_text())
    return made


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    make_site(root)
    return root / "site-packages"


def _build(site: Path, out: Path, **kw) -> Path:
    return build("installed", out, vocab_size=400, num_proc=1, progress=False, site_paths=[str(site)],
                 include_stdlib=False, val_fraction=0.2, **kw)


@pytest.fixture(scope="module")
def built(site, tmp_path_factory) -> Path:
    return _build(site, tmp_path_factory.mktemp("out") / "data")


def test_licence_rules():
    assert spdx_permissive("MIT") and spdx_permissive("Apache-2.0 WITH LLVM-exception AND BSD-3-Clause")
    assert spdx_permissive("GPL-2.0-only OR (MIT AND ISC)")
    assert spdx_permissive("MPL-2.0 AND MIT") is False and spdx_permissive("GPL-3.0-or-later") is False
    assert spdx_permissive("MIT AND (") is None

    class Meta(dict):
        def get_all(self, key):
            v = self.get(key)
            return v if isinstance(v, list) else None

    assert licence_of(Meta({"License": "Apache 2.0 License"})) == ("Apache-2.0", "permissive")
    assert licence_of(Meta({"License": "BSD"})) == ("BSD", "permissive")  # which BSD it does not say
    mit_text = ("Copyright (c) 2020 Someone\n\nPermission is hereby granted, free of charge, to any person "
                "obtaining a copy of this software and associated documentation files, to deal in the Software "
                "without restriction")
    assert licence_of(Meta({"License": mit_text})) == ("MIT", "permissive")
    assert licence_of(Meta({"License": "UNKNOWN", "Classifier": [
        "License :: OSI Approved :: ISC License (ISCL)"]})) == ("ISC", "permissive")
    assert licence_of(Meta({"Classifier": ["License :: OSI Approved :: MIT License",
                                           "License :: OSI Approved :: GNU General Public License v3 (GPLv3)"]}))[1] \
        == "not permissive"  # classifiers count together
    assert licence_of(Meta({"License": "MPL-2.0"}))[1] == "not permissive"  # weak copyleft: left out
    assert licence_of(Meta({})) == ("", "unknown")
    assert licence_of(Meta({"License": "UNKNOWN"})) == ("", "unknown")


def test_manifest_has_every_distribution_with_its_verdict(site, built):
    rows = {r["name"]: r for r in installed_distributions([str(site)])}
    assert {n: r["verdict"] for n, r in rows.items()} == {n: v for n, (_, v) in DISTS.items()}
    assert rows["goodpkg"]["files"] == 10 and rows["goodpkg"]["bytes"] > 0
    meta = json.loads((built / "meta.json").read_text())
    table = {r["name"]: r for r in meta["manifest"]["distributions"]}
    for name, (_, verdict) in DISTS.items():
        r = table[name]
        assert (r["version"], r["kept"], r["verdict"]) == ("1.0", verdict == "permissive", verdict)
        assert r["files"] == r["files_read"] == len(rows[name]["_files"])
    report = (built / "report.md").read_text()
    assert "## Licences" in report and "3 of 6 distributions kept" in report
    stats = json.loads((built / "stats.json").read_text())
    assert {r["name"]: r["bytes"] for r in stats["distributions"]} == {n: r["bytes"] for n, r in rows.items()}


def test_licence_stage_removes_by_reason_and_counts_are_conserved(built):
    stats = json.loads((built / "stats.json").read_text())
    stages = stats["stages"]
    assert stages[0]["name"] == "licence"
    # each removed distribution has 4 files, each giving a code and a prose (docstring) document
    # and goodpkg's vendored certifi and autocommand (2 files each) and its unidentified vendored package (1 file)
    assert stages[0]["removed"] == {"not_permissive": 16, "unknown_licence": 8, "vendored_not_permissive": 8,
                                    "vendored_unknown_licence": 2}
    for prev, s in zip(stages, stages[1:]):
        assert s["docs_in"] == prev["docs_kept"], (prev["name"], s["name"])
    for s in stages:
        assert s["docs_in"] == s["docs_kept"] + s["docs_removed"] and sum(s["removed"].values()) == s["docs_removed"]
        assert s["chars_in"] == s["chars_kept"] + s["chars_removed"]
    assert stages[-1]["docs_kept"] == stats["documents"]["train"] + stats["documents"]["val"]
    kept = {d["name"]: d["documents_after_curation"] for d in stats["distributions"]}
    assert all(d["bytes"] > d["bytes_after_curation"] for d in stats["distributions"])
    assert kept["gplpkg"] == kept["mplpkg"] == kept["nolicence"] == 0 and kept["goodpkg"] > 0


def test_vendored_copies_get_their_own_verdict(site, built):
    rows = {r["name"]: r for r in installed_distributions([str(site)])}
    vendored = {v["path"]: v for v in rows["goodpkg"]["vendored"]}
    assert {p.split("/")[-1]: v["verdict"] for p, v in vendored.items()} == \
        {pkg: verdict for pkg, (_, _, verdict) in VENDORED.items()}
    certifi, autocommand = vendored["goodpkg/_vendor/certifi"], vendored["goodpkg/_vendor/autocommand"]
    assert (certifi["name"], certifi["version"], certifi["licence"], certifi["kept"]) == \
        ("certifi", "2024.2.2", "MPL", False)  # name and version from vendor.txt, licence from its LICENSE
    assert (autocommand["version"], autocommand["licence"], autocommand["kept"]) == ("2.2.2", "LGPL", False)
    assert vendored["goodpkg/_vendor/mystery"]["evidence"] == "no dist-info or licence file says what it is"
    assert rows["goodpkg"]["verdict"] == "permissive"  # the distribution's own files stay in
    meta = json.loads((built / "meta.json").read_text())
    table = {r["name"]: r for r in meta["manifest"]["distributions"]}
    assert table["goodpkg"]["vendored"] == rows["goodpkg"]["vendored"]
    samples = json.loads((built / "removed_samples.json").read_text())["licence"]
    assert {s["note"] for s in samples["vendored_not_permissive"]} <= {
        "goodpkg: vendored goodpkg/_vendor/certifi: MPL", "goodpkg: vendored goodpkg/_vendor/autocommand: LGPL"}
    assert {s["note"] for s in samples["vendored_unknown_licence"]} == {
        "goodpkg: vendored goodpkg/_vendor/mystery: no dist-info or licence file says what it is"}
    stats = json.loads((built / "stats.json").read_text())
    docs = {d["name"]: d["documents_after_curation"] for d in stats["distributions"]}
    assert docs["goodpkg"] > 0
    report = (built / "report.md").read_text()
    assert "| goodpkg | `goodpkg/_vendor/certifi` | certifi | 2024.2.2 | MPL | no (not permissive) | 2 |" in report


def test_the_real_vendored_certifi_and_autocommand_are_left_out():
    # pip and setuptools in this environment vendor certifi (MPL-2.0) and autocommand (LGPL-3.0)
    from importlib import metadata

    try:  # found through their metadata: importing setuptools would patch distutils for the whole session
        sites = {Path(metadata.distribution(n).locate_file("")) for n in ("pip", "setuptools")}
    except metadata.PackageNotFoundError:
        pytest.skip("pip or setuptools is not installed")
    site = str(sites.pop())
    wanted = {("pip", "pip/_vendor/certifi"), ("setuptools", "setuptools/_vendor/autocommand")}
    if sites or not all((Path(site) / p).is_dir() for _, p in wanted):
        pytest.skip("this environment's pip/setuptools do not vendor certifi/autocommand in one site-packages")
    rows = {r["name"]: r for r in installed_distributions([site])}
    found = {(n, v["path"]): v for n in ("pip", "setuptools") for v in rows[n]["vendored"]}
    for key in wanted:
        assert found[key]["verdict"] == "not permissive" and not found[key]["kept"], found[key]
    files = {rel: verdict for n in ("pip", "setuptools") for rel, _, verdict, _, _ in rows[n]["_files"]}
    assert files["pip/_vendor/certifi/core.py"] == files["setuptools/_vendor/autocommand/autocommand.py"] \
        == "not permissive"
    assert files["pip/__init__.py"] == "permissive"


def test_vendored_copy_goes_and_the_library_keeps_its_own(built):
    samples = json.loads((built / "removed_samples.json").read_text())
    exact = samples["exact_dedup"]["exact_duplicate"]
    assert {s["id"] for s in exact} >= {"goodpkg:goodpkg/_vendor/bsdpkg/mod0.py"}
    assert all("bsdpkg:bsdpkg/mod0.py" in s["note"] for s in exact if s["id"].startswith("goodpkg:"))


def test_target_tokens_reads_a_sample_across_distributions(site, tmp_path):
    # reading stops at target x chars_per_token x read_headroom characters of permissively licensed files
    out = _build(site, tmp_path / "t", target_tokens=1500)
    meta = json.loads((out / "meta.json").read_text())
    read = {r["name"]: r["files_read"] for r in meta["manifest"]["distributions"]}
    assert 0 < sum(read.values()) < sum(r["files"] for r in meta["manifest"]["distributions"])
    assert sum(n > 0 for n in read.values()) >= 2  # a hash order, not the first distribution's files
    assert meta["tokens"]["train"] >= 1500
    with pytest.warns(UserWarning, match="chars_per_token"):  # an estimate too low says what to raise
        _build(site, tmp_path / "short", target_tokens=1500, chars_per_token=1.5)


def test_kill_minus_9_then_rerun_gives_identical_shards(site, built, tmp_path):
    # A child process builds with small chunks (each cached when done); it is killed as soon as one chunk is on
    # disk, and the rerun must reuse it and end with the same bytes as the uninterrupted build.
    out = tmp_path / "k"
    code = ("import sys; from dataset_curation.pipeline import build; "
            f"build('installed', {str(out)!r}, vocab_size=400, num_proc=1, progress=False, "
            f"site_paths=[{str(site)!r}], include_stdlib=False, val_fraction=0.2, chunk_chars=4000)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 120
    while not list((out / ".cache").glob("doc_chunk*.npz")) and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / "meta.json").exists(), "the build finished before the kill; make the corpus bigger"
    done_before = len(list((out / ".cache").glob("doc_chunk*.npz")))
    assert done_before >= 1
    ref = _build(site, tmp_path / "ref", chunk_chars=4000)
    again = _build(site, out, chunk_chars=4000)
    for name in ("train.bin", "val.bin", "tokenizer.json", "stats.json", "removed_samples.json", "report.md"):
        assert (again / name).read_bytes() == (ref / name).read_bytes(), name
    meta_a, meta_r = (json.loads((d / "meta.json").read_text()) for d in (again, ref))
    assert meta_a == meta_r
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))


def _parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_wiki_code_offline_on_local_parquet_samples_across_the_dump(tmp_path, monkeypatch):
    # Columns as in wikimedia/wikipedia (id, url, title, text) and codeparrot/github-code-clean (code, repo_name,
    # path, language, license, size); HF_HUB_OFFLINE proves nothing is fetched.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = random.Random(3)
    from test_curation_pipeline import make_vocab, prose

    vocab = make_vocab(rng)
    wiki_files, code_files = [], []
    for shard in range(4):
        wiki_files.append(_parquet(tmp_path / f"wiki-{shard}.parquet", [
            {"id": f"{shard}-{i}", "url": f"https://en.wikipedia.org/wiki?curid={shard}{i}", "title": f"T{i}",
             "text": prose(rng, vocab, 120)} for i in range(40)]))
        code_files.append(_parquet(tmp_path / f"code-{shard}.parquet", [
            {"code": module_source(rng, 2), "repo_name": f"user/repo{shard}", "path": f"pkg/m{i}.py",
             "language": "Python", "license": "mit", "size": 1000} for i in range(40)]))
    wiki = ["parquet", {"data_files": {"train": wiki_files}}, "text", "CC-BY-SA-4.0"]
    code = ["parquet", {"data_files": {"train": code_files}}, "code", "MIT"]
    docs = list(hub_documents(20_000, wiki=tuple(wiki), code=tuple(code), buffer_size=50))
    wiki_ids = [d["id"].split("#")[1] for d in docs if d["kind"] == "prose"]
    assert 10 < len(wiki_ids) < 160
    in_file_order = [f"{s}-{i}" for s in range(4) for i in range(40)][: len(wiki_ids)]
    assert wiki_ids != in_file_order and len({i.split("-")[0] for i in wiki_ids}) >= 2
    assert {d["license"] for d in docs if d["kind"] == "code"} == {"mit"}
    out = build("wiki_code", tmp_path / "wc", vocab_size=400, num_proc=1, progress=False, target_tokens=20_000,
                hub_wiki=wiki, hub_code=code, val_fraction=0.1)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["manifest"]["recipe"] == "wiki_code" and meta["tokens"]["val"] > 0
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["per_source"]) == {"parquet:prose", "parquet:code"}
    kinds = stats["stages"][2]["counters"]
    assert kinds["kept_code"] > 0 and kinds["kept_prose"] > 0
