"""The native CPU final-block kernel (``csrc/final_attention.cpp``) against a dense torch reference, on
vLLM's real CPU page layout (written with vLLM's own cache-write op), and inside vLLM."""

import gc

import pytest
import torch

from vllm_blockattn import cpu_kernels
from vllm_blockattn.reference import apply_rotation, rope_cos_sin

vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def kernel():
    module = cpu_kernels.load()
    if module is None:
        pytest.fail(f"the CPU kernel did not build: {cpu_kernels.failure()}")
    return module


def make_case(dtype, seed, *, page=32, hkv=2, group=2, d=64, blocks=((40, 100), (32, 0), (7, 300)), final=45,
              q_len=5, isa="vec"):
    """One request: context blocks (real length, logical offset) in physical order, then a final block
    of ``final`` tokens whose last ``q_len`` are queries. Returns kernel args and the dense reference."""
    from vllm import _custom_ops as ops

    from vllm_blockattn.backend import kernel_layout

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
    k = torch.randn(total, hkv, d, generator=g)
    v = torch.randn(total, hkv, d, generator=g)
    key_cache, value_cache = cache.view(n_pages + 1, hkv, 2 * page, d).chunk(2, dim=2)
    slots = (perm.long()[torch.arange(total) // page] * page + torch.arange(total) % page)
    ops.cpu_attn_reshape_and_cache(k.to(dtype), v.to(dtype), key_cache, value_cache, slots, isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
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
    out_ref = torch.empty(q_len, hq, d)
    for i in range(q_len):
        visible = n_ctx + final - q_len + i + 1
        kk = K[:visible].repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, N, D]
        vv = V[:visible].repeat_interleave(group, dim=1).transpose(0, 1)
        att = torch.softmax((q[i].float()[:, None, :] @ kk.transpose(1, 2)).squeeze(1) * d ** -0.5, dim=-1)
        out_ref[i] = (att[:, None, :] @ vv).squeeze(1)

    cos, sin = rope_cos_sin(-torch.tensor([float(o) for _, o in blocks] + [0.0]), inv_freq)
    cos[-1], sin[-1] = 1.0, 0.0
    layout = kernel_layout(isa, dtype, page, 2 * d)
    assert layout is not None
    args = dict(
        query=q, kv_cache=cache, block_table=perm[None, :].contiguous(),
        e_row0=torch.tensor([0], dtype=torch.int64), e_nq=torch.tensor([q_len], dtype=torch.int32),
        e_bt_row=torch.tensor([0], dtype=torch.int32), e_final0=torch.tensor([final - q_len + 1], dtype=torch.int32),
        seg_ptr=torch.tensor([0, len(blocks) + 1], dtype=torch.int32),
        seg_page=torch.tensor([s // page for s, _, _ in spans] + [final_start // page], dtype=torch.int32),
        seg_len=torch.tensor([n for _, n, _ in spans] + [0], dtype=torch.int32),
        seg_cos=cos.contiguous(), seg_sin=sin.contiguous(), scale=d ** -0.5, k_col_major=layout[0],
        v_col_major=layout[1])
    return args, out_ref


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_kernel_matches_dense_reference(kernel, dtype, tol):
    for seed in range(3):
        args, ref = make_case(dtype, seed)
        out = torch.full_like(args["query"], float("nan"))
        kernel.final_attention(*args.values(), out)
        assert (out.float() - ref).abs().max().item() < tol, seed


def test_kernel_decode_single_query_and_no_context(kernel):
    args, ref = make_case(torch.float32, 7, q_len=1, final=33)
    out = torch.empty_like(args["query"])
    kernel.final_attention(*args.values(), out)
    assert (out - ref).abs().max().item() < 1e-4
    args, ref = make_case(torch.float32, 8, blocks=(), final=45, q_len=45)  # no context: plain causal, 6 tiles
    out = torch.empty_like(args["query"])
    kernel.final_attention(*args.values(), out)
    assert (out - ref).abs().max().item() < 1e-4


def test_kernel_rejects_bad_arguments(kernel):
    args, _ = make_case(torch.float32, 9)
    args["block_table"] = args["block_table"].long()
    with pytest.raises(RuntimeError, match="int32"):
        kernel.final_attention(*args.values(), torch.empty_like(args["query"]))


def test_vllm_runs_the_kernel_for_final_block_queries(tiny_qwen3, kernel, monkeypatch):
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from vllm_blockattn import BlockSettings, build_block_prompt

    from tests._reference import assert_matches, block_reference

    calls = []

    class Counting:
        def final_attention(self, *a):
            calls.append(a[0].shape[0])
            return kernel.final_attention(*a)

    monkeypatch.setattr(cpu_kernels, "_MODULE", Counting())
    settings = BlockSettings.from_pretrained(tiny_qwen3)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(10, 300, (n,), generator=g).tolist() for n in (45, 64, 20)]
    ids = build_block_prompt(docs + [torch.randint(10, 300, (12,), generator=g).tolist()], settings)
    llm = LLM(model=tiny_qwen3, attention_backend="blockattn", dtype="float32", enforce_eager=True,
              max_model_len=512, num_gpu_blocks_override=64, seed=0)
    try:
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=8, temperature=0.0, logprobs=0,
                                                                         ignore_eos=True), use_tqdm=False)[0]
    finally:
        del llm
        gc.collect()
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    assert_matches(out, block_reference(model, settings, ids, 8))
    assert calls and all(c > 0 for c in calls)  # every layer of the prefill and each decode step


@pytest.mark.parametrize("hkv, group, d", [(4, 1, 64), (1, 4, 128), (2, 8, 64), (2, 3, 64), (1, 2, 96)])
def test_kernel_head_shapes(kernel, hkv, group, d):
    """The register-blocked path (page 32, head_dim 64/128, any number of query heads per KV head) and
    the generic row-at-a-time path (other head dims) give the same result as the reference."""
    for q_len in (1, 11):
        args, ref = make_case(torch.float32, 10 + q_len, hkv=hkv, group=group, d=d, q_len=q_len)
        out = torch.empty_like(args["query"])
        kernel.final_attention(*args.values(), out)
        assert (out - ref).abs().max().item() < 1e-4, (hkv, group, d, q_len)


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
        out = torch.full_like(args["query"], float("nan"))
        kernel.final_attention(*args.values(), out)
        err = (out.float() - ref).abs().max().item()
        assert err < tol, (q_len, before, err)
