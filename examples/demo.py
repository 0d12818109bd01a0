"""Block attention in vLLM on an embedded tiny model: three documents and a question.

    make demo                    # sets everything up, then runs this
    python examples/demo.py      # inside the venv; --model PATH for a real (distilled) checkpoint
    python examples/demo.py --sink-free   # a checkpoint trained without sinks (Block-FT style)

It builds a tiny random Qwen3 checkpoint (nothing downloads), lays the documents out as blocks
(`[S x 4] doc_1 ... [S x 4] question`), and generates greedily through vLLM with
`attention_backend="blockattn"`. Then it asks again with the documents in another order and a new
document in front: the cached documents are reused (non-prefix reuse), and the answer to the repeated
prompt equals the cold one. Finally it checks the first answer against the Hugging Face reference.
The weights are random, so the text is gibberish; the machinery is the point.

With ``--sink-free`` the tiny checkpoint is built the way a Block-FT model (trained without sinks) is
served: its ``config.json`` says ``"block_attention": {"num_sinks": 0, "boundary_token_id": ...}``, every
block is marked by one ``<|block_boundary|>`` token, and the engine drops that token before the model
runs. The same checks apply.
"""

import argparse
import os
import tempfile

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

DOCS = [
    "Alice moved to Paris in 2019 and works as a nurse at a large hospital.",
    "Bob collects stamps from 42 countries and keeps them in a wooden chest.",
    "The river flows past the old mill, where the miller keeps his books.",
]
NEW_DOC = "Caroline: Hey Mel! How was the concert last night? Melanie: It was great!"
QUESTION = "Question: Where does Alice live? Answer:"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a checkpoint directory with a block_attention entry (default: a tiny one)")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--sink-free", action="store_true",
                    help="build the tiny checkpoint without sinks (one boundary token per block)")
    args = ap.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_blockattn import BlockSettings, build_block_prompt, parse_block_prompt
    from vllm_blockattn import block_cache_stats

    path = args.model
    if path is None:
        from vllm_blockattn.tiny import build_tiny_model

        name = "vllm-blockattn-demo-qwen3" + ("-sinkfree" if args.sink_free else "")
        path = build_tiny_model(os.path.join(tempfile.gettempdir(), name), "qwen3", sharpen=4.0,
                                num_sinks=0 if args.sink_free else 4)
    tok = AutoTokenizer.from_pretrained(path)
    settings = BlockSettings.from_pretrained(path)
    llm = LLM(model=path, attention_backend="blockattn", dtype="float32", enforce_eager=True, max_model_len=2048)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    def ask(docs, label):
        ids = build_block_prompt(docs + [QUESTION], settings, tokenizer=tok)
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        print(f"[{label}] {len(ids)} prompt tokens in {len(docs) + 1} blocks, "
              f"{out.num_cached_tokens} prompt tokens reused -> {out.outputs[0].token_ids}")
        return ids, out

    print(f"model: {path} (block layout: {settings.to_dict()})")
    ids, first = ask(DOCS, "cold     ")
    _, reordered = ask([NEW_DOC, DOCS[2], DOCS[0], DOCS[1]], "new first")
    _, again = ask(DOCS, "repeat   ")
    print(f"block cache: {block_cache_stats(llm)}")
    assert again.outputs[0].token_ids == first.outputs[0].token_ids, "warm and cold answers differ"

    import torch
    from transformers import AutoModelForCausalLM

    from vllm_blockattn.core.reference import block_generate

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = block_generate(model, ids, parse_block_prompt(ids, settings), max_new_tokens=args.max_tokens)
    same = list(first.outputs[0].token_ids) == ref
    print(f"HF reference (block attention mask): {ref} -> {'identical' if same else 'DIFFERENT'}")
    print(f"generation: {first.outputs[0].text!r}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
