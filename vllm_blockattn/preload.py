"""Load documents into the block cache before the first question.

Offline, with an ``LLM`` that runs the backend::

    from vllm_blockattn import preload_documents
    summary = preload_documents(llm, ["doc one ...", {"title": "T", "text": "doc two ..."}])

Against a server started with ``VLLM_PLUGINS=blockattn`` (which enables ``POST /v1/blocks``)::

    vllm-blockattn preload corpus.jsonl --url http://127.0.0.1:8000 --model NAME [--cache-salt T]

``corpus.jsonl`` holds one document per line: a JSON string, or an object with ``text`` and an
optional ``title`` (the shapes of ``documents`` in chat and completions requests). Documents go to
the server in batches with a progress bar; the summary says how many documents, blocks and tokens
were loaded and how many tokens were already cached. A batch the server refuses is reported with its
line numbers and the rest still load (exit status 1 at the end).

Either way a preloaded document is keyed exactly as in any later request that carries it, so it is a
block-cache hit there at any position (``core/preload.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from .core.config import get_block_config
from .core.preload import final_block_ids, plan_preload
from .core.request_options import parse_documents


def preload_documents(llm, documents: Sequence, *, cache_salt: str | None = None, lora_request=None,
                      use_tqdm: bool = True) -> dict:
    """Run the preload prompts of ``documents`` on ``llm`` (one generated token each, discarded).

    Returns ``{"documents", "blocks", "prompt_tokens", "cached_tokens", "requests"}``. Raises
    ValueError naming the document that is malformed or cannot fit the model on its own."""
    from vllm import SamplingParams

    cfg = get_block_config(llm.llm_engine.vllm_config)
    tokenizer = llm.get_tokenizer()
    docs = parse_documents(list(documents))
    if docs is None:
        return {"documents": 0, "blocks": 0, "prompt_tokens": 0, "cached_tokens": 0, "requests": 0}
    encoded = [[tokenizer.encode(d, add_special_tokens=False)] for d in docs]
    plan = plan_preload(encoded, cfg.settings, cfg.page_size, cfg.max_model_len,
                        final_block_ids(tokenizer, cfg.settings))
    prompts = [{"prompt_token_ids": ids, **({"cache_salt": cache_salt} if cache_salt else {})}
               for ids in plan.prompts]
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    outs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=use_tqdm)
    cached = sum(int(o.num_cached_tokens or 0) for o in outs)
    return {"documents": len(docs), "blocks": plan.blocks, "prompt_tokens": plan.tokens, "cached_tokens": cached,
            "requests": len(plan.prompts)}


# -- command line: stream a JSONL corpus to a server -------------------------------------------------


def _read_corpus(path: str):
    """(line number, document) for every non-blank line; a line that is not JSON is an error."""
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    try:
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not a JSON value ({e.msg})") from None
    finally:
        if stream is not sys.stdin:
            stream.close()


def _post(url: str, body: dict, timeout: float) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {"error": {"message": str(e)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vllm-blockattn preload", description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", help="JSONL file, one document per line (a string or {text, title}); - for stdin")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    ap.add_argument("--model", default=None, help="served model name or LoRA adapter (default: the server's)")
    ap.add_argument("--cache-salt", default=None, help="the tenant's cache_salt, as its requests will send it")
    ap.add_argument("--segment", default=None,
                    help='"auto" to have the server cut each document as requests with "segment": "auto" will')
    ap.add_argument("--batch-size", type=int, default=16, help="documents per request")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be positive")
    from tqdm import tqdm

    url = args.url.rstrip("/") + "/v1/blocks"
    total = {"documents": 0, "blocks": 0, "prompt_tokens": 0, "cached_tokens": 0, "requests": 0}
    failed: list[str] = []
    start = time.perf_counter()
    bar = tqdm(unit="doc", disable=args.no_progress, desc="preload")

    def send(batch: list[tuple[int, object]]) -> None:
        body = {"documents": [d for _, d in batch]}
        for key, value in (("model", args.model), ("cache_salt", args.cache_salt), ("segment", args.segment)):
            if value is not None:
                body[key] = value
        status, answer = _post(url, body, args.timeout)
        if status == 200:
            for k in total:
                total[k] += int(answer.get(k, 0))
        else:
            message = (answer.get("error") or {}).get("message", answer)
            failed.append(f"lines {batch[0][0]}-{batch[-1][0]}: HTTP {status}: {message}")
            if status == 404 and not total["requests"]:
                raise SystemExit(f"{url}: HTTP 404: {message} (start the server with VLLM_PLUGINS=blockattn "
                                 f"and --attention-backend blockattn)")
        bar.update(len(batch))

    batch: list[tuple[int, object]] = []
    for item in _read_corpus(args.corpus):
        batch.append(item)
        if len(batch) == args.batch_size:
            send(batch)
            batch = []
    if batch:
        send(batch)
    bar.close()
    seconds = time.perf_counter() - start
    share = total["cached_tokens"] / total["prompt_tokens"] if total["prompt_tokens"] else 0.0
    print(f"preloaded {total['documents']} documents ({total['blocks']} blocks, {total['prompt_tokens']} tokens; "
          f"{total['cached_tokens']} already cached, {share:.0%}) in {total['requests']} requests, {seconds:.1f} s")
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
