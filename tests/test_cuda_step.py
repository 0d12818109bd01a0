"""One step of the CUDA backend in this process, on CPU tensors under ``TRITON_INTERPRET=1``: which rows
take which kernel, and the result against the float64 reference (``tools.cuda_cases.reference``).

Only block batches run here (our kernels); batches without a block request take vLLM's own
``unified_attention``, which needs vLLM's Triton placeholder replaced before its import: that runs in a
subprocess, in ``tests/test_backend_cuda.py`` (slow).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import blockattn_kernels  # noqa: E402
from tools import cuda_cases  # noqa: E402

blockattn_kernels.enable_triton_interpreter()

TOL = 1e-4
BLOCK_BATCHES = [name for name, spec in cuda_cases.BATCHES.items() if spec.path != "stock"]


@pytest.fixture(scope="module")
def backend():
    config = cuda_cases.make_vllm_config(q_heads=4, kv_heads=2, head_dim=32, dtype=torch.float32)
    return cuda_cases.make_backend(config, page_size=16, device=torch.device("cpu"))


def _build(backend, batch):
    with cuda_cases._layouts_for(backend.vllm_config, batch.layouts):
        return backend.builder.build(0, batch.common)


@pytest.mark.parametrize("name", BLOCK_BATCHES)
def test_block_batch_matches_reference(backend, name):
    r = cuda_cases.run_batch(backend, cuda_cases.make_batch(name, backend, seed=3), write_with_impl=False)
    assert r["path"] == cuda_cases.BATCHES[name].path, r
    assert r["max_abs_err"] <= TOL and r["padding_untouched"] and r["returned_output"], r
    assert r["block_vs_causal"] > 100 * TOL, r


@pytest.mark.parametrize("name", BLOCK_BATCHES)
def test_single_query_rows_take_the_decode_kernel(backend, name):
    """Every row with one query (block or ordinary decode, a one-token chunk) is listed for the split-K
    decode kernel, every row with more for the prefill kernel, padding rows for neither."""
    batch = cuda_cases.make_batch(name, backend, seed=3)
    block = _build(backend, batch).block
    q_lens = [t.seq_len - t.start for t in batch.truth]
    assert block.decode_rows.tolist() == [i for i, n in enumerate(q_lens) if n == 1]
    assert block.prefill_rows.tolist() == [i for i, n in enumerate(q_lens) if n > 1]
    starts = [0]
    for i in block.prefill_rows.tolist():
        starts.append(starts[-1] + q_lens[i])
    assert block.prefill_query_start.tolist() == starts


def test_mixed_step_sends_ordinary_decode_rows_to_the_decode_kernel(backend):
    """In the mixed batch, the ordinary request's decode row is on the decode kernel: its output is
    written by that kernel alone (the prefill kernel, run alone, leaves it untouched)."""
    from blockattn_kernels import block_attention_prefill

    batch = cuda_cases.make_batch("mixed", backend, seed=3)
    block = _build(backend, batch).block
    ordinary_decode = [i for i, (t, row) in enumerate(zip(batch.truth, batch.spec.rows))
                       if row.contexts is None and t.seq_len - t.start == 1]
    assert ordinary_decode and set(ordinary_decode) <= set(block.decode_rows.tolist())
    n = batch.num_tokens
    cuda_cases._write_slots(batch.kv_cache, batch.common.slot_mapping[:n], batch.key[:n], batch.value[:n])
    key_cache, value_cache = batch.kv_cache.transpose(1, 2).split(backend.impl.head_size, dim=-1)
    out = torch.full_like(batch.query[:n], 7.0)
    block_attention_prefill(batch.query[:n], key_cache, value_cache, batch.common.block_table_tensor,
                            batch.common.query_start_loc, batch.common.seq_lens, block.q_kv_start, block.q_is_final,
                            block.page_delta, block.page_valid, block.inv_freq, backend.impl.scale, out=out,
                            rows=block.prefill_rows, rows_query_start=block.prefill_query_start)
    qsl = batch.common.query_start_loc_cpu.tolist()
    for i in ordinary_decode:
        assert (out[qsl[i]] == 7.0).all()
    for i in block.prefill_rows.tolist():
        assert not (out[qsl[i]:qsl[i + 1]] == 7.0).any()



def test_several_steps_with_persistent_metadata_match_the_reference():
    """A fresh builder over four steps, each request keeping its layout object (as the worker does):
    every step equals the float64 reference, layouts are computed once, and only rows whose request
    changed are rewritten (``tools.cuda_cases.run_steps``, also run on a GPU by the GPU check)."""
    config = cuda_cases.make_vllm_config(q_heads=4, kv_heads=2, head_dim=32, dtype=torch.float32)
    backend = cuda_cases.make_backend(config, page_size=16, device=torch.device("cpu"))
    rep = cuda_cases.run_steps(backend)
    for r in rep["results"]:
        assert r["ok"] and r["max_abs_err"] <= TOL and r["block_vs_causal"] > 100 * TOL, r
    assert [r["path"] for r in rep["results"]] == ["block-mixed", "block-decode", "block-mixed", "block-decode"]
    assert rep["row_writes"] == [3, 0, 4, 0] and rep["layouts_computed"] == 3 and rep["ok"]


def test_decode_graph_replay_emulated():
    """``VLLM_BLOCKATTN_CUDA_GRAPHS=decode``: the metadata captured once from a decode-only batch of
    ordinary rows (as vLLM captures at start-up, outside any step) is what later decode steps replay.
    Emulated on CPU (``tools.cuda_cases.run_graph_replay``; on a GPU the GPU check captures a real
    CUDA graph with the same function): the runner's inputs are rewritten in place, the builder runs for
    each step (its result discarded, as a graph keeps the captured tensors), and the impl runs with the
    *captured* metadata; every step, with block requests, reordered rows and padding rows, equals the
    reference, the captured tensors keep their addresses."""
    import os

    rep = cuda_cases.run_graph_replay("cpu")
    assert "VLLM_BLOCKATTN_CUDA_GRAPHS" not in os.environ          # the switch was only set for the builder
    assert rep["support"] == "UNIFORM_SINGLE_TOKEN_DECODE" and not rep["real_graph"] and rep["addresses_stable"]
    assert [r["decode_rows"] for r in rep["results"]] == [[0, 1, 2, -1], [0, 1, 2, 3], [0, 1, -1, -1]]
    for r in rep["results"]:
        assert r["max_abs_err"] <= TOL and r["padding_untouched"] and r["block_vs_causal"] > 100 * TOL, r
    assert rep["ok"]


def test_without_the_switch_decode_graphs_stay_off(backend, monkeypatch):
    monkeypatch.delenv("VLLM_BLOCKATTN_CUDA_GRAPHS", raising=False)
    assert backend.builder.get_cudagraph_support(backend.vllm_config, backend.spec).name == "NEVER"
    # vLLM must not update our metadata for drafts without build() (speculative decoding is refused anyway)
    assert backend.builder.supports_draft_decode_metadata_update is False
