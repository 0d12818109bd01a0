"""The native CPU final-block kernel (``csrc/final_attention.cpp``) against a dense torch reference, on
vLLM's real CPU page layout (written with vLLM's own cache-write op), and inside vLLM."""

import gc

import pytest
import torch

from vllm_blockattn.worker import cpu_kernels
from vllm_blockattn.core.rope import apply_rotation, rope_cos_sin

vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def kernel():
    module = cpu_kernels.load()
    if module is None:
        pytest.fail(f"the CPU kernel did not build: {cpu_kernels.failure()}")
    return module


def amx_available(kernel) -> bool:
    """vLLM stores bf16 pages in its AMX layout here, and the kernel was built with its AMX path."""
    return torch.cpu._is_amx_tile_supported() and kernel.has_amx()


def run(kernel, args, out):
    """The kernel entry for the case's page layout (``args["layout"]``)."""
    a = dict(args)
    layout = a.pop("layout")
    if layout.amx:
        kernel.final_attention_amx(*a.values(), out)
    else:
        kernel.final_attention(*a.values(), layout.k_col_major, layout.v_col_major, out)
    return out


def make_case(dtype, seed, *, page=32, hkv=2, group=2, d=64, blocks=((40, 100), (32, 0), (7, 300)), final=45,
              q_len=5, isa="vec", pad_value=None):
    """One request: context blocks (real length, logical offset) in physical order, then a final block
    of ``final`` tokens whose last ``q_len`` are queries. Returns kernel args (with the page layout as
    ``layout``; call them with ``run``) and the dense reference. ``pad_value`` fills the cache before
    the KV is written, so that pad slots and unwritten slots hold it (NaN: they must never count)."""
    from vllm import _custom_ops as ops

    from vllm_blockattn.worker.backend_cpu import page_format

    g = torch.Generator().manual_seed(seed)
    hq = hkv * group
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    spans, slot = [], 0
    for n, off in blocks:
        spans.append((slot, n, off))
        slot += -(-n // page) * page
    final_start = slot
    total = final_start + final
    n_pages = -(-total // page) + 3
    perm = torch.randperm(n_pages, generator=g)[: -(-total // page)].to(torch.int32)  # scattered pages
    cache = torch.randn(n_pages + 1, hkv, page, 2 * d, generator=g).to(dtype)
    if pad_value is not None:
        cache.fill_(pad_value)
    k = torch.randn(total, hkv, d, generator=g)
    v = torch.randn(total, hkv, d, generator=g)
    key_cache, value_cache = cache.view(n_pages + 1, hkv, 2 * page, d).chunk(2, dim=2)
    slots = (perm.long()[torch.arange(total) // page] * page + torch.arange(total) % page)
    real = torch.cat([torch.arange(start, start + n) for start, n, _ in spans] + [torch.arange(final_start, total)])
    ops.cpu_attn_reshape_and_cache(k[real].to(dtype), v[real].to(dtype), key_cache, value_cache, slots[real], isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")  # pads keep their old values
    q = torch.randn(q_len, hq, d, generator=g).to(dtype)

    # Reference: keys of block b rotated by its offset, final keys as stored; causal in the final block.
    ks, vs = [], []
    for start, n, off in spans:
        cos, sin = rope_cos_sin(torch.full((n,), float(off)), inv_freq)
        ks.append(apply_rotation(k[start : start + n].float(), cos[:, None], sin[:, None]))
        vs.append(v[start : start + n].float())
    ks.append(k[final_start:].float())
    vs.append(v[final_start:].float())
    K, V = torch.cat(ks), torch.cat(vs)
    n_ctx = K.shape[0] - final
    # Query i sees every context key and the final block up to its own slot.
    visible = torch.arange(K.shape[0])[None, :] <= (n_ctx + final - q_len + torch.arange(q_len))[:, None]
    kk = K.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, N, D]
    vv = V.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q.float().transpose(0, 1) @ kk.transpose(1, 2)) * d ** -0.5  # [Hq, q_len, N]
    att = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out_ref = (att @ vv).transpose(0, 1)  # [q_len, Hq, D]

    cos, sin = rope_cos_sin(-torch.tensor([float(o) for _, o in blocks] + [0.0]), inv_freq)
    cos[-1], sin[-1] = 1.0, 0.0
    layout = page_format(isa, dtype, page, 2 * d)
    assert layout is not None
    args = dict(
        query=q, kv_cache=cache, block_table=perm[None, :].contiguous(),
        e_row0=torch.tensor([0], dtype=torch.int64), e_nq=torch.tensor([q_len], dtype=torch.int32),
        e_bt_row=torch.tensor([0], dtype=torch.int32), e_final0=torch.tensor([final - q_len + 1], dtype=torch.int32),
        seg_ptr=torch.tensor([0, len(blocks) + 1], dtype=torch.int32),
        seg_page=torch.tensor([s // page for s, _, _ in spans] + [final_start // page], dtype=torch.int32),
        seg_len=torch.tensor([n for _, n, _ in spans] + [0], dtype=torch.int32),
        seg_cos=cos.contiguous(), seg_sin=sin.contiguous(), scale=d ** -0.5, layout=layout)
    return args, out_ref


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_kernel_matches_dense_reference(kernel, dtype, tol):
    for seed in range(3):
        args, ref = make_case(dtype, seed)
        out = run(kernel, args, torch.full_like(args["query"], float("nan")))
        assert (out.float() - ref).abs().max().item() < tol, seed


def test_kernel_decode_single_query_and_no_context(kernel):
    args, ref = make_case(torch.float32, 7, q_len=1, final=33)
    out = run(kernel, args, torch.empty_like(args["query"]))
    assert (out - ref).abs().max().item() < 1e-4
    args, ref = make_case(torch.float32, 8, blocks=(), final=45, q_len=45)  # no context: plain causal
    out = run(kernel, args, torch.empty_like(args["query"]))
    assert (out - ref).abs().max().item() < 1e-4


def test_kernel_rejects_bad_arguments(kernel):
    args, _ = make_case(torch.float32, 9)
    args["block_table"] = args["block_table"].long()
    with pytest.raises(RuntimeError, match="int32"):
        run(kernel, args, torch.empty_like(args["query"]))


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_vllm_runs_the_kernel_for_final_block_queries(tiny_qwen3, kernel, monkeypatch, dtype):
    """Inside vLLM the final path runs the kernel (in bf16 on an AMX CPU: its AMX entry, on vLLM's AMX
    pages) and generation matches the HF block reference (bf16: tokens, log-probs to 0.1)."""
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from vllm_blockattn import BlockSettings, build_block_prompt

    from tests._reference import assert_matches, block_reference

    calls, amx_calls = [], []

    class Counting:
        def has_amx(self):
            return kernel.has_amx()

        def final_attention(self, *a):
            calls.append(a[0].shape[0])
            return kernel.final_attention(*a)

        def final_attention_amx(self, *a):
            calls.append(a[0].shape[0])
            amx_calls.append(a[0].shape[0])
            return kernel.final_attention_amx(*a)

    monkeypatch.setattr(cpu_kernels, "_MODULE", Counting())
    settings = BlockSettings.from_pretrained(tiny_qwen3)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(10, 300, (n,), generator=g).tolist() for n in (45, 64, 20)]
    ids = build_block_prompt(docs + [torch.randint(10, 300, (12,), generator=g).tolist()], settings)
    llm = LLM(model=tiny_qwen3, attention_backend="blockattn", dtype=dtype, enforce_eager=True,
              max_model_len=512, num_gpu_blocks_override=64, seed=0)
    try:
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=8, temperature=0.0, logprobs=0,
                                                                         ignore_eos=True), use_tqdm=False)[0]
    finally:
        del llm
        gc.collect()
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    assert_matches(out, block_reference(model, settings, ids, 8), tol=1e-3 if dtype == "float32" else 0.1)
    assert calls and all(c > 0 for c in calls)  # every layer of the prefill and each decode step
    if dtype == "bfloat16" and amx_available(kernel):
        assert amx_calls == calls


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("hkv, group, d, page, isa", [
    (4, 1, 64, 32, "vec"), (1, 4, 128, 32, "vec"), (2, 8, 64, 32, "vec"), (2, 3, 64, 32, "vec"),
    (1, 2, 96, 32, "vec"), (1, 2, 32, 32, "vec"), (1, 2, 256, 64, "vec"), (2, 2, 80, 16, "vec16")])
def test_kernel_head_shapes(kernel, dtype, tol, hkv, group, d, page, isa):
    """The tiled path (head_dim 64/128 unrolled, other multiples of 32 at run time; pages of 32 or
    more; any number of query heads per KV head; fp32 and fp16 pages) and the generic row-at-a-time
    path (vLLM's "vec16" layout: head_dim 80, pages of 16) give the reference's result."""
    for q_len in (1, 11):
        args, ref = make_case(dtype, 10 + q_len, hkv=hkv, group=group, d=d, q_len=q_len, page=page, isa=isa)
        out = run(kernel, args, torch.empty_like(args["query"]))
        assert (out.float() - ref).abs().max().item() < tol, (hkv, group, d, q_len)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_kernel_multi_query_blocks(kernel, dtype, tol, d, group):
    """The register-blocked path (several query rows per K/V load) against the dense reference: query
    counts that are not multiples of the row block or the 8-query tile, the step's first query at
    different slots and pages of the final block (so row blocks mix rows that see different numbers of
    keys of a page, some none), and a context before it."""
    for i, q_len in enumerate((1, 3, 5, 17, 130)):
        before = (0, 5, 31, 32, 70)[(i + group + d // 64) % 5]  # final-block tokens before the first query
        args, ref = make_case(dtype, 100 + i, hkv=2, group=group, d=d, q_len=q_len, final=before + q_len)
        out = run(kernel, args, torch.full_like(args["query"], float("nan")))
        err = (out.float() - ref).abs().max().item()
        assert err < tol, (q_len, before, err)


def context_blocks(n_ctx: int, seed: int, block: int = 512) -> tuple[tuple[int, int], ...]:
    """About ``n_ctx`` context tokens in blocks of up to ``block`` (some shorter, so their last page
    is partly pads), in physical order, with logical offsets in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < n_ctx:
        lens.append(min(block - int(torch.randint(0, 40, (1,), generator=g)), n_ctx - sum(lens)))
    order = torch.randperm(len(lens), generator=g).tolist()
    offsets, at = [0] * len(lens), 4  # the logical order starts after a 4-token head
    for i in order:
        offsets[i] = at
        at += lens[i] + 4
    return tuple(zip(lens, offsets))


LAYOUTS = [  # (dtype, vLLM ISA of the page layout, tolerance)
    pytest.param(torch.float32, "vec", 1e-4, id="fp32-vec"),
    pytest.param(torch.bfloat16, "vec", 3e-2, id="bf16-vec"),
    pytest.param(torch.bfloat16, "amx", 3e-2, id="bf16-amx"),
]


def skip_unless_layout(kernel, isa):
    if isa == "amx" and not amx_available(kernel):
        pytest.skip("no AMX here (vLLM stores bf16 pages in the vec layout): the AMX path is not reachable")


@pytest.mark.parametrize("dtype, isa, tol", LAYOUTS)
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_prefill_shapes(kernel, dtype, isa, tol, d):
    """Final-block prefill as the tiled and AMX paths see it, at small sizes: 16 and 115 queries (a
    tile of 32 queries is two 32-row blocks at GQA 2, 115 leaves a 16-row tail) over ~1k tokens of
    context in blocks with pad tails, GQA 2."""
    skip_unless_layout(kernel, isa)
    for i, (q_len, before) in enumerate(((16, 0), (115, 37))):
        args, ref = make_case(dtype, 200 + i, hkv=2, group=2, d=d, blocks=context_blocks(1100, 200 + i), isa=isa,
                              q_len=q_len, final=before + q_len)
        out = run(kernel, args, torch.full_like(args["query"], float("nan")))
        err = (out.float() - ref).abs().max().item()
        assert err < tol, (q_len, err)


@pytest.mark.parametrize("dtype, isa, tol", LAYOUTS)
def test_kernel_pads_never_count(kernel, dtype, isa, tol):
    """Pad slots of partial pages and the unwritten tail of the final page hold NaN: the result is
    still the reference (scores are selected out, P.V never multiplies a pad's V)."""
    skip_unless_layout(kernel, isa)
    for q_len in (1, 40):
        args, ref = make_case(dtype, 300 + q_len, d=64, isa=isa, q_len=q_len, final=q_len + 3,
                              pad_value=float("nan"))
        out = run(kernel, args, torch.empty_like(args["query"]))
        err = (out.float() - ref).abs().max().item()
        assert err < tol, (q_len, err)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_amx_rows(kernel, d, group):
    """The AMX path's row blocks (32, and 16 for a tail, pad rows zero) and causal limits: the query
    counts and first-query slots of ``test_kernel_multi_query_blocks``."""
    skip_unless_layout(kernel, "amx")
    for i, q_len in enumerate((1, 3, 5, 17, 130)):
        before = (0, 5, 31, 32, 70)[(i + group + d // 64) % 5]
        args, ref = make_case(torch.bfloat16, 100 + i, hkv=2, group=group, d=d, q_len=q_len, final=before + q_len,
                              isa="amx")
        out = run(kernel, args, torch.full_like(args["query"], float("nan")))
        err = (out.float() - ref).abs().max().item()
        assert err < 3e-2, (q_len, before, err)


SHORT_BLOCKS = ((40, 100), (64, 0), (7, 300), (33, 520), (64, 180))  # short blocks, partial pages, varied offsets


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["measured", "dpbf16", "fma"])
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 4])
def test_kernel_amx_few_rows(kernel, mode, d, group):
    """Work items of few rows skip the AMX tiles (AVX512-BF16 vdpbf16ps or fp32 FMAs on the same VNNI
    tiles), here forced for every work item: 1-5 queries x GQA 1-4 (blocks of 4 rows and 1-3 row tails),
    short context blocks with their own rotations and pad tails, NaN in every pad and unwritten slot, the
    first query at different slots of the final block, and ~1.1k tokens in blocks of up to 512 (several
    256-key tiles, the running max rescaled)."""
    skip_unless_layout(kernel, "amx")
    old = kernel.set_amx_small_rows(1000, mode)
    try:
        for i, q_len in enumerate((1, 2, 3, 5)):
            before = (0, 5, 31, 32)[(i + group) % 4]
            for blocks in (SHORT_BLOCKS, context_blocks(1100, 600 + i)):
                args, ref = make_case(torch.bfloat16, 600 + i, hkv=2, group=group, d=d, q_len=q_len,
                                      final=before + q_len, blocks=blocks, isa="amx", pad_value=float("nan"))
                out = run(kernel, args, torch.full_like(args["query"], float("nan")))
                err = (out.float() - ref).abs().max().item()
                assert err < 3e-2, (q_len, before, len(blocks), err)
    finally:
        kernel.set_amx_small_rows(old, 0)


MANY_SHORT_BLOCKS = tuple((n, off) for n, off in zip((5, 64, 33, 1, 96, 32, 17, 64, 40, 2, 31, 70, 9, 128),
                                                       (700, 0, 90, 400, 1200, 130, 1500, 30, 310, 2000, 260, 900,
                                                        1100, 1600)))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_kernel_amx_packed_short_blocks(kernel, d, group):
    """The AMX path packs short context blocks' sub-pages into one KV tile (each sub-page with its own
    block's query rotation, pad keys masked out of the softmax): 14 blocks of 1-128 tokens (more blocks
    and sub-pages than one tile holds), NaN in every pad, 4-130 queries (16- and 32-row blocks)."""
    skip_unless_layout(kernel, "amx")
    for i, q_len in enumerate((4, 17, 130)):
        args, ref = make_case(torch.bfloat16, 900 + i, hkv=2, group=group, d=d, q_len=q_len, final=q_len + 3 * i,
                              blocks=MANY_SHORT_BLOCKS, isa="amx", pad_value=float("nan"))
        out = run(kernel, args, torch.full_like(args["query"], float("nan")))
        err = (out.float() - ref).abs().max().item()
        assert err < 3e-2, (q_len, err)


def test_kernel_amx_few_rows_threshold(kernel):
    """Both sides of the measured threshold (work items of up to 3 rows skip the AMX tiles): 1 query at
    GQA 1-4 (1-4 rows) and 2 queries at GQA 1-2 (2 and 4 rows), short blocks, NaN pads."""
    skip_unless_layout(kernel, "amx")
    threshold = kernel.set_amx_small_rows(3, 0)
    kernel.set_amx_small_rows(threshold, 0)
    assert threshold == 3
    for d in (64, 128):
        for q_len, group in ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)):
            args, ref = make_case(torch.bfloat16, 700 + group, hkv=2, group=group, d=d, q_len=q_len, final=q_len + 9,
                                  blocks=SHORT_BLOCKS, isa="amx", pad_value=float("nan"))
            out = run(kernel, args, torch.full_like(args["query"], float("nan")))
            err = (out.float() - ref).abs().max().item()
            assert err < 3e-2, (d, q_len, group, err)


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_amx_decode_long(kernel, d):
    """A decode step over ~8k tokens in 512-token blocks on the AMX layout: 2 rows (GQA 2, below the
    threshold) and 4 (GQA 4, the AMX tiles)."""
    skip_unless_layout(kernel, "amx")
    for group in (2, 4):
        args, ref = make_case(torch.bfloat16, 800 + group, hkv=2, group=group, d=d, q_len=1, final=1,
                              blocks=context_blocks(8192, 800 + group), isa="amx", pad_value=float("nan"))
        out = run(kernel, args, torch.full_like(args["query"], float("nan")))
        err = (out.float() - ref).abs().max().item()
        assert err < 3e-2, (group, err)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, isa, tol", LAYOUTS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_ctx", [2048, 4096, 8192])
def test_kernel_prefill_shapes_full(kernel, dtype, isa, tol, d, n_ctx):
    """The benchmark's shapes (eval/bench_final_kernel.py): 16, 115 and 512 queries over 2k-8k tokens."""
    skip_unless_layout(kernel, isa)
    for i, q_len in enumerate((16, 115, 512)):
        args, ref = make_case(dtype, 400 + i, hkv=2, group=2, d=d, blocks=context_blocks(n_ctx, 400 + i), isa=isa,
                              q_len=q_len, final=q_len)
        out = run(kernel, args, torch.full_like(args["query"], float("nan")))
        err = (out.float() - ref).abs().max().item()
        assert err < tol, (q_len, err)


def test_benchmark_runs_both_kernels(kernel, tmp_path):
    """eval/bench_final_kernel.py times the plugin against vLLM's own kernel on one cache; with every
    block rotation set to zero the plugin must give vLLM's result (in vLLM's page layout for the dtype
    here: vec, or amx for bf16 on AMX CPUs), and the JSON carries its provenance."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval", "bench_final_kernel.py")
    spec = importlib.util.spec_from_file_location("bench_final_kernel", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--queries", "1,40", "--contexts", "96", "--block-len", "64", "--head-dims", "64",
                       "--rounds", "1", "--calls", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"command", "cpu", "date", "vllm_blockattn_commit", "uncommitted_changes"} <= set(report["provenance"])
    assert len(report["rows"]) == 4
    for row in report["rows"]:
        tol = 1e-4 if row["dtype"] == "float32" else 3e-2
        assert row["max_abs_diff_vs_vllm"] < tol, row
        assert row["plugin_ms"] > 0 and row["vllm_ms"] > 0 and row["sdpa_ms"] > 0
