"""Paged block-attention kernels: Triton (under TRITON_INTERPRET=1) vs the torch path vs a dense oracle.

The oracle below knows nothing of pages, q_kv_start or page_delta: it takes each sequence's unpaged
K/V, its slots' block ids and the blocks' offsets, rotates keys as complex numbers, and applies the
block rule (a non-final query sees its own block; a final query sees every real earlier slot).
"""

import os

# Triton picks interpreter or compiler when a kernel is decorated: set the switch before importing.
os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import blockattn_kernels  # noqa: E402
from blockattn_kernels import (block_attention_decode, block_attention_decode_rows,  # noqa: E402
                               block_attention_prefill, block_attention_torch)
import tools.kernel_cases  # noqa: E402
from tools.kernel_cases import SeqSpec, make_case  # noqa: E402

blockattn_kernels.enable_triton_interpreter()  # in case another test module imported the kernels first

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "triton_kernels" / "blockattn_kernels"

PREFILL_LAYOUTS = {
    "blocks_with_pads": [SeqSpec((20, 16, 5), 7)],
    "single_token_final": [SeqSpec((33, 9), 1)],
    "plain_causal": [SeqSpec((), 40)],
    "many_small_blocks": [SeqSpec((3, 3, 3, 3, 3, 18), 4)],
    "chunk_starts_inside_block": [SeqSpec((50, 20), 6, q_len=40)],
    "batch_mixed": [SeqSpec((20, 16, 5), 7), SeqSpec((), 9), SeqSpec((40, 3), 1, q_len=30),
                    SeqSpec((17,), 12, q_len=5)],
}
DECODE_LAYOUTS = {
    "batch": [SeqSpec((20, 16, 5), 1, q_len=1), SeqSpec((70,), 3, q_len=1), SeqSpec((), 5, q_len=1)],
    "long_context": [SeqSpec((40, 40, 40, 40, 40), 10, q_len=1)],
}
DTYPES = [torch.float32, torch.bfloat16]
HEADS = [(4, 2), (2, 2)]   # (q heads, kv heads): GQA and MHA
# (dtype, page size, heads) for the Triton prefill: each dtype with each page size, GQA and MHA,
# without the full product (the interpreter is slow)
PREFILL_CONFIGS = [(torch.float32, 16, (4, 2)), (torch.bfloat16, 16, (2, 2)),
                   (torch.float32, 32, (2, 2)), (torch.bfloat16, 32, (4, 2))]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def dense_oracle(case) -> torch.Tensor:
    """Output ``[T, Hq, D]`` (float64) from unpaged K/V, block ids and block offsets alone."""
    outs = []
    hq, d = case.q.shape[1], case.q.shape[2]
    qsl = case.query_start_loc.tolist()
    for s, tr in enumerate(case.truth):
        n = len(tr.block_id)
        group = hq // tr.keys.shape[1]
        final_id = len(tr.block_offset)
        real = ~tr.is_pad
        keys = torch.where(real[:, None, None], tr.keys.double(), 0.0)
        values = torch.where(real[:, None, None], tr.values.double(), 0.0)
        offset = torch.tensor(tr.block_offset + [0], dtype=torch.float64)[tr.block_id]          # [n]
        theta = offset[:, None] * tools.kernel_cases.rope_inv_freq(d).double()[None, :]     # [n, D/2]
        z = torch.complex(keys[..., : d // 2], keys[..., d // 2:]) * torch.polar(torch.ones_like(theta), theta)[:, None]
        rotated = torch.cat((z.real, z.imag), dim=-1)
        q = case.q[qsl[s]:qsl[s + 1]].double()
        slot_q = torch.arange(n - tr.q_len, n)
        bq = tr.block_id[slot_q]
        j = torch.arange(n)
        same_block = tr.block_id[None, :] == bq[:, None]
        final_q = bq == final_id
        visible = (j[None, :] <= slot_q[:, None]) & real[None, :] & (same_block | final_q[:, None])
        kv = torch.arange(hq) // group
        plain = torch.einsum("thd,jhd->thj", q, keys[:, kv])
        rot = torch.einsum("thd,jhd->thj", q, rotated[:, kv])
        scores = torch.where(final_q[:, None, None], rot, plain) * case.scale
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        outs.append(torch.einsum("thj,jhd->thd", scores.softmax(-1), values[:, kv]))
    return torch.cat(outs)


def _case(layout, dtype, page_size=16, heads=(4, 2), head_dim=32, seed=0):
    return make_case(layout, page_size=page_size, q_heads=heads[0], kv_heads=heads[1], head_dim=head_dim,
                     dtype=dtype, seed=seed)


def test_kernels_run_under_interpreter():
    from triton.runtime.interpreter import InterpretedFunction

    from blockattn_kernels import decode, prefill

    assert blockattn_kernels.triton_interpreted()
    assert isinstance(prefill._prefill_kernel, InterpretedFunction)
    assert isinstance(decode._decode_partial_kernel, InterpretedFunction)


def test_installed_under_its_own_name():
    spec = importlib.util.find_spec("blockattn_kernels")
    assert spec is not None and Path(spec.origin).resolve() == KERNEL_DIR / "__init__.py"
    assert not (REPO / "triton_kernels" / "__init__.py").exists()
    # from a neutral working directory, `triton_kernels` must not resolve into our source folder
    probe = ("import importlib.util, json; s = importlib.util.find_spec('triton_kernels'); "
             "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))")
    found = json.loads(subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True,
                                      check=True).stdout)
    if found is not None:
        assert str(REPO / "triton_kernels") not in (found[1] + [found[0] or ""])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(PREFILL_LAYOUTS))
def test_torch_path_matches_dense_oracle(name, dtype):
    case = _case(PREFILL_LAYOUTS[name], dtype)
    got = block_attention_torch(*case.prefill_args())
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.double(), dense_oracle(case), **TOL[dtype])


@pytest.mark.parametrize(("dtype", "page_size", "heads"), PREFILL_CONFIGS, ids=str)
@pytest.mark.parametrize("name", list(PREFILL_LAYOUTS))
def test_prefill_triton_matches_torch(name, dtype, page_size, heads):
    case = _case(PREFILL_LAYOUTS[name], dtype, page_size, heads)
    want = block_attention_torch(*case.prefill_args())
    got = block_attention_prefill(*case.prefill_args())
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), dense_oracle(case), **TOL[dtype])


@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(DECODE_LAYOUTS))
def test_decode_triton_matches_torch(name, dtype, heads):
    case = _case(DECODE_LAYOUTS[name], dtype, heads=heads)
    want = block_attention_torch(*case.prefill_args())
    got = block_attention_decode(*case.decode_args())
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    torch.testing.assert_close(got.double(), dense_oracle(case), **TOL[dtype])


def test_decode_uses_several_splits():
    """The decode cases above really go through the split-K merge (with empty splits for short rows)."""
    from blockattn_kernels.decode import num_splits

    for name, layout in DECODE_LAYOUTS.items():
        case = _case(layout, torch.float32)
        assert num_splits(case.q.device, len(layout), 2, case.block_table.shape[1] * 16) > 1, name


@pytest.mark.parametrize("head_dim", [16, 48])
def test_head_dim_padding(head_dim):
    """Non-power-of-two halves (48 -> 24) and halves below tl.dot's minimum (16 -> 8) are padded."""
    case = _case(PREFILL_LAYOUTS["batch_mixed"], torch.float32, head_dim=head_dim)
    want = dense_oracle(case)
    torch.testing.assert_close(block_attention_prefill(*case.prefill_args()).double(), want, **TOL[torch.float32])
    dec = _case(DECODE_LAYOUTS["batch"], torch.float32, head_dim=head_dim)
    torch.testing.assert_close(block_attention_decode(*dec.decode_args()).double(), dense_oracle(dec),
                               **TOL[torch.float32])


def test_strided_q_int8_flags_and_out_buffer():
    """q as a view into a wider projection, q_is_final as int8, results written into a given ``out``."""
    case = _case(PREFILL_LAYOUTS["batch_mixed"], torch.float32)
    t, hq, d = case.q.shape
    wide = torch.randn(t, hq + 3, d)
    wide[:, :hq] = case.q
    case.q = wide[:, :hq]
    case.q_is_final = case.q_is_final.to(torch.int8)
    want = dense_oracle(case)
    for fn in (block_attention_prefill, block_attention_torch):
        out = torch.full((t, hq, d), float("nan"))
        assert fn(*case.prefill_args(), out=out) is out
        torch.testing.assert_close(out.double(), want, **TOL[torch.float32])


def test_padded_batches_like_cuda_graphs():
    """vLLM pads batches for CUDA graphs: prefill rows past query_start_loc[-1] are left untouched,
    decode rows with seq_len 0 come out as zeros, and the real rows are unchanged."""
    case = _case(PREFILL_LAYOUTS["batch_mixed"], torch.float32)
    want = dense_oracle(case)
    t, hq, d = case.q.shape
    pad = 5
    case.q = torch.cat([case.q, torch.randn(pad, hq, d)])
    case.q_kv_start = torch.cat([case.q_kv_start, torch.zeros(pad, dtype=torch.int32)])
    case.q_is_final = torch.cat([case.q_is_final, torch.ones(pad, dtype=torch.bool)])
    out = torch.full((t + pad, hq, d), 7.0)
    block_attention_prefill(*case.prefill_args(), out=out)
    torch.testing.assert_close(out[:t].double(), want, **TOL[torch.float32])
    assert (out[t:] == 7.0).all()

    dec = _case(DECODE_LAYOUTS["batch"], torch.float32)
    want = dense_oracle(dec)
    dec.q = torch.cat([dec.q, torch.randn(2, hq, d)])
    zeros = torch.zeros(2, dec.block_table.shape[1], dtype=torch.int32)
    dec.block_table = torch.cat([dec.block_table, zeros])
    dec.page_delta = torch.cat([dec.page_delta, zeros])
    dec.page_valid = torch.cat([dec.page_valid, zeros])
    dec.seq_lens = torch.cat([dec.seq_lens, torch.zeros(2, dtype=torch.int32)])
    got = block_attention_decode(*dec.decode_args())
    torch.testing.assert_close(got[:-2].double(), want, **TOL[torch.float32])
    assert (got[-2:] == 0).all()


def test_page_delta_is_applied():
    """Dropping the deltas changes the final block's output (so the rotation is really exercised)."""
    case = _case(PREFILL_LAYOUTS["blocks_with_pads"], torch.float32)
    want = block_attention_prefill(*case.prefill_args())
    case.page_delta = torch.zeros_like(case.page_delta)
    got = block_attention_prefill(*case.prefill_args())
    final = case.q_is_final.bool()
    assert (got[final] - want[final]).abs().max() > 1e-2
    torch.testing.assert_close(got[~final], want[~final])


@pytest.mark.parametrize("fn", [block_attention_prefill, block_attention_torch], ids=["triton", "torch"])
def test_bad_inputs_name_the_argument(fn):
    case = _case(PREFILL_LAYOUTS["blocks_with_pads"], torch.float32)
    args = list(case.prefill_args())
    bad = {
        3: (case.block_table.long(), "block_table must be int32"),
        10: (case.inv_freq[:-1], "inv_freq must be"),
        1: (case.key_cache.half(), "key_cache/value_cache dtype"),
        6: (case.q_kv_start[:-1], "q_kv_start must be"),
    }
    for idx, (value, msg) in bad.items():
        broken = list(args)
        broken[idx] = value
        with pytest.raises(ValueError, match=msg):
            fn(*broken)
    wrong_heads = make_case(PREFILL_LAYOUTS["blocks_with_pads"], page_size=16, q_heads=3, kv_heads=2, head_dim=32)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        fn(*wrong_heads.prefill_args())


def test_decode_rejects_several_queries_per_sequence():
    case = _case(PREFILL_LAYOUTS["blocks_with_pads"], torch.float32)
    with pytest.raises(ValueError, match="one query per sequence"):
        block_attention_decode(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens,
                               case.page_delta, case.page_valid, case.inv_freq, case.scale)


# a step of serving: block and ordinary prefill rows beside block and ordinary decode rows
MIXED_STEP = [SeqSpec((20, 16, 5), 7), SeqSpec((20, 16, 5), 1, q_len=1), SeqSpec((), 9, q_len=1),
              SeqSpec((40, 3), 1, q_len=30), SeqSpec((), 21), SeqSpec((33,), 4, q_len=1)]


def _split_rows(case, pad_rows: int = 0):
    """(decode rows, prefill rows, prefix sums of the prefill rows' query counts) as int32 tensors."""
    qsl = case.query_start_loc.tolist()
    q_lens = [b - a for a, b in zip(qsl[:-1], qsl[1:])]
    dec = [i for i, n in enumerate(q_lens) if n == 1] + [-1] * pad_rows
    pre = [i for i, n in enumerate(q_lens) if n > 1]
    starts = [0]
    for i in pre:
        starts.append(starts[-1] + q_lens[i])
    i32 = dict(dtype=torch.int32)
    return torch.tensor(dec, **i32), torch.tensor(pre, **i32), torch.tensor(starts, **i32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_step_rows_split_over_both_kernels(dtype):
    """Single-query rows (block and ordinary) through the split-K decode kernel, the others through the
    prefill kernel with a row list: together equal to the float64 oracle and the torch path, each kernel
    leaving the other's rows untouched, ``-1`` row entries (a padded row buffer) skipped."""
    case = _case(MIXED_STEP, dtype, heads=(4, 2), seed=5)
    dec, pre, pre_qsl = _split_rows(case, pad_rows=2)
    out = torch.full_like(case.q, 7.0)
    block_attention_prefill(*case.prefill_args(), out=out, rows=pre, rows_query_start=pre_qsl)
    qsl = case.query_start_loc
    dec_tokens = qsl[dec[dec >= 0].long()].long()
    assert (out[dec_tokens] == 7.0).all()                              # decode rows untouched so far
    assert (out != 7.0).any(dim=(1, 2)).sum() == case.q.shape[0] - dec_tokens.numel()
    assert block_attention_decode_rows(*case.prefill_args(), rows=dec, out=out) is out
    assert not (out == 7.0).all(dim=(1, 2)).any()
    torch.testing.assert_close(out.float(), block_attention_torch(*case.prefill_args()).float(), **TOL[dtype])
    torch.testing.assert_close(out.double(), dense_oracle(case), **TOL[dtype])


def test_decode_rows_take_a_one_token_chunk_of_a_context_block():
    """A chunked prefill whose chunk is one token inside a non-final block is a single-query row too:
    the decode kernel reads its q_kv_start / q_is_final (own block only, no rotation)."""
    whole = _case([SeqSpec((20, 16, 5), 7)], torch.float32, seed=2)
    rows = torch.tensor([0], dtype=torch.int32)
    # blocks at slots [0, 20) + pads, [32, 48), [48, 53) + pads, final block [64, 71)
    for slot, kv_start in ((39, 32), (50, 48), (10, 0)):
        one = make_case([SeqSpec((20, 16, 5), 7)], page_size=16, q_heads=4, kv_heads=2, head_dim=32, seed=2)
        one.q = whole.q[slot:slot + 1]
        one.q_kv_start, one.q_is_final = whole.q_kv_start[slot:slot + 1], whole.q_is_final[slot:slot + 1]
        one.seq_lens = torch.tensor([slot + 1], dtype=torch.int32)
        one.query_start_loc = torch.tensor([0, 1], dtype=torch.int32)
        assert not bool(one.q_is_final[0]) and int(one.q_kv_start[0]) == kv_start
        got = block_attention_decode_rows(*one.prefill_args(), rows=rows)
        torch.testing.assert_close(got, whole_out := block_attention_torch(*whole.prefill_args())[slot:slot + 1],
                                   **TOL[torch.float32])
        assert whole_out.abs().max() > 0


def test_row_lists_are_checked():
    case = _case(MIXED_STEP, torch.float32)
    dec, pre, pre_qsl = _split_rows(case)
    with pytest.raises(ValueError, match="rows must be int32"):
        block_attention_decode_rows(*case.prefill_args(), rows=dec.long())
    with pytest.raises(ValueError, match="go together"):
        block_attention_prefill(*case.prefill_args(), rows=pre)
    with pytest.raises(ValueError, match="rows_query_start must be 1-D of length"):
        block_attention_prefill(*case.prefill_args(), rows=pre, rows_query_start=pre_qsl[:-1])
    with pytest.raises(ValueError, match="rows_tokens must be"):
        block_attention_prefill(*case.prefill_args(), rows_tokens=3)


# the warm-TTFT shape in miniature: a short final block (and a chunk of it) over a long context
FINAL_OVER_CONTEXT = [SeqSpec((40, 40, 40, 40), 10), SeqSpec((60, 33, 50), 12, q_len=7), SeqSpec((), 20)]


@pytest.mark.parametrize(("heads", "pack", "splits"), [((4, 2), False, 3), ((4, 2), True, 1), ((8, 2), True, 4)],
                         ids=str)
def test_prefill_split_k_and_packed_heads(heads, pack, splits):
    """The prefill kernel with its KV range split (log-sum-exp merge; short KV ranges leave some splits empty) and with
    a KV head's query heads packed into one program (4 tokens x 4 heads per 16-row tile at GQA 4)
    equals the float64 oracle."""
    from blockattn_kernels.prefill import prefill_meta

    case = _case(FINAL_OVER_CONTEXT, torch.float32, heads=heads, seed=7)
    if pack:
        consts, _ = prefill_meta(torch.float32, 32, heads[0] // heads[1], 16, False, True, pack=True)
        assert consts["PACK"] == heads[0] // heads[1] and consts["TOK_M"] * consts["PACK"] == consts["BLOCK_M"]
    out = torch.full_like(case.q, 7.0)
    block_attention_prefill(*case.prefill_args(), out=out, num_splits=splits, pack=pack)
    torch.testing.assert_close(out.double(), dense_oracle(case), **TOL[torch.float32])


def test_prefill_split_with_row_lists_and_bf16():
    """Split and packed prefill on the prefill rows of a mixed step, in bf16: the decode rows' outputs
    stay untouched by the merge too."""
    case = _case(MIXED_STEP, torch.bfloat16, heads=(4, 2), seed=5)
    dec, pre, pre_qsl = _split_rows(case)
    out = torch.full_like(case.q, 7.0)
    block_attention_prefill(*case.prefill_args(), out=out, rows=pre, rows_query_start=pre_qsl, num_splits=4,
                            pack=True, rows_tokens=int(pre_qsl[-1]))     # the grid sized to the prefill rows
    dec_tokens = case.query_start_loc[dec.long()].long()
    assert (out[dec_tokens] == 7.0).all()
    block_attention_decode_rows(*case.prefill_args(), rows=dec, out=out)
    torch.testing.assert_close(out.double(), dense_oracle(case), **TOL[torch.bfloat16])


def test_prefill_chooses_splits_for_a_small_grid():
    """A final block over a long context has few tiles: the launcher splits the KV range; a long prompt
    fills the grid on its own and is not split."""
    from blockattn_kernels.prefill import prefill_splits

    cpu = torch.device("cpu")
    assert prefill_splits(cpu, programs=2, max_tiles=40) > 1
    assert prefill_splits(cpu, programs=2, max_tiles=2) == 2          # never more splits than KV tiles
    assert prefill_splits(cpu, programs=64, max_tiles=40) == 1
    with pytest.raises(ValueError, match="num_splits must be"):
        case = _case(FINAL_OVER_CONTEXT, torch.float32)
        block_attention_prefill(*case.prefill_args(), num_splits=0)


def _run_py(code_or_args, env_extra, cwd=REPO, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    return subprocess.run([sys.executable, *code_or_args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_enable_interpreter_after_a_plain_import():
    """Imported without TRITON_INTERPRET, the kernels refuse CPU tensors clearly, then work once switched."""
    code = """
import torch, blockattn_kernels as bk
from tools.kernel_cases import SeqSpec, make_case
case = make_case([SeqSpec((20,), 3)], page_size=16, q_heads=2, kv_heads=2, head_dim=32)
assert not bk.triton_interpreted()
try:
    bk.block_attention_prefill(*case.prefill_args())
    raise SystemExit("no error on CPU tensors")
except RuntimeError as e:
    assert "TRITON_INTERPRET" in str(e), e
bk.enable_triton_interpreter()
got = bk.block_attention_prefill(*case.prefill_args())
torch.testing.assert_close(got, bk.block_attention_torch(*case.prefill_args()), atol=1e-4, rtol=1e-4)
print("ok")
"""
    res = _run_py(["-c", code], {})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """The compiler (not the interpreter) accepts the kernels: cubins for an H100 built here, with
    Triton's bundled toolchain, as the launchers configure them for bf16 and head_dim 128."""
    out = tmp_path / "compile.json"
    res = _run_py(["-m", "tools.compile_check", "--json", str(out)], {})
    assert res.returncode == 0, res.stderr[-3000:]
    results = {r["kernel"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"prefill", "decode", "merge", "prefill_rows", "decode_rows", "merge_rows",
                            "prefill_split", "prefill_merge"}
    for r in results.values():
        assert r["shared_bytes"] <= 227 * 1024, r
        assert r["registers"] <= 255 and r["stack_bytes"] <= 64, r    # no real spills


def test_bench_cpu_smoke(tmp_path):
    """The GPU check script's correctness and timing paths run end to end on CPU at tiny sizes,
    the way it runs on a GPU box without this package installed (PYTHONPATH=triton_kernels)."""
    out = tmp_path / "bench.json"
    # vLLM and this project's package blocked: the script must not need them
    code = ("import runpy, sys; sys.modules['vllm'] = None; sys.modules['vllm_blockattn'] = None; "
            f"sys.argv = ['bench', '--device', 'cpu', '--quick', '--json', {str(out)!r}]; "
            "runpy.run_module('tools.kernel_bench', run_name='__main__', alter_sys=True)")
    path = os.pathsep.join([str(REPO / "triton_kernels"), str(REPO)])  # the kernels and tools/, not installed
    res = _run_py(["-c", code], {"TRITON_INTERPRET": "1", "PYTHONPATH": path}, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    assert report["correctness"] and all(c["ok"] for c in report["correctness"])
    assert {c["kernel"] for c in report["correctness"]} == {"prefill", "decode"}
    kinds = {(r["kernel"], r["impl"]) for r in report["throughput"]}
    assert kinds == {("prefill", "triton"), ("prefill", "sdpa"), ("decode", "triton"), ("decode", "sdpa"),
                     ("final", "triton"), ("final", "triton_unsplit"), ("final", "sdpa")}
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["useful_flops"] > 0 for r in report["throughput"])
    assert "TFLOP/s" in res.stdout
