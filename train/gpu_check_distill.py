"""One-file GPU check of the memory-lean distillation path (FlexAttention BlockMasks + chunked losses).

Needs torch (CUDA), transformers, trl, accelerate, peft, datasets and this package (`pip install -e .`
without vLLM is enough). Nothing downloads: the models are random, built from a config.

1. Correctness (``--check-shape``, default a 2-layer model, fp32): one distillation step on a batch of three
   block samples with the reference path (sdpa + dense additive masks + full ``[B, L, V]`` logits) and with
   the lean path (FlexAttention ``BlockMask`` built from block ids + chunked hidden-state losses): loss, CE,
   KL, token weights and every parameter gradient must agree. On CPU FlexAttention has no backward, so there
   the lean path runs with sdpa for the gradients and Flex is checked forward-only.
2. Memory and step time (``--shape``, default Qwen3-0.6B's shape with its 151,936-token vocabulary, bf16,
   gradient checkpointing) at ``--seq-lens`` (default 8192,16384): one sample per step, ``mode=distill``
   with a live teacher copy; peak ``torch.cuda.max_memory_allocated`` and the median time of ``--steps``
   steps (forward + backward, first step left out) of the old path vs the new path. An out-of-memory run is
   reported as such. With ``--speed`` two more rows per length, both on the new path: ``one-forward``
   (``ce_pattern="dropout"``: CE and KL on one student forward) and ``block-ft`` (block fine-tuning,
   ``mode="block_finetune"``), for the paper's per-step speed claim (distillation vs block fine-tuning).

    python train/gpu_check_distill.py --out gpu_check.json                    # on a GPU (a few minutes)
    python train/gpu_check_distill.py --quick --device cpu                    # CPU smoke run (tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _trainer(model, tok, samples, device, out, **kw):
    from datasets import Dataset

    from vllm_blockattn.distill import BlockDistillationConfig, BlockDistillationTrainer, BlockFinetuneTrainer

    args = BlockDistillationConfig(output_dir=out, report_to="none", use_cpu=device == "cpu", bf16=False,
                                   per_device_train_batch_size=len(samples), save_strategy="no", **kw)
    cls = BlockFinetuneTrainer if args.mode == "block_finetune" else BlockDistillationTrainer
    return cls(model, args, train_dataset=Dataset.from_list(samples), processing_class=tok)


def _step(trainer, batch, seed=11):
    trainer._dropout_generator.manual_seed(seed)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    m = trainer._metrics["train"]
    terms = {k: m[k][-1] for k in ("ce", "kl", "hard_token_fraction")}
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), terms, grads


def check_correctness(args, device, out) -> dict:
    from vllm_blockattn.distill.bench import long_block_sample, random_model
    from vllm_blockattn.core.layout import BlockSettings

    flex_backward = device != "cpu"
    res = {"shape": args.check_shape, "seq_lens": [args.check_len, args.check_len - 37, args.check_len - 101]}
    results = {}
    for name, attn, chunk in (("reference", "sdpa", 0),
                              ("lean", "flex_attention" if flex_backward and not args.no_flex else "sdpa", 512)):
        model, tok = random_model(args.check_shape, attn_implementation=attn, dtype=torch.float32, device=device)
        settings = BlockSettings.from_tokenizer(tok)
        samples = [long_block_sample(settings, n, num_docs=6, response_tokens=48, seed=i)
                   for i, n in enumerate(res["seq_lens"])]
        tr = _trainer(model, tok, samples, device, os.path.join(out, name), logit_chunk_size=chunk, ce_tau=0.0,
                      flex_block_size=args.flex_block_size)
        batch = tr._prepare_inputs(tr.data_collator(samples))
        model.train()
        results[name] = (_step(tr, batch), attn)
        if name == "reference":
            ref_trainer, ref_batch = tr, batch
    (l0, t0, g0), _ = results["reference"]
    (l1, t1, g1), attn = results["lean"]
    res["lean_attention"] = attn
    res["loss"] = [l0, l1]
    res["terms"] = [t0, t1]
    res["max_grad_rel_diff"] = max(((g1[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
                                   for n, g in g0.items())
    res["same_grad_params"] = sorted(g0) == sorted(g1)
    ok = (abs(l0 - l1) <= 1e-4 * max(1.0, abs(l0)) and res["same_grad_params"] and res["max_grad_rel_diff"] < 1e-3
          and all(abs(t0[k] - t1[k]) <= 1e-4 * max(1.0, abs(t0[k])) for k in t0))
    if device == "cpu" and not args.no_flex:
        # Flex forward only (no backward on CPU): hidden states of the stacked student patterns vs dense.
        fmodel, _ = random_model(args.check_shape, attn_implementation="flex_attention", dtype=torch.float32)
        layouts, block, full, _ = ref_trainer._patterns(ref_batch)
        drop = ref_trainer._dropout_pattern(block, layouts, [(0, 2), (1,), ()])
        with torch.no_grad():
            want = ref_trainer._hidden(ref_trainer.model, [block, drop])
            fmodel.load_state_dict(ref_trainer.model.state_dict())
            fmodel.eval()
            got = ref_trainer._hidden(fmodel, [block, drop])
        diff = max((g - w)[p.doc >= 0].abs().max().item() for g, w, p in zip(got, want, [block, drop]))
        res["flex_forward_max_abs_diff"] = diff
        ok = ok and diff < 1e-4
    res["ok"] = bool(ok)
    return res


def measure(args, device, out, seq_len, path) -> dict:
    from vllm_blockattn.distill.bench import long_block_sample, random_model
    from vllm_blockattn.core.layout import BlockSettings

    lean = path != "old"  # one-forward and block-ft run on the new path's settings
    attn = "flex_attention" if lean and device != "cpu" and not args.no_flex else "sdpa"
    chunk = args.chunk if lean else 0
    extra = {"one-forward": {"ce_pattern": "dropout"}, "block-ft": {"mode": "block_finetune"}}.get(path, {})
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    row = {"path": path, "seq_len": seq_len, "attention": attn, "logit_chunk_size": chunk, "dtype": str(dtype)}
    try:
        model, tok = random_model(args.shape, attn_implementation=attn, dtype=dtype, device=device)
        row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        row["vocab"] = model.config.vocab_size
        sample = long_block_sample(BlockSettings.from_tokenizer(tok), seq_len, seed=0)
        tr = _trainer(model, tok, [sample], device, os.path.join(out, f"m{seq_len}{path}"), logit_chunk_size=chunk,
                      flex_block_size=args.flex_block_size, **extra)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = tr._prepare_inputs(tr.data_collator([sample]))
        if device != "cpu":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device != "cpu" else 0
        times = []
        for _ in range(args.steps + 1):
            t0 = time.perf_counter()
            loss = tr.compute_loss(model, batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row.update(loss=loss.item(), first_step_s=times[0], step_s=statistics.median(times[1:]))
        if device != "cpu":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["peak_over_weights_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.OutOfMemoryError as e:
        row["error"] = f"OOM: {str(e).splitlines()[0][:200]}"
    return row


def _release(device):
    """Free the previous measurement's models (trainers hold reference cycles) before the next one."""
    import gc

    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and lengths (a CPU smoke run)")
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--seq-lens", default="8192,16384")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--check-shape", default="tiny")
    ap.add_argument("--check-len", type=int, default=700)
    ap.add_argument("--flex-block-size", type=int, default=128)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (e.g. a quick CPU run)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--speed", action="store_true",
                    help="also time one-forward distillation and block fine-tuning on the new path")
    ap.add_argument("--out", default=None, help="JSON results (default: $OUT/gpu_check_distill.json if $OUT is set)")
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.seq_lens, args.steps, args.check_len = "tiny", "512", 1, 300
        args.flex_block_size = min(args.flex_block_size, 64)
    device = args.device
    info = {"device": device, "torch": torch.__version__, "argv": argv if argv is not None else sys.argv[1:]}
    if device != "cpu":
        info["gpu"] = torch.cuda.get_device_name()
    report = {"info": info}
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        report["correctness"] = check_correctness(args, device, out)
        report["correctness"]["seconds"] = time.perf_counter() - t0
        print("correctness:", json.dumps(report["correctness"]), flush=True)
        rows = []
        if not args.skip_memory:
            for n in (int(x) for x in args.seq_lens.split(",")):
                for path in ("old", "new", *(("one-forward", "block-ft") if args.speed else ())):
                    _release(device)
                    rows.append(measure(args, device, out, n, path))
                    print("memory:", json.dumps(rows[-1]), flush=True)
        report["memory"] = rows
    print("\n| seq len | path | attention | logits | peak GiB | step s |\n|---|---|---|---|---|---|")
    for r in rows:
        logits = "full" if r["logit_chunk_size"] == 0 else f"chunks of {r['logit_chunk_size']}"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else ("OOM" if "error" in r else "n/a (CPU)")
        step = f"{r['step_s']:.2f}" if "step_s" in r else "-"
        print(f"| {r['seq_len']} | {r['path']} | {r['attention']} | {logits} | {peak} | {step} |")
    out_path = args.out or (os.path.join(os.environ["OUT"], "gpu_check_distill.json") if os.environ.get("OUT") else None)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    print("OK" if report["correctness"]["ok"] else "CORRECTNESS FAILED")
    return 0 if report["correctness"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
