"""The CUDA backend's persistent kernel metadata (``worker/kernel_meta.PersistentKernelMetadata``), on CPU.

Over random steps (requests admitted, finished, moved between batch rows, in prefill chunks, one-token
chunks and decode), the metadata kept across steps must equal what ``build_kernel_metadata`` builds
from scratch; layouts are computed once and rows rewritten only when their occupant changes; the
step reads neither ``seq_lens`` nor ``query_start_loc`` of the device on the host; the tensors handed
to the kernels keep their addresses from step to step (what CUDA-graph replay needs).
"""

import random

import numpy as np
import pytest
import torch

from tools.cuda_cases import Row, _row_layout
from vllm_blockattn.worker.kernel_meta import PersistentKernelMetadata, build_kernel_metadata, split_rows

PAGE = 16
MAX_PAGES = 12
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)

REQUESTS = [Row((17, 12, 1), 3, cached=(2,)), Row((36, 1), 2, cached=(1,)), Row((20, 9), 1), Row(None, 40),
            Row((5, 30, 8), 2, cached=(1, 2)), Row(None, 12), Row((50,), 6), Row((3, 3, 3), 9)]


class NoHostRead(torch.Tensor):
    """A device tensor stand-in: reading its values on the host (what a GPU tensor would sync for) raises."""

    FORBIDDEN = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__", "__iter__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in cls.FORBIDDEN:
            raise AssertionError(f"host read of a device tensor: {func.__name__}")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _requests():
    out = []
    for row in REQUESTS:
        prompt, layout = _row_layout(row, PAGE)
        out.append(dict(layout=layout, prompt=prompt, done=0))
    return out


def _steps(seed: int, n_steps: int = 30):
    """Random steps: (layouts, seq_lens, q_lens) with rows in a random order, some padding rows."""
    rng = random.Random(seed)
    reqs = _requests()
    live: list[dict] = []
    for _ in range(n_steps):
        while len(live) < 4 and rng.random() < 0.7:
            r = dict(rng.choice(reqs))
            r["done"] = 0
            live.append(r)
        rng.shuffle(live)
        rows = []
        for r in live:
            if r["done"] < r["prompt"]:
                kind = rng.choice(["chunk", "one", "rest"])
                n = {"chunk": rng.randint(2, 20), "one": 1, "rest": r["prompt"] - r["done"]}[kind]
                n = max(1, min(n, r["prompt"] - r["done"]))
            else:
                n = 1
            r["done"] += n
            rows.append((r["layout"], r["done"], n))
        rows += [(None, 0, 0)] * rng.randint(0, 2)
        yield rows
        live = [r for r in live if not (r["done"] > r["prompt"] + 3 and rng.random() < 0.5)]


def _args(rows):
    q_lens = [n for _, _, n in rows]
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    seq_lens = torch.tensor([s for _, s, _ in rows], dtype=torch.int32)
    return [lay for lay, _, _ in rows], qsl, seq_lens, int(qsl[-1])


def _assert_same(got, want):
    for name in ("q_kv_start", "q_is_final", "page_delta", "page_valid", "decode_rows", "prefill_rows",
                 "prefill_query_start"):
        torch.testing.assert_close(getattr(got, name).to(torch.int64), getattr(want, name).to(torch.int64),
                                   msg=name, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_metadata_equals_metadata_built_from_scratch(seed):
    meta = PersistentKernelMetadata(PAGE, INV_FREQ, "cpu", max_rows=2, max_pages=1, max_tokens=8)   # grows
    for rows in _steps(seed):
        layouts, qsl, seq_lens, tokens = _args(rows)
        got = meta.update(layouts, qsl, NoHostRead(qsl.clone()), NoHostRead(seq_lens.clone()), len(rows), tokens,
                          MAX_PAGES)
        want = build_kernel_metadata(layouts, qsl.tolist(), seq_lens.tolist(), MAX_PAGES, PAGE, tokens, INV_FREQ,
                                     "cpu")
        _assert_same(got, want)


def test_layouts_computed_once_and_rows_rewritten_only_on_change():
    meta = PersistentKernelMetadata(PAGE, INV_FREQ, "cpu", max_rows=8, max_pages=MAX_PAGES, max_tokens=256)
    reqs = _requests()
    a, b, c = reqs[0], reqs[3], reqs[4]            # block, ordinary, block

    def step(rows):
        layouts, qsl, seq_lens, tokens = _args(rows)
        before = (meta.row_writes, meta.layouts_computed)
        got = meta.update(layouts, qsl, qsl, seq_lens, len(rows), tokens, MAX_PAGES)
        want = build_kernel_metadata(layouts, qsl.tolist(), seq_lens.tolist(), MAX_PAGES, PAGE, tokens, INV_FREQ,
                                     "cpu")
        _assert_same(got, want)
        return meta.row_writes - before[0], meta.layouts_computed - before[1], got

    writes, computed, _ = step([(a["layout"], a["prompt"], a["prompt"]), (b["layout"], b["prompt"], b["prompt"])])
    assert (writes, computed) == (2, 1)            # first sight of both rows; one block layout
    first = None
    for g in range(1, 4):                          # decode steps: nothing rewritten, same addresses
        writes, computed, got = step([(a["layout"], a["prompt"] + g, 1), (b["layout"], b["prompt"] + g, 1)])
        assert (writes, computed) == (0, 0)
        ptrs = [t.data_ptr() for t in (got.page_delta, got.page_valid, got.q_kv_start, got.q_is_final,
                                       got.decode_rows)]
        assert first is None or ptrs == first
        first = ptrs
    # rows swapped (vLLM condensed the batch) and a new request: three rows rewritten, one layout computed
    writes, computed, _ = step([(b["layout"], b["prompt"] + 4, 1), (a["layout"], a["prompt"] + 4, 1),
                                (c["layout"], c["prompt"], c["prompt"])])
    assert (writes, computed) == (3, 1)
    # the same request (same layout object) back in its row after a step elsewhere: nothing recomputed
    writes, computed, _ = step([(b["layout"], b["prompt"] + 5, 1), (a["layout"], a["prompt"] + 5, 1),
                                (c["layout"], c["prompt"] + 1, 1)])
    assert (writes, computed) == (0, 0)


def test_split_rows():
    dec, pre, starts = split_rows([0, 1, 1, 5, 6, 9], 5)
    assert dec.tolist() == [0, 3] and pre.tolist() == [2, 4] and starts.tolist() == [0, 4, 7]


def test_no_host_read_guard_works():
    with pytest.raises(AssertionError, match="host read"):
        NoHostRead(torch.arange(3)).tolist()


def test_meta_bench_smoke():
    from tools.meta_bench import run

    (res,) = run(rows_list=(4,), blocks_list=(2,), block_len=40, reps=1)
    assert res["scratch_ms"] > 0 and res["persistent_steady_ms"] > 0 and res["persistent_all_rows_changed_ms"] > 0
    assert res["positions_host_ms"] > 0 and res["positions_device_ms"] > 0
