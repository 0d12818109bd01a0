"""Segmenter pieces that need no segmentation model: candidates, metrics, records, builders (with a
fake local OpenAI-compatible endpoint), and the baselines (on the tiny Qwen3 LM)."""

import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from vllm_blockattn.segmenter.baselines import BASELINES, LMScorer, baseline_blocks, token_units
from vllm_blockattn.segmenter.candidates import (
    SegmenterInputError, as_text, cuts_of, find_candidates, split_at, spread,
)
from vllm_blockattn.segmenter.data import (
    AtomicJsonlWriter, Document, LabelingError, LLMLabeler, RecordError, build_concat_records, chunk_file_text,
    documents_from_files, main as data_main, make_record, mark_candidates, parse_cut_answer, read_records, validate_record,
)
from vllm_blockattn.segmenter.metrics import boundary_counts, evaluate, pk_windowdiff, prf

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----- candidates ---------------------------------------------------------------------------------


def test_newline_candidates_follow_each_newline_run():
    text = "a\nbb\n\n\nccc\n"
    assert find_candidates(text) == [2, 7]  # after "a\n" and after "bb\n\n\n"; the final newline ends the text
    blocks = split_at(text, find_candidates(text))
    assert blocks == ["a\n", "bb\n\n\n", "ccc\n"]
    assert "".join(blocks) == text and cuts_of(blocks) == [2, 7]


def test_custom_pattern_and_bad_patterns():
    assert find_candidates("One. Two! Three? x", r"[.!?] ") == [5, 10, 17]
    with pytest.raises(SegmenterInputError, match="empty string"):
        find_candidates("abc", r"\n*")
    with pytest.raises(SegmenterInputError, match="not a valid regex"):
        find_candidates("abc", r"(")


def test_text_checks_reject_binary_and_name_the_input():
    assert as_text("héllo".encode()) == "héllo"
    with pytest.raises(SegmenterInputError, match="file.bin.*NUL"):
        as_text(b"ab\x00cd", "file.bin")
    with pytest.raises(SegmenterInputError, match="not UTF-8"):
        as_text(b"\xff\xfe\xfa")
    with pytest.raises(SegmenterInputError, match="str or bytes"):
        as_text(12)
    assert split_at("", []) == []
    with pytest.raises(SegmenterInputError, match="not inside"):
        split_at("abc", [3])


def test_spread_picks_points_nearest_equal_targets():
    assert spread(range(1, 100), 3, 100) == [25, 50, 75]
    assert spread([10, 11, 90], 2, 100) == [11, 90]
    with pytest.raises(SegmenterInputError):
        spread([5], 2, 10)


# ----- metrics ------------------------------------------------------------------------------------


def test_boundary_matching_with_tolerance_is_one_to_one():
    assert boundary_counts([10, 11], [10], tol=3) == (1, 2, 1)
    assert boundary_counts([14], [10], tol=3) == (0, 1, 1)
    assert boundary_counts([13], [10], tol=3) == (1, 1, 1)
    p, r, f = prf(1, 2, 1)
    assert (p, r) == (0.5, 1.0) and f == pytest.approx(2 / 3)


def test_pk_and_windowdiff_known_values():
    assert pk_windowdiff([50], [50], 100) == (0.0, 0.0)
    # k = 25; a hypothesis with no cut disagrees wherever a window straddles the true cut at 50.
    pk, wd = pk_windowdiff([], [50], 100)
    assert pk == pytest.approx(25 / 75) and wd == pytest.approx(25 / 75)
    # an extra cut: windowdiff counts the windows around it too, Pk only where "same block" flips
    pk2, wd2 = pk_windowdiff([50, 52], [50], 100)
    assert wd2 > pk2 > 0.0


def test_evaluate_reports_each_category_and_all():
    out = evaluate([("code", [10], [10], 40), ("chat", [5], [20], 40)], tol=0)
    assert out["code"]["f1"] == 1.0 and out["chat"]["f1"] == 0.0
    assert out["all"]["precision"] == 0.5 and out["all"]["n"] == 2
    assert set(out["chat"]) == {"precision", "recall", "f1", "pk", "windowdiff", "n"}


# ----- records and the self-supervised builder ----------------------------------------------------


def test_validate_record_names_the_problem():
    good = {"text": "a\nb", "candidates": [2], "labels": [1], "category": "x"}
    assert validate_record(good) is good
    for bad, msg in [({**good, "labels": [2]}, "0 or 1"), ({**good, "candidates": [3]}, "inside"),
                     ({**good, "labels": []}, "1 candidates but 0 labels"), ({"text": "a"}, "missing field")]:
        with pytest.raises(RecordError, match=msg):
            validate_record(bad, "line 7")


def test_concat_builder_labels_exactly_the_seams(tmp_path):
    docs = [Document(f"{src} line {i}\n{src} more {i}\n", src, "prose") for src in "ABC" for i in range(3)]
    recs = build_concat_records(docs, 6, min_docs=2, max_docs=3, seed=1)
    assert len(recs) == 6
    for rec in recs:
        validate_record(rec)
        parts = [p for p in rec["text"].split("\n") if " line " in p]  # each document's first line
        sources = [p[0] for p in parts]
        assert len(set(sources)) == len(sources)  # documents of distinct sources
        seams = [c for c, y in zip(rec["candidates"], rec["labels"]) if y]
        assert [rec["text"][c] for c in seams] == sources[1:]  # every cut starts the next document
        assert len(seams) == len(parts) - 1 and sum(rec["labels"]) == len(seams)
        assert "\n\n" not in rec["text"]  # documents without blank lines meet with a single newline, too
    f = tmp_path / "a.txt"
    f.write_text("x" * 50 + "\n" + "y" * 50 + "\n\n" + "z" * 300 + "\n")
    got = documents_from_files([f, tmp_path / "missing.txt"], "prose", min_chars=60, max_chars=80)
    assert [d.text for d in got] == ["x" * 50 + "\n" + "y" * 50 + "\n", "z" * 300 + "\n"]


def test_concat_builder_joins_documents_as_their_own_parts_are_joined():
    paras = [Document(f"{s} para {i}.\n\n{s} more {i}.\n", s, "prose", "MIT", "1.0") for s in "ABC" for i in range(3)]
    chat = [Document(f"{s}: hi {i}\n{s}: bye {i}\n", s, "chat") for s in "XYZ" for i in range(3)]
    for rec in build_concat_records(paras + chat, 6, min_docs=3, max_docs=3, seed=2):
        before = {c: re.search(r"\n+$", rec["text"][:c]).group(0) for c in rec["candidates"]}
        seams = [c for c, y in zip(rec["candidates"], rec["labels"]) if y]
        others = [c for c, y in zip(rec["candidates"], rec["labels"]) if not y]
        # the whitespace before a seam is the whitespace before a non-seam: no layout leak
        assert {before[c] for c in seams} == {before[c] for c in others}
        if rec["category"] == "prose":
            assert rec["license"] == "MIT" and rec["version"] == "1.0"
        else:
            assert "license" not in rec and "\n\n" not in rec["text"]
    with pytest.raises(ValueError, match="newlines only"):
        build_concat_records(paras, 2, sep=" | ")


def test_concat_builder_mixes_kinds_on_request():
    docs = [Document(f"{src} text {i}\n", src, "prose" if src in "AB" else "code") for src in "ABCD" for i in range(2)]
    recs = build_concat_records(docs, 8, min_docs=4, max_docs=4, seed=0, mixed=0.5)
    assert [r["category"] for r in recs] == ["mixed"] * 4 + ["code", "prose"] * 2
    assert all(sorted(r["source"].split("+")) == list("ABCD") for r in recs[:4])  # every kind meets every other
    assert all(sum(r["labels"]) == 3 for r in recs[:4])
    with pytest.raises(ValueError, match="share"):
        build_concat_records(docs, 2, mixed=1.5)


def test_chunker_cuts_at_blank_lines_when_the_file_has_them():
    text = "".join(f"line {i}\n" + ("\n" if i % 5 == 4 else "") for i in range(60))
    docs = chunk_file_text(text, "f", "code", min_chars=40, max_chars=60)
    assert all(d.text.startswith("line ") and d.text.endswith("\n") for d in docs)
    assert all(int(d.text.split()[1]) % 5 == 0 for d in docs)  # each starts right after a blank line


def test_atomic_writer_never_leaves_half_a_record(tmp_path):
    out = tmp_path / "out.jsonl"
    good = {"text": "a\nb", "candidates": [2], "labels": [0], "category": "x"}
    with pytest.raises(RecordError):
        with AtomicJsonlWriter(out) as w:
            w.write(good)
            assert not out.exists()  # nothing visible before close
            w.write({**good, "labels": ["oops"]})
    assert not out.exists()  # a failed run never replaces the output
    partial = tmp_path / "out.jsonl.partial"
    assert [r["labels"] for r in read_records(partial)] == [[0]]  # the complete record is kept, the bad one never written
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl.partial"]  # no temporary file left behind
    out.write_text(json.dumps(good) + "\n")
    with pytest.raises(KeyboardInterrupt):
        with AtomicJsonlWriter(out) as w:
            w.write({**good, "labels": [1]})
            raise KeyboardInterrupt
    assert [r["labels"] for r in read_records(out)] == [[0]]  # Ctrl-C: the previous output is untouched
    with AtomicJsonlWriter(out) as w:
        w.write({**good, "labels": [1]})
    assert [r["labels"] for r in read_records(out)] == [[1]]


# ----- labelling through a fake OpenAI-compatible endpoint ----------------------------------------


class FakeEndpoint:
    """A local chat-completions server that returns the queued replies in order."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                content = outer.replies.pop(0) if outer.replies else "still not json"
                payload = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


TEXT = "Intro line.\nMore intro.\nChapter two starts.\nIt goes on.\n"


def test_parse_cut_answer_accepts_json_and_rejects_bad_indices():
    assert parse_cut_answer('{"cuts": [2, 0]}', 3) == [0, 2]
    assert parse_cut_answer('Sure!\n```json\n{"cuts": [1]}\n```', 3) == [1]
    assert parse_cut_answer("[1]", 3) == [1]
    for bad, msg in [("nope", "no JSON"), ('{"cuts": [3]}', "out of range"), ('{"cuts": [1, 1]}', "duplicate"),
                     ('{"keep": [1]}', "no 'cuts'"), ('{"cuts": ["1"]}', "not an integer"), ("", "empty")]:
        with pytest.raises(ValueError, match=msg):
            parse_cut_answer(bad, 3)


def test_labeler_retries_malformed_answers_then_writes_the_valid_one(tmp_path):
    replies = ["I think marker one", '{"cuts": [7]}', '{"cuts": [1]}']
    with FakeEndpoint(replies) as url:
        labeler = LLMLabeler(url, "fake-model", max_retries=2)
        rec = labeler.label(TEXT, "prose")
    assert labeler.attempts == 3
    assert rec["candidates"] == [12, 24, 44] and rec["labels"] == [0, 1, 0]
    assert TEXT[24:].startswith("Chapter two")


def test_labeler_gives_up_after_bounded_retries_and_writes_nothing_bad(tmp_path):
    fake = FakeEndpoint(["garbage", "[9]", "{}", '{"cuts": [0]}', "junk", "junk"])
    with fake as url:
        labeler = LLMLabeler(url, "fake-model", max_retries=2)
        with pytest.raises(LabelingError, match="after 3 attempts"):
            labeler.label(TEXT, "prose")
        assert len(fake.requests) == 3
        # the retry showed the model its bad answer and the reason
        assert "no JSON" in fake.requests[1]["messages"][-1]["content"]
        assert "out of range" in fake.requests[2]["messages"][-1]["content"]
        out = tmp_path / "labels.jsonl"
        stats = labeler.label_all([(TEXT, "prose"), (TEXT, "prose")], out, progress=False)
    assert stats == {"written": 1, "failed": 1, "resumed": 0}
    assert [r["labels"] for r in read_records(out)] == [[1, 0, 0]]
    assert mark_candidates(TEXT, [12]).startswith("Intro line.\n[[0]]More")


def test_builder_cli_label_and_concat(tmp_path, capsys):
    src = tmp_path / "texts.jsonl"
    src.write_text(json.dumps({"text": TEXT, "category": "prose"}) + "\n" + json.dumps({"text": TEXT}) + "\n")
    with FakeEndpoint(["oops", '{"cuts": [1]}', '{"cuts": [0, 2]}']) as url:
        rc = data_main(["label", "--input", str(src), "--output", str(tmp_path / "l.jsonl"), "--base-url", url,
                        "--model", "m", "--max-retries", "1"])
    assert rc == 0 and json.loads(capsys.readouterr().out) == {"written": 2, "failed": 0, "resumed": 0}
    assert [(r["labels"], r["category"]) for r in read_records(tmp_path / "l.jsonl")] == [
        ([0, 1, 0], "prose"), ([1, 0, 1], "default")]
    files = []
    for name in ("a", "b", "c"):
        f = tmp_path / f"{name}.txt"
        f.write_text("".join(f"{name} line {i}\n" for i in range(40)))
        files.append(str(f))
    rc = data_main(["concat", "--files", *files, "--category", "code", "--output", str(tmp_path / "c.jsonl"),
                    "--n", "5", "--min-chars", "40", "--max-chars", "80"])
    recs = read_records(tmp_path / "c.jsonl")
    assert rc == 0 and len(recs) == 5 and all(r["category"] == "code" and sum(r["labels"]) >= 1 for r in recs)


# ----- baselines ----------------------------------------------------------------------------------

LONG = "".join(f"Sentence {i} talks about topic {i // 7}. It has detail {i * 3}!\n" for i in range(40))


@pytest.fixture(scope="module")
def scorer(tiny_qwen3):
    return LMScorer.from_pretrained(tiny_qwen3, window=128, overlap=32)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("k", [1, 2, 7, 41, 60])
def test_each_baseline_returns_exactly_k_blocks(name, k, scorer):
    blocks = baseline_blocks(name, LONG, k, tokenizer=scorer.tokenizer, scorer=scorer, seed=3)
    assert len(blocks) == k
    assert "".join(blocks) == LONG and all(blocks)


def test_candidate_baselines_cut_at_candidates_and_average_balances_tokens(scorer):
    cands = set(find_candidates(LONG))
    for name in ("random_candidate", "average_candidate"):
        assert set(cuts_of(baseline_blocks(name, LONG, 6, tokenizer=scorer.tokenizer))) <= cands
    sizes = [len(scorer.tokenizer(b)["input_ids"]) for b in baseline_blocks("average", LONG, 5, tokenizer=scorer.tokenizer)]
    assert max(sizes) - min(sizes) <= 0.05 * sum(sizes)


def test_topk_baselines_take_the_best_token_of_each_chunk(scorer):
    text, k = LONG, 5
    units, first = token_units(text, scorer.tokenizer)
    _ids, loss, ent = scorer.token_scores(text)
    cuts = cuts_of(baseline_blocks("loss_topk", text, k, scorer=scorer))
    edges = [round(j * len(units) / (k - 1)) for j in range(k)]
    for (a, b), c in zip(zip(edges, edges[1:]), cuts):
        chunk_scores = loss[first[a:b]]
        assert units[a] <= c < (units[b] if b < len(units) else len(text))  # one cut per chunk: no clustering
        assert loss[first[units.index(c)]] == chunk_scores.max()
    assert cuts_of(baseline_blocks("entropy_topk", text, k, scorer=scorer)) != cuts


def test_lm_scores_over_windows_match_a_single_pass_in_the_first_window(tiny_qwen3, scorer):
    whole = LMScorer(scorer.model, scorer.tokenizer, window=4096, overlap=32)
    ids, loss_w, ent_w = scorer.token_scores(LONG)
    _, loss_1, ent_1 = whole.token_scores(LONG)
    assert len(ids) > 2 * scorer.window  # several windows really ran
    assert torch.allclose(loss_w[: scorer.window], loss_1[: scorer.window], atol=1e-5)
    assert (loss_w[1:] > 0).all() and (ent_w[1:] > 0).all()  # every token scored, none left out


def test_baseline_errors_are_clear(scorer):
    with pytest.raises(SegmenterInputError, match="positive int"):
        baseline_blocks("average", LONG, 0)
    with pytest.raises(SegmenterInputError, match="cannot make"):
        baseline_blocks("random", "two words", 5)
    with pytest.raises(SegmenterInputError, match="needs an LMScorer"):
        baseline_blocks("loss_topk", LONG, 3)
    with pytest.raises(SegmenterInputError, match="unknown baseline"):
        baseline_blocks("magic", LONG, 3)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_label_run_interrupted_keeps_output_and_resumes(tmp_path):
    out = tmp_path / "labels.jsonl"
    out.write_text("")  # an earlier run's output
    items = [(TEXT, "prose"), (TEXT + "x\n", "prose"), (TEXT + "y\n", "prose")]
    calls = []

    class Flaky(LLMLabeler):
        def label(self, text, category, **extra):
            calls.append(text)
            if len(calls) == 3:
                raise KeyboardInterrupt  # Ctrl-C in the middle of the third text
            cands = find_candidates(text)
            return make_record(text, cands, cands[:1], category, **extra)

    labeler = Flaky("http://127.0.0.1:9/v1", "m")
    with pytest.raises(KeyboardInterrupt):
        labeler.label_all(items, out, progress=False)
    assert out.read_text() == ""  # untouched
    assert [r["id"] for r in read_records(tmp_path / "labels.jsonl.partial")] == ["0", "1"]
    calls.clear()
    calls.append("skip the interrupt")  # the next call is the second one: it succeeds
    stats = labeler.label_all(items, out, progress=False)
    assert stats == {"written": 3, "failed": 0, "resumed": 2} and len(calls) == 2  # only the third text asked
    assert [r["id"] for r in read_records(out)] == ["0", "1", "2"]
    assert not (tmp_path / "labels.jsonl.partial").exists()


def test_empty_choices_are_retried_and_bad_input_lines_are_named(tmp_path, capsys):
    with FakeEndpoint(['{"cuts": [1]}']) as url:
        labeler = LLMLabeler(url, "m", max_retries=1)
        real = labeler.client.chat.completions.create
        answers = iter([type("R", (), {"choices": []})(), None])

        def create(**kw):
            a = next(answers)
            return a if a is not None else real(**kw)

        labeler.client.chat.completions.create = create
        rec = labeler.label(TEXT, "prose")
    assert rec["labels"] == [0, 1, 0] and labeler.attempts == 2
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "a\\nb"}\n{not json\n')
    rc = data_main(["label", "--input", str(bad), "--output", str(tmp_path / "o.jsonl"), "--base-url",
                    "http://127.0.0.1:9/v1", "--model", "m"])
    assert rc == 2 and f"{bad}:2: not JSON" in capsys.readouterr().err
