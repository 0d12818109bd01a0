"""The workload benchmark (eval/bench_workload.py): what each workload sends per system, the closed-loop
dispatcher, and (slow) one tiny run of every workload end to end against real servers."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCOMO = os.path.join(REPO, "tests", "fixtures", "parity", "locomo_conversation.json")


@pytest.fixture(scope="module")
def bw():
    spec = importlib.util.spec_from_file_location("_bench_workload", os.path.join(REPO, "eval", "bench_workload.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(bw, tiny_qwen3):
    from transformers import AutoTokenizer

    from vllm_blockattn import BlockSettings

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    settings = BlockSettings.from_pretrained(tiny_qwen3)
    args = argparse.Namespace(
        corpus=16, doc_tokens=40, docs_per_request=3, zipf=1.1, question_tokens=6, answer_tokens=5, requests=6,
        locomo=LOCOMO, chat_conversations=1, chat_session=3, chat_turns=4, chat_answer_tokens=7, chat_prime=True,
        chat_layout=["plain", "sessions"], chat_block_turns=0, mixed_conversations=1, systems=list(bw.SYSTEMS),
        seed=0, pressure_requests=5, pressure_factor=5.0, pressure_checks=2, check_tokens=4)
    clean = bw.clean_vocab(tok)
    e = bw.Encoded(tok, settings)
    chat = bw.chat_stream(args, tok)
    rag = bw.rag_stream(args, args.corpus, args.requests, tok, clean, args.seed)
    infos = {w: bw.build_workload(w, args, e, clean, chat, rag) for w in ("chat", "ragchat", "rag", "mixed")}
    return argparse.Namespace(tok=tok, settings=settings, args=args, clean=clean, e=e, chat=chat, rag=rag, infos=infos)


def prompts(run):
    return [it["prompt"] for lane in run["lanes"] for it in lane]


def layout_of(ids, settings):
    from vllm_blockattn import parse_block_prompt

    lay = parse_block_prompt(ids, settings)
    return [list(ids[b.content_start:b.end]) for b in lay.blocks]


def test_text_chunks_reencode(bw, setup):
    import random

    rng = random.Random(1)
    for n in (1, 5, 40, 200):
        ids = bw.text_chunk(rng, setup.clean, setup.tok, n)
        assert len(ids) == n and setup.tok.encode(setup.tok.decode(ids), add_special_tokens=False) == ids
    # every document of the stream has exactly --doc-tokens tokens
    assert {len(d) for d in setup.rag["docs"]} == {setup.args.doc_tokens}


def test_chat_plain_layout_is_stock(bw, setup):
    runs, conv = setup.infos["chat"]["runs"], setup.chat["conversations"][0]
    assert set(runs) == {"stock", "blockattn", "blockattn-sessions"}
    assert prompts(runs["blockattn"]) == prompts(runs["stock"])
    assert runs["blockattn"]["primes"] == runs["stock"]["primes"]
    sink = setup.settings.sink_token_id
    assert all(sink not in p for p in prompts(runs["stock"]))
    assert all(sink in p for p in prompts(runs["blockattn-sessions"]))  # the window crosses session changes
    # each prompt without its cue is an exact prefix of the next turn's prompt (what APC reuses)
    ps = prompts(runs["stock"])
    cues = [len(bw.chat_cue(conv, k, setup.tok)) for k in conv["turns"]]
    assert all(b[:len(a) - c] == a[:-c] for a, b, c in zip(ps, ps[1:], cues))


def test_ragchat_layouts(bw, setup):
    info, e, args, conv = setup.infos["ragchat"], setup.e, setup.args, setup.chat["conversations"][0]
    ranks = info["stream"]["popularity_rank_of_doc"]
    corpus = bw.rag_stream(args, args.corpus, 1, setup.tok, setup.clean, args.seed + 1)["docs"]  # ragchat's own
    runs = info["runs"]
    for k, stock, popular, block in zip(conv["turns"], prompts(runs["stock"]), prompts(runs["stock-popular"]),
                                        prompts(runs["blockattn"])):
        retrieved = info["stream"]["retrieved"][f"{conv['id']}/{k}"]
        head = e.ragchat_instr + conv["intro"] + [t for u in conv["units"][:k] for t in u]
        final = conv["units"][k] + bw.chat_cue(conv, k, setup.tok)
        # blockattn: the history is the head, each document a block, the new turn and cue the final block
        assert layout_of(block, setup.settings) == [head, *(corpus[d] for d in retrieved), final]
        # stock: history, then the documents (retrieval order / most popular first), then the turn
        assert stock == head + [t for d in retrieved for t in corpus[d] + e.sep] + final
        by_rank = sorted(retrieved, key=lambda d: ranks[d])
        assert popular == head + [t for d in by_rank for t in corpus[d] + e.sep] + final
    # the head grows turn by turn: the previous head is a prefix of the next (vLLM's prefix chain reuses it)
    heads = [layout_of(p, setup.settings)[0] for p in prompts(runs["blockattn"])]
    assert all(b[:len(a)] == a and len(b) > len(a) for a, b in zip(heads, heads[1:]))


def test_rag_orders(bw, setup):
    rag, e, runs = setup.rag, setup.e, setup.infos["rag"]["runs"]
    for req, stock, popular, block in zip(rag["requests"], prompts(runs["stock"]), prompts(runs["stock-popular"]),
                                          prompts(runs["blockattn"])):
        q = e.q_head + req["question"] + e.q_tail
        order = sorted(req["docs"], key=lambda d: rag["ranks"][d])
        assert [rag["ranks"][d] for d in order] == sorted(rag["ranks"][d] for d in req["docs"])
        assert stock == e.instr + [t for d in req["docs"] for t in rag["docs"][d] + e.sep] + q
        assert popular == e.instr + [t for d in order for t in rag["docs"][d] + e.sep] + q
        assert layout_of(block, setup.settings) == [e.instr, *(rag["docs"][d] for d in req["docs"]), q]
        # the text form (--vllm-bench-serve) tokenizes back to the same ids
        text = setup.tok.decode(block, skip_special_tokens=False)
        assert setup.tok.encode(text, add_special_tokens=False) == block


def test_mixed_interleaves_plain_and_block(setup):
    runs, sink = setup.infos["mixed"]["runs"], setup.settings.sink_token_id
    assert set(runs) == {"stock", "blockattn"}
    for name, run in runs.items():
        kinds = [lane[0]["kind"] for lane in run["lanes"]]
        assert kinds[:2] == ["chat", "rag"]
        n_chat = sum(len(lane) for lane in run["lanes"] if lane[0]["kind"] == "chat")
        n_rag = sum(len(lane) for lane in run["lanes"] if lane[0]["kind"] == "rag")
        assert n_chat == n_rag == 4
        for lane in run["lanes"]:
            for it in lane:
                assert (sink in it["prompt"]) == (name == "blockattn" and it["kind"] == "rag")
    chat = lambda r: [it["prompt"] for lane in r["lanes"] for it in lane if it["kind"] == "chat"]  # noqa: E731
    assert chat(runs["stock"]) == chat(runs["blockattn"])


def test_pressure_sizing(bw, setup):
    args = setup.args
    assert bw.pressure_corpus_size(args, 4096) * args.doc_tokens >= 5 * 4096
    info = bw.build_pressure(args, setup.e, setup.clean, 4096)
    c = info["config"]
    assert c["corpus_over_capacity"] >= 5 and c["corpus"] == len(info["_stream"]["docs"])
    assert c["corpus_tokens"] == c["corpus"] * args.doc_tokens
    assert set(info["runs"]) == set(bw.SYSTEMS) and len(info["runs"]["stock"]["lanes"]) == args.pressure_requests


def test_rag_ceilings(bw):
    ranks = [3, 1, 2]  # document 1 is the most popular
    reqs = [{"docs": [0, 1]}, {"docs": [1, 0]}, {"docs": [2, 1]}]
    c = bw.rag_ceilings(reqs, ranks)
    assert c["documents_retrieved"] == 3 and c["block_reuse"] == pytest.approx(3 / 6)
    # retrieval order: no request starts like an earlier one; most popular first: [1,0], [1,0], [1,2]
    assert c["prefix_reuse_retrieval_order"] == 0
    assert c["prefix_reuse_popular_first"] == pytest.approx((2 + 1) / 6)


def test_run_lanes_closed_loop(bw):
    active: dict[int, int] = {}
    lock = threading.Lock()
    seen = []

    def send(lane, it):
        with lock:
            assert active.get(lane, 0) == 0  # a lane's items never overlap
            active[lane] = 1
            seen.append(it)
        time.sleep(0.01)
        with lock:
            active[lane] = 0
        return it

    lanes = [["a1", "a2", "a3"], ["b1"], ["c1", "c2"], ["d1"], ["e1"]]
    out = bw.run_lanes(lanes, 2, send)
    assert sorted(out) == sorted(x for lane in lanes for x in lane)
    for lane in lanes:
        assert [x for x in seen if x in lane] == lane
    # a finished item's lane goes on first: a2 is sent before d1 and e1
    assert seen.index("a2") < seen.index("d1")
    with pytest.raises(RuntimeError, match="boom"):
        bw.run_lanes([["x"], ["y"]], 2, lambda lane, it: (_ for _ in ()).throw(RuntimeError("boom")))


def test_kv_cache_space_env(bw):
    assert bw.kv_cache_space_env(4.0) == "4" and bw.kv_cache_space_env("2") == "2"
    with pytest.raises(ValueError):
        bw.kv_cache_space_env(0.5)


def test_report_tables(bw, tmp_path):
    """Aggregates, the verdict ratios and the tables from synthetic records, a failed run included."""
    zero = dict.fromkeys(bw.METRICS, 0.0)

    def recs(ttft, kind="rag"):
        return [{"kind": kind, "ttft": t, "itl": 0.01, "e2e": t + 1, "prompt_tokens": 100, "cached_tokens": 50,
                 "completion_tokens": 8} for t in ttft]

    after = {**zero, "vllm:prefix_cache_queries_total": 200.0, "vllm:prefix_cache_hits_total": 50.0}
    stock = bw.aggregate(recs([1.0, 3.0]), 4.0, zero, after)
    block = bw.aggregate(recs([0.5, 0.5]) + recs([0.2], "chat") + [{"kind": "chat", "error": "x", "e2e": 1}], 2.0,
                         zero, after)
    assert stock["ttft_s"]["mean"] == 2.0 and stock["prefix_cache_hit_rate"] == 0.25
    assert stock["usage_cached_fraction"] == 0.5 and stock["kv_written_tokens"] == 2 * (100 - 50 + 8)
    assert block["errors"] == 1 and set(block["by_kind"]) == {"chat", "rag"}
    report = {"provenance": {"command": "x", "cpu": "cpu", "machine": "m", "vllm_version": "0.32.0",
                             "dtype": "float32", "model": "m", "concurrency": 2, "block_size": 32,
                             "vllm_blockattn_commit": "abc", "date": "d"},
              "workloads": {"rag": {"systems": {"stock": {"aggregate": stock, "records": []},
                                                "stock-popular": {"failed": "boom"},
                                                "blockattn": {"aggregate": block, "records": []}}}}}
    (v,) = [r for r in bw.verdict(report) if r["workload"] == "rag"]
    assert v["baseline"] == "stock" and v["ttft_mean"] == pytest.approx(0.4 / 2.0)
    assert v["requests_per_s"] == pytest.approx((3 / 2.0) / (2 / 4.0))  # answered requests only
    md = bw.markdown(report)
    assert "| rag | stock-popular | failed |" in md and "| rag (chat half) | blockattn |" in md
    assert "| rag | blockattn | 4 (1 failed) |" in md
    bw.plot(report, str(tmp_path / "w.png"))
    assert (tmp_path / "w.png").stat().st_size > 0


@pytest.mark.slow
def test_every_workload_end_to_end(bw, tiny_qwen3, tmp_path):
    """A tiny run of every workload and system (two server pairs, about 3-4 minutes on 2 cores)."""
    out = tmp_path / "workload"
    argv = ["--model", tiny_qwen3, "--out", str(out), "--locomo", LOCOMO, "--concurrency", "2",
            "--requests", "6", "--corpus", "16", "--doc-tokens", "64", "--docs-per-request", "3",
            "--question-tokens", "8", "--answer-tokens", "8", "--chat-conversations", "1", "--chat-turns", "4",
            "--chat-answer-tokens", "8", "--chat-layout", "plain", "sessions", "--mixed-conversations", "1",
            "--pressure-requests", "12", "--pressure-kv-tokens", "2048", "--pressure-checks", "2",
            "--check-tokens", "8", "--vllm-bench-serve"]
    report = bw.main(argv)
    assert (out / "workload.md").exists() and (out / "workload.png").exists()
    saved = json.loads((out / "workload.json").read_text())
    assert saved["workloads"].keys() == report["workloads"].keys() == {"chat", "ragchat", "rag", "mixed", "pressure"}
    prov = saved["provenance"]
    assert prov["vllm_version"] and prov["cpu"] and prov["vllm_blockattn_commit"]
    assert "--vllm-bench-serve" in prov["command"]
    expected = {"chat": {"stock", "blockattn", "blockattn-sessions"}, "ragchat": set(bw.SYSTEMS),
                "rag": set(bw.SYSTEMS), "mixed": {"stock", "blockattn"}, "pressure": set(bw.SYSTEMS)}
    for workload, entry in saved["workloads"].items():
        assert set(entry["systems"]) == expected[workload], workload
        for system, res in entry["systems"].items():
            a = res["aggregate"]
            assert a["errors"] == 0 and a["requests"] == len(res["records"]) > 0, (workload, system)
            assert a["cache_reset"]["probe_cached_tokens_after_reset"] == 0
            assert a["ttft_s"]["p50"] > 0 and a["requests_per_s"] > 0
    w = saved["workloads"]
    # plain chat on the blockattn server is the same traffic as stock: the same prompt tokens, and cached
    assert w["chat"]["systems"]["blockattn"]["aggregate"]["prompt_tokens"] == \
        w["chat"]["systems"]["stock"]["aggregate"]["prompt_tokens"]
    assert w["chat"]["systems"]["blockattn"]["aggregate"]["usage_cached_tokens"] > 0
    assert w["rag"]["systems"]["blockattn"]["aggregate"]["reused_block_tokens"] > 0
    assert w["ragchat"]["systems"]["blockattn"]["aggregate"]["usage_cached_tokens"] > 0
    assert set(w["mixed"]["systems"]["blockattn"]["aggregate"]["by_kind"]) == {"chat", "rag"}
    # vllm bench serve drove rag on every system
    for system, res in w["rag"]["systems"].items():
        b = res["vllm_bench_serve"]
        assert b["returncode"] == 0 and b["summary"]["completed"] == 6 and b["summary"]["failed"] == 0, b
        assert (out / b["result_file"]).exists()
    assert w["rag"]["systems"]["blockattn"]["vllm_bench_serve"]["metrics_delta"][
        "vllm_blockattn:block_requests_total"] == 6
    # cache pressure: corpus >= 5x the cache, eviction happened, every request answered, greedy checks pass
    c = w["pressure"]["config"]
    assert c["kv_capacity_tokens"] == 2048 and c["corpus_tokens"] >= 5 * 2048
    for system, res in w["pressure"]["systems"].items():
        a = res["aggregate"]
        assert a["evictions"]["happened"] and a["evictions"]["pages_reallocated"] > 0, system
        assert a["correctness"]["all_answered"] and a["correctness"]["passed"], a["correctness"]
        assert a["correctness"]["matched"] == 2  # the sharpened tiny model has no near ties
    # re-rendering from the JSON gives the same table
    md = (out / "workload.md").read_text()
    bw.main(["--from-json", str(out / "workload.json")])
    assert (out / "workload.md").read_text() == md
    assert "| pressure | blockattn |" in md and "vllm bench serve" in md
