"""Peak memory and step time of one block-distillation step on CPU: full-logit path vs chunked losses.

Each measurement runs in a fresh process (peak RSS is per process): build a random Qwen3-architecture model
(``--shape``, default 4 layers x 256 wide with a 32,768-token vocabulary), its frozen teacher copy and one
block sample of ``--seq-len`` tokens (16 documents + question + 256 response tokens), then time
``--steps`` training steps (``compute_loss`` + backward, the first one left out; wall and process CPU time) of ``mode=distill``
(live teacher, block dropout 0.6) with

- ``old``: ``logit_chunk_size=0``, full ``[B, L, V]`` logits of all four forwards (the reference path);
- ``new``: ``logit_chunk_size=1024``, hidden states + chunked losses through the output head.

Both use sdpa with the dense reference masks: FlexAttention has no backward on CPU (its BlockMask path is
measured by train/gpu_check_distill.py on a GPU). The two paths run alternately (``--rounds``), so that
load from other jobs on a shared machine hits them alike; the table gives the median step time and the
largest peak (RSS sampled every 2 ms during the steps, minus the RSS before them).

    nice -n 19 python train/bench_memory.py --seq-len 4096 --rounds 2 --out outputs/bench_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from vllm_blockattn.eval.benchkit import cpu_model


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakSampler:
    """Polls this process's RSS every few milliseconds in a thread: the peak of a region, not of the process."""

    def __init__(self, every_s: float = 0.002):
        import threading

        self.every_s, self.peak, self._stop = every_s, _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def worker(args) -> dict:
    import tempfile

    import torch
    from datasets import Dataset

    from vllm_blockattn.distill import BlockDistillationConfig, BlockDistillationTrainer
    from vllm_blockattn.distill.bench import long_block_sample, random_model
    from vllm_blockattn.core.layout import BlockSettings

    torch.set_num_threads(args.threads)
    model, tok = random_model(args.shape)
    settings = BlockSettings.from_tokenizer(tok)
    sample = long_block_sample(settings, args.seq_len, seed=args.seed)
    chunk = {"old": 0, "new": args.chunk}[args.path]
    with tempfile.TemporaryDirectory() as out:
        cfg = BlockDistillationConfig(output_dir=out, report_to="none", use_cpu=True, bf16=False,
                                      per_device_train_batch_size=1, logit_chunk_size=chunk, max_length=args.seq_len,
                                      save_strategy="no", gradient_checkpointing=args.gradient_checkpointing)
        trainer = BlockDistillationTrainer(model, cfg, train_dataset=Dataset.from_list([sample]), processing_class=tok)
        batch = trainer._prepare_inputs(trainer.data_collator([sample]))
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        base = _rss_mb()
        times, cpu_times, losses = [], [], []
        with _PeakSampler() as sampler:
            for _ in range(args.steps + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                loss = trainer.compute_loss(model, batch)
                loss.backward()
                model.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
                losses.append(loss.item())
    return {"path": args.path, "seq_len": args.seq_len, "shape": args.shape,
            "vocab": model.config.vocab_size, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "setup_rss_mb": base, "peak_rss_mb": sampler.peak, "step_peak_over_setup_mb": sampler.peak - base,
            "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": times[1:], "step_cpu_s": cpu_times[1:], "loss": losses}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--shape", default="cpu-32k")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process (after one untimed step)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating old/new processes per path")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--paths", default="old,new")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--worker", choices=["old", "new"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.path = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    runs = []
    for r in range(args.rounds):
        for path in args.paths.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, *(argv or sys.argv[1:])]
            res = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode or not line:
                print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"worker {path} failed (rc {res.returncode})")
            runs.append(json.loads(line[-1][7:]))
            x = runs[-1]
            print(f"round {r} {path}: step {statistics.median(x['step_s']):.2f} s wall, "
                  f"{statistics.median(x['step_cpu_s']):.2f} s CPU, peak RSS {x['peak_rss_mb']:.0f} MB "
                  f"(+{x['step_peak_over_setup_mb']:.0f} over setup), loss {x['loss'][0]:.4f}", flush=True)
    rows = {}
    for path in args.paths.split(","):
        xs = [x for x in runs if x["path"] == path]
        rows[path] = {"step_s_median": statistics.median(t for x in xs for t in x["step_s"]),
                      "step_cpu_s_median": statistics.median(t for x in xs for t in x["step_cpu_s"]),
                      "peak_rss_mb": max(x["peak_rss_mb"] for x in xs),
                      "step_peak_over_setup_mb": max(x["step_peak_over_setup_mb"] for x in xs),
                      "setup_rss_mb": statistics.median(x["setup_rss_mb"] for x in xs), "loss": xs[0]["loss"][0]}
    info = {"machine": f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cores", "threads": args.threads,
            "command": "python train/bench_memory.py " + " ".join(argv or sys.argv[1:]),
            "params_m": runs[0]["params_m"], "vocab": runs[0]["vocab"], "seq_len": args.seq_len}
    print(json.dumps({"info": info, "rows": rows}, indent=1))
    print("\n| path | step wall s (median) | step CPU s (median) | peak RSS (MB) | peak over setup (MB) | loss |\n"
          "|---|---|---|---|---|---|")
    for path, r in rows.items():
        print(f"| {path} | {r['step_s_median']:.2f} | {r['step_cpu_s_median']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['step_peak_over_setup_mb']:.0f} | {r['loss']:.4f} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
