"""Prose data for the segmenter (issue 24): R lazy-load data read without R (how janeaustenr ships Jane
Austen's novels), novels as chapters without headings, passages chained for ``prose-mixed``, and the
bootstrap intervals the evidence reports. No model, nothing downloads."""

import gzip
import importlib.util
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from vllm_blockattn.segmenter.corpora import (
    PERMISSIVE, StructuredDoc, austen_documents, build_section_records, licenses_of, novel_document,
    passage_documents, read_r_lazyload,
)
from vllm_blockattn.segmenter.data import validate_record
from vllm_blockattn.segmenter.metrics import (
    bootstrap_f1, cluster_bootstrap_f1, cluster_weights, evaluate, paired_difference, text_counts,
)

ROOT = Path(__file__).resolve().parent.parent

# ----- a hand-written R serialization (XDR, version 3), independent of the reader -------------------


def _i(v):
    return struct.pack(">i", v)


def _char(s):
    if s is None:
        return _i(9) + _i(-1)
    b = s.encode()
    return _i(0x00040009) + _i(len(b)) + b  # CHARSXP, UTF-8 flag


def _names_attr(names):  # pairlist (LISTSXP with tag) holding names = STRSXP, then NILVALUE
    return (_i(2 | (1 << 10)) + _i(1) + _char("names")  # tag: SYMSXP "names"
            + _i(16) + _i(len(names)) + b"".join(_char(n) for n in names) + _i(254))


def _strsxp(values, names=None):
    flags = 16 | ((1 << 9) if names else 0)
    out = _i(flags) + _i(len(values)) + b"".join(_char(v) for v in values)
    return out + (_names_attr(names) if names else b"")


def _header(body):
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8" + body


def _write_lazyload(base, objects):
    blobs, variables, off = b"", [], 0
    for name, body in objects.items():
        data = _header(body)
        blob = struct.pack(">I", len(data)) + zlib.compress(data)
        variables.append((name, off, len(blob)))
        blobs += blob
        off += len(blob)
    # index: list(variables = list(name = c(off, len), ...), references = list(), compressed = TRUE)
    var_list = (_i(19 | (1 << 9)) + _i(len(variables))
                + b"".join(_i(13) + _i(2) + _i(o) + _i(n) for _, o, n in variables)
                + _names_attr([n for n, *_ in variables]))
    index = (_i(19 | (1 << 9)) + _i(3) + var_list + _i(19) + _i(0) + _i(10) + _i(1) + _i(1)
             + _names_attr(["variables", "references", "compressed"]))
    Path(base + ".rdx").write_bytes(gzip.compress(_header(index)))
    Path(base + ".rdb").write_bytes(blobs)


def test_read_r_lazyload_reads_character_vectors_names_and_na(tmp_path):
    base = str(tmp_path / "Rdata")
    _write_lazyload(base, {"novel": _strsxp(["Title", "", None, "Ünïcode line"]),
                           "named": _strsxp(["x", "y"], names=["a", "b"])})
    objs = read_r_lazyload(base)
    assert objs == {"novel": ["Title", "", None, "Ünïcode line"], "named": {"a": "x", "b": "y"}}


def test_read_r_lazyload_rejects_a_corrupt_blob(tmp_path):
    base = str(tmp_path / "Rdata")
    _write_lazyload(base, {"novel": _strsxp(["a", "b"])})
    raw = bytearray(Path(base + ".rdb").read_bytes())
    raw[:4] = struct.pack(">I", 9999)  # the size prefix no longer matches the data
    Path(base + ".rdb").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="index says|bytes"):
        read_r_lazyload(base)


NOVEL = ["A NOVEL", "", "By Someone", "", "VOLUME I", "", "CHAPTER I", "",
         "The first chapter opens in the village.", "It goes on for a while.", "",
         "A second paragraph of the first chapter.", "", "", "CHAPTER II", "",
         "The second chapter moves to the city.", "", "VOLUME II", "", "CHAPTER I", "",
         "The third chapter, first of volume two, is at sea.", "", "A NOTE ON THE TEXT",
         "An editor explains the spelling."]


def test_novel_document_sections_are_chapters_without_headings_title_page_or_end_notes():
    doc = novel_document(NOVEL, "test:novel", min_section_chars=1, license="MIT")
    assert doc.category == "fiction" and doc.license == "MIT"
    assert doc.sections == [
        "The first chapter opens in the village.\nIt goes on for a while.\n\nA second paragraph of the first chapter.",
        "The second chapter moves to the city.",
        "The third chapter, first of volume two, is at sea.",
    ]
    assert novel_document(["no chapters here", "at all"], "x") is None


def _docs(group, n_docs, n_secs, length=900):
    return [StructuredDoc([f"{group} {d} section {j} " + "word " * (length // 5) for j in range(n_secs)],
                          f"{group}:{d}", group, "\n\n", license="MIT" if group == "fiction" else "PSF-2.0",
                          package=group, version="1") for d in range(n_docs)]


def test_passage_documents_take_as_many_from_each_group_and_chain_with_a_blank_line():
    groups = {"fiction": _docs("fiction", 2, 3), "prose": _docs("prose", 5, 4)}
    passages = passage_documents(groups, 100, seed=0)
    by_group = {}
    for p in passages:
        by_group.setdefault(p.meta["group"], []).append(p)
        assert p.category == "prose-mixed" and len(p.sections) == 1
    assert {g: len(v) for g, v in by_group.items()} == {"fiction": 6, "prose": 6}  # the smaller group's count
    assert passage_documents(groups, 2, seed=0) and len(passage_documents(groups, 2, seed=0)) == 4
    recs = build_section_records(passages, 5, min_chars=2000, max_chars=4000, seed=1)
    assert recs and licenses_of(recs) <= PERMISSIVE
    for rec in recs:
        validate_record(rec)
        gold = [c for c, y in zip(rec["candidates"], rec["labels"]) if y]
        assert gold
        for c in gold:  # a gold cut is a passage start, after one blank line like every paragraph
            assert rec["text"][c - 2 : c] == "\n\n" and rec["text"][c - 3] != "\n"
            assert rec["text"][c:].split(" ", 1)[0] in ("fiction", "prose")


def test_austen_documents_from_the_debian_package_when_present():
    candidates = ["/usr/lib/R/site-library/janeaustenr/data",
                  str(ROOT / "runs/segmenter-demo/debs/janeaustenr/usr/lib/R/site-library/janeaustenr/data")]
    data = next((d for d in candidates if os.path.isfile(os.path.join(d, "Rdata.rdb"))), None)
    if data is None:
        pytest.skip("r-cran-janeaustenr is not installed or fetched (train/segmenter_demo.py fetches it)")
    docs = {d.source: d for d in austen_documents(data, license="MIT")}
    assert len(docs) == 6
    assert len(docs["janeaustenr:prideprejudice"].sections) == 61
    assert docs["janeaustenr:prideprejudice"].sections[0].startswith("It is a truth universally acknowledged")
    assert not any(s.lstrip().lower().startswith("chapter") for d in docs.values() for s in d.sections)


# ----- bootstrap intervals ------------------------------------------------------------------------


def _items(rng, n, cat, p_hit):
    out = []
    for _ in range(n):
        gold = sorted(rng.choice(np.arange(10, 1000, 10), size=4, replace=False).tolist())
        pred = [g for g in gold if rng.random() < p_hit] + [5]  # one false cut each
        out.append((cat, pred, gold, 1000))
    return out


def test_bootstrap_point_estimates_match_evaluate_and_intervals_contain_them():
    rng = np.random.default_rng(0)
    items = _items(rng, 30, "a", 0.5) + _items(rng, 30, "b", 0.8)
    boot = bootstrap_f1({"m": text_counts(items)}, n_boot=300, seed=1)
    ev = evaluate(items)
    for cat in ("a", "b"):
        r = boot["m"][cat]
        assert r["f1"] == pytest.approx(ev[cat]["f1"]) and r["n"] == 30
        assert r["lo"] <= r["f1"] <= r["hi"] and r["hi"] - r["lo"] > 0
    assert boot["m"]["mean"]["f1"] == pytest.approx((ev["a"]["f1"] + ev["b"]["f1"]) / 2)
    # more texts, narrower interval
    big = bootstrap_f1({"m": text_counts(_items(rng, 300, "a", 0.5))}, n_boot=300, seed=1)
    assert big["m"]["a"]["hi"] - big["m"]["a"]["lo"] < r["hi"] - r["lo"] + 0.05
    assert big["m"]["a"]["hi"] - big["m"]["a"]["lo"] < boot["m"]["a"]["hi"] - boot["m"]["a"]["lo"]


def test_paired_difference_is_zero_for_the_same_method_and_positive_for_a_better_one():
    rng = np.random.default_rng(2)
    items = _items(rng, 40, "a", 0.5)
    better = [(c, sorted(set(p) | set(g[:2])), g, n) for c, p, g, n in items]  # two more hits on every text
    boot = bootstrap_f1({"x": text_counts(items), "same": text_counts(items), "better": text_counts(better)},
                        n_boot=300, seed=0)
    same = paired_difference(boot, "same", "x")
    assert same["a"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    up = paired_difference(boot, "better", "x")
    assert up["a"]["diff"] > 0 and up["a"]["lo"] > 0 and up["mean"]["lo"] > 0
    down = paired_difference(boot, "x", "better")
    assert down["a"]["hi"] < 0


def test_bootstrap_refuses_methods_scored_on_different_texts():
    rng = np.random.default_rng(3)
    a, b = _items(rng, 5, "a", 0.5), _items(rng, 5, "b", 0.5)
    with pytest.raises(ValueError, match="same texts"):
        bootstrap_f1({"x": text_counts(a), "y": text_counts(b)}, n_boot=10)


# ----- cluster bootstrap (texts that are windows over few source documents) ----------------------


def _width(r):
    return r["hi"] - r["lo"]


def test_cluster_weights_draw_whole_clusters_then_texts_within_them():
    rng = np.random.default_rng(0)
    w = cluster_weights(["a", "a", "a", "b", "b", "b"], 500, rng)
    assert w.shape == (500, 6) and (w.sum(1) == 6).all()  # two clusters of 3: always 6 texts
    per_cluster = np.stack([w[:, :3].sum(1), w[:, 3:].sum(1)], 1)
    assert set(per_cluster[:, 0].tolist()) == {0, 3, 6}  # a cluster is drawn 0, 1 or 2 times, whole
    assert (per_cluster[:, 0] == 6).mean() == pytest.approx(0.25, abs=0.06)
    again = cluster_weights(["a", "a", "a", "b", "b", "b"], 500, np.random.default_rng(0))
    assert (again == w).all()


def test_singleton_clusters_give_the_text_level_interval():
    rng = np.random.default_rng(4)
    items = _items(rng, 40, "a", 0.5) + _items(rng, 40, "b", 0.8)
    counts = {"m": text_counts(items)}
    text = bootstrap_f1(counts, n_boot=4000, seed=0)
    clus = cluster_bootstrap_f1(counts, list(range(80)), n_boot=4000, seed=1)
    for cat in ("a", "b", "mean"):
        assert clus["m"][cat]["f1"] == pytest.approx(text["m"][cat]["f1"])
        assert clus["m"][cat]["lo"] == pytest.approx(text["m"][cat]["lo"], abs=0.015)
        assert clus["m"][cat]["hi"] == pytest.approx(text["m"][cat]["hi"], abs=0.015)
    assert clus["m"]["a"]["clusters"] == 40 and clus["m"]["a"]["estimable"]


def test_identical_clusters_give_the_text_level_interval_of_the_pooled_texts():
    rng = np.random.default_rng(5)
    base = _items(rng, 8, "a", 0.5)
    items = base * 6  # six documents with the same eight texts
    counts = {"m": text_counts(items)}
    text = bootstrap_f1(counts, n_boot=4000, seed=0)["m"]["a"]
    clus = cluster_bootstrap_f1(counts, [i // 8 for i in range(48)], n_boot=4000, seed=1)["m"]["a"]
    assert clus["clusters"] == 6
    assert clus["lo"] == pytest.approx(text["lo"], abs=0.015) and clus["hi"] == pytest.approx(text["hi"], abs=0.015)


def test_documents_that_differ_widen_the_interval_beyond_the_text_level_one():
    # ten documents of five alike texts: five documents found every cut, five none
    good = [("a", [100, 200], [100, 200], 1000)] * 5
    bad = [("a", [50], [100, 200], 1000)] * 5
    items = [t for d in range(10) for t in (good if d % 2 else bad)]
    counts = {"m": text_counts(items)}
    text = bootstrap_f1(counts, n_boot=2000, seed=0)["m"]["a"]
    clus = cluster_bootstrap_f1(counts, [i // 5 for i in range(50)], n_boot=2000, seed=0)["m"]["a"]
    assert clus["f1"] == pytest.approx(text["f1"])
    assert _width(clus) > 1.8 * _width(text)  # about sqrt(5): five texts per document count as one


def test_one_cluster_has_no_interval_and_says_so():
    rng = np.random.default_rng(6)
    items = _items(rng, 20, "a", 0.5) + _items(rng, 20, "b", 0.5)
    better = [(c, sorted(set(p) | set(g[:2])), g, n) for c, p, g, n in items]
    clusters = ["doc-a"] * 20 + [f"b{i}" for i in range(20)]
    boot = cluster_bootstrap_f1({"x": text_counts(items), "better": text_counts(better)}, clusters, n_boot=200)
    a = boot["x"]["a"]
    assert a["clusters"] == 1 and not a["estimable"] and a["lo"] is None and a["hi"] is None
    assert a["f1"] == pytest.approx(evaluate(items)["a"]["f1"])
    assert boot["x"]["b"]["estimable"] and boot["x"]["b"]["lo"] < boot["x"]["b"]["hi"]
    assert not boot["x"]["mean"]["estimable"] and boot["x"]["mean"]["lo"] is None
    d = paired_difference(boot, "better", "x")
    assert d["a"]["diff"] > 0 and d["a"]["lo"] is None and not d["a"]["estimable"]
    assert d["b"]["lo"] > 0 and d["mean"]["lo"] is None


def test_cluster_bootstrap_pairs_methods_and_checks_its_inputs():
    rng = np.random.default_rng(7)
    items = _items(rng, 30, "a", 0.5)
    better = [(c, sorted(set(p) | set(g[:2])), g, n) for c, p, g, n in items]
    clusters = [i // 3 for i in range(30)]
    boot = cluster_bootstrap_f1({"x": text_counts(items), "same": text_counts(items), "better": text_counts(better)},
                                clusters, n_boot=300)
    same = paired_difference(boot, "same", "x")
    assert same["a"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "estimable": True}
    assert paired_difference(boot, "better", "x")["a"]["lo"] > 0
    with pytest.raises(ValueError, match="cluster ids"):
        cluster_bootstrap_f1({"x": text_counts(items)}, clusters[:-1], n_boot=10)


def test_source_document_is_the_document_a_record_starts_in():
    from vllm_blockattn.segmenter.corpora import source_document

    assert source_document("python3-doc:faq/gui.rst.txt+python3-doc:faq/library.rst.txt") == \
        "python3-doc:faq/gui.rst.txt"
    assert source_document("janeaustenr:emma#43+python3-doc:library/ssl.rst.txt#15") == "janeaustenr:emma"
    assert source_document("locomo:conv-26") == "locomo:conv-26"


# ----- the evidence script's headingless guide --------------------------------------------------


def _demo():
    spec = importlib.util.spec_from_file_location("_segmenter_demo", ROOT / "train" / "segmenter_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_guide_without_headings_meets_the_story_like_any_paragraph():
    demo = _demo()
    text = demo.example_text(demo.GUIDE_NO_HEADINGS)
    lines = text.split("\n")
    fence = False
    for ln in lines:
        fence = fence != ln.startswith("```")
        assert fence or not ln.startswith("#")
    at = text.index("Every evening at six")
    assert text[at - 2 : at] == "\n\n" and text[at - 3] != "\n"
    assert "```bash\npython -m venv .venv" in text  # code fences (and comments inside) stay
    assert demo.held_out("janeaustenr:emma", 0.25) and not demo.held_out("janeaustenr:prideprejudice", 0.25)


def test_every_packaged_segmenter_checkpoint_is_package_data():
    """A checkpoint directory inside the package (default_model, prose_model) that pyproject's
    package-data does not list would be missing from the installed wheel."""
    import fnmatch
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["vllm_blockattn.segmenter"]
    pkg = ROOT / "vllm_blockattn" / "segmenter"
    ckpts = sorted(p.parent for p in pkg.glob("*/segmenter_config.json"))
    assert {p.name for p in ckpts} >= {"default_model", "prose_model"}
    for ckpt in ckpts:
        for f in ("segmenter_config.json", "head.safetensors", "provenance.json", "README.md"):
            rel = f"{ckpt.name}/{f}"
            assert (ckpt / f).is_file() and any(fnmatch.fnmatch(rel, g) for g in globs), rel


def test_evidence_script_scores_saved_heads_without_shipping_them():
    with pytest.raises(SystemExit, match="cannot --ship"):
        _demo().main(["--eval-only", "--ship"])


def test_evidence_tables_recompute_from_the_saved_per_text_counts(tmp_path, capsys):
    demo = _demo()
    saved = ROOT / "docs" / "results" / "segmenter-cluster.json"
    summary = json.loads(saved.read_text())
    assert len(summary["per_text"]) == sum(summary["test_counts"].values())
    out = tmp_path / "again.json"
    demo.main(["--from-json", str(saved), "--boot", "200", "--results-json", str(out)])
    table = capsys.readouterr().out
    again = json.loads(out.read_text())
    assert again["per_text"] == summary["per_text"] and again["boot"] == 200
    for m in summary["methods"]:  # point estimates do not depend on the resampling
        for k in summary["kinds"]:
            assert again["bootstrap_cluster"][m][k]["f1"] == summary["bootstrap_cluster"][m][k]["f1"]
    assert again["documents_per_kind"] == summary["documents_per_kind"]
    assert "chat-faq (2 docs†)" in table and "over texts (as fixed before the run)" in table
    assert json.loads(demo.dumps_results({"a": 1, "per_text": [{"x": [1, 2]}]})) == {"a": 1, "per_text": [{"x": [1, 2]}]}
