"""Host cost of the CUDA backend's per-step kernel metadata: built from scratch vs kept across steps.

``build_kernel_metadata`` (what the backend ran until the persistent metadata) allocates
``[rows, max_pages]`` arrays and refills every block's pages in a Python loop each step;
``PersistentKernelMetadata.update`` rewrites a row only when its request changes. Both on CPU tensors
here (the device part of ``update``, a handful of small ops, then also runs on the CPU), for a steady
decode step (every row one query) and for a step in which every row changed.

The worker's block positions likewise: the host loop it ran until commit 0c9d58b (``layout.positions`` per
block request, then one ``index_copy_`` into the runner's positions) against
``positions.BlockPositions.apply`` (per-row shifts kept across steps, the edit done by tensor ops), on a
steady decode step::

    python -m tools.meta_bench [--json F]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from vllm_blockattn.core.paged import PagedLayout
from vllm_blockattn.eval.benchkit import cpu_model
from vllm_blockattn.worker.kernel_meta import PersistentKernelMetadata, build_kernel_metadata
from vllm_blockattn.worker.positions import BlockPositions

PAGE = 16


def _layout(n_blocks: int, block_len: int, final: int) -> tuple[PagedLayout, int]:
    padded = -(-block_len // PAGE) * PAGE
    starts = tuple(b * padded for b in range(n_blocks))
    ends = tuple(s + block_len for s in starts)
    pends = tuple(s + padded for s in starts)
    offsets = tuple(b * block_len for b in range(n_blocks))
    final_start = n_blocks * padded
    return PagedLayout(starts, ends, pends, offsets, final_start, n_blocks * block_len), final_start + final


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _host_positions(positions: torch.Tensor, layouts, seq_lens: np.ndarray) -> None:
    """The worker's positions until commit 0c9d58b, for a decode step (one token per row)."""
    index, values = [], []
    for i, lay in enumerate(layouts):
        if lay is not None:
            index.append(np.arange(i, i + 1))
            values.append(lay.positions(np.arange(seq_lens[i] - 1, seq_lens[i])))
    idx = torch.from_numpy(np.concatenate(index)).to(positions.device)
    val = torch.from_numpy(np.concatenate(values)).to(device=positions.device, dtype=positions.dtype)
    positions.index_copy_(0, idx, val)


def run(rows_list=(32, 256), blocks_list=(8, 64), block_len: int = 500, reps: int = 20) -> list[dict]:
    inv_freq = torch.ones(64)
    results = []
    for rows in rows_list:
        for n_blocks in blocks_list:
            lays = [_layout(n_blocks, block_len, 64 + i) for i in range(rows)]
            layouts = [lay for lay, _ in lays]
            seq_lens = torch.tensor([n + 1 for _, n in lays], dtype=torch.int32)
            qsl = torch.arange(rows + 1, dtype=torch.int32)
            max_pages = int(seq_lens.max()) // PAGE + 2
            meta = PersistentKernelMetadata(PAGE, inv_freq, "cpu", max_rows=rows, max_pages=max_pages,
                                            max_tokens=rows)

            def scratch():
                build_kernel_metadata(layouts, qsl.tolist(), seq_lens.tolist(), max_pages, PAGE, rows, inv_freq, "cpu")

            def steady():
                meta.update(layouts, qsl, qsl, seq_lens, rows, rows, max_pages)

            def all_rows_new():
                meta.update(list(reversed(layouts)) if meta.rows.owner[0] is layouts[0] else layouts, qsl, qsl, seq_lens,
                            rows, rows, max_pages)

            slots = (seq_lens - 1).long()
            seq_np = seq_lens.numpy()
            block_pos = BlockPositions(PAGE, "cpu", max_rows=rows)

            def positions_host():
                _host_positions(slots.clone(), layouts, seq_np)

            def positions_device():
                block_pos.apply(slots.clone(), qsl, layouts, rows)

            steady()   # first sight of the layouts
            positions_device()
            res = dict(rows=rows, blocks=n_blocks, block_len=block_len, max_pages=max_pages,
                       scratch_ms=_median_ms(scratch, reps), persistent_steady_ms=_median_ms(steady, reps),
                       persistent_all_rows_changed_ms=_median_ms(all_rows_new, reps),
                       positions_host_ms=_median_ms(positions_host, reps),
                       positions_device_ms=_median_ms(positions_device, reps))
            results.append(res)
            print(f"rows {rows:4} blocks {n_blocks:3}: from scratch {res['scratch_ms']:8.3f} ms, persistent "
                  f"steady {res['persistent_steady_ms']:7.3f} ms, every row changed "
                  f"{res['persistent_all_rows_changed_ms']:7.3f} ms; positions: host loop {res['positions_host_ms']:7.3f} ms, "
                  f"device {res['positions_device_ms']:7.3f} ms", flush=True)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = run(reps=a.reps)
    if a.json:
        import sys

        from tools.gpu_check import provenance

        prov = provenance(argv)
        prov["command"] = " ".join([sys.executable, "-m", "tools.meta_bench", *(sys.argv[1:] if argv is None else argv)])
        with open(a.json, "w") as f:
            json.dump(dict(provenance=prov, cpu=cpu_model(), threads=1, reps=a.reps, results=results), f, indent=2)


if __name__ == "__main__":
    main()
