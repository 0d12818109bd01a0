"""Compile the kernels for a CUDA GPU on any machine (no GPU, no driver) and report their resources.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python; it does not type-check them the way
the compiler does (e.g. a name bound to different shapes in the two arms of an ``if``), so the tests
also compile them to a cubin for sm_90 with Triton's bundled toolchain, here, and read registers and
spills with the bundled ``cuobjdump``::

    python -m tools.compile_check [--arch 90] [--dtype bfloat16] [--head-dim 128] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_DATA_PTRS = ("q_ptr", "k_ptr", "v_ptr", "out_ptr")
_FLOAT_PTRS = ("inv_freq_ptr", "part_acc_ptr", "part_ml_ptr")


def _signature(fn, constexprs: dict, dtype: torch.dtype) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _DATA_PTRS:
            sig[name] = "*" + _TRITON_TYPES[dtype]
        elif name in _FLOAT_PTRS:
            sig[name] = "*fp32"
        elif name == "is_final_ptr":
            sig[name] = "*i8"
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    return sig


def _attrs(fn, constexprs: dict) -> dict:
    """The divisibility hints a real launch derives from its arguments: CUDA allocations are 16-byte
    aligned, and the q/k/v/out strides are multiples of head_dim (itself a multiple of 16 here).
    Without them the compiler cannot vectorize loads, and registers and spills mean nothing."""
    hinted = [i for i, name in enumerate(fn.arg_names) if name not in constexprs and (
        name.endswith("_ptr") or (name.startswith("stride_") and name not in ("stride_bt", "stride_pd", "stride_pv")))]
    return {(i,): [["tt.divisibility", 16]] for i in hinted}


def _resources(cubin: bytes) -> dict:
    """Registers, stack (spills) and static shared memory of a cubin, from the bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return dict(registers=int(found.group(1)), stack_bytes=int(found.group(2))) if found else {}


def compile_kernels(arch: int = 90, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128, group: int = 4,
                    page_size: int = 16, splits: int = 16,
                    kernels: tuple[str, ...] = ("prefill", "decode", "merge", "prefill_rows", "decode_rows",
                                                "merge_rows", "prefill_split", "prefill_merge"),
                    ) -> list[dict]:
    """Compile the kernels exactly as their launchers configure them on a GPU; one dict per kernel
    (``*_rows``: the variants that take a row list, as a mixed step launches them)."""
    from blockattn_kernels.decode import _decode_merge_kernel, _decode_partial_kernel, decode_meta
    from blockattn_kernels.prefill import MERGE_M, _prefill_kernel, _prefill_merge_kernel, prefill_meta

    pre_consts, pre_opts = prefill_meta(dtype, head_dim, group, page_size, True, False)
    dec_consts, dec_opts, merge_consts = decode_meta(dtype, head_dim, group, page_size, splits, True, False)
    pre_rows, _ = prefill_meta(dtype, head_dim, group, page_size, True, False, has_rows=True)
    dec_rows, _, merge_rows = decode_meta(dtype, head_dim, group, page_size, splits, True, False, indexed=True)
    pre_split, _ = prefill_meta(dtype, head_dim, group, page_size, True, False, has_rows=True, split=True)
    pre_merge = dict(MERGE_M=MERGE_M, D=head_dim, D_P=pre_consts["D_P"], HAS_ROWS=True)
    jobs = {"prefill": (_prefill_kernel, pre_consts, pre_opts),
            "prefill_split": (_prefill_kernel, pre_split, pre_opts),
            "prefill_merge": (_prefill_merge_kernel, pre_merge, {}),
            "decode": (_decode_partial_kernel, dec_consts, dec_opts),
            "merge": (_decode_merge_kernel, merge_consts, {}),
            "prefill_rows": (_prefill_kernel, pre_rows, pre_opts),
            "decode_rows": (_decode_partial_kernel, dec_rows, dec_opts),
            "merge_rows": (_decode_merge_kernel, merge_rows, {})}
    results = []
    for name in kernels:
        fn, consts, options = jobs[name]
        src = ASTSource(fn=fn, signature=_signature(fn, consts, dtype), constexprs=consts, attrs=_attrs(fn, consts))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        results.append(dict(kernel=name, arch=f"sm_{arch}", dtype=str(dtype).replace("torch.", ""),
                            head_dim=head_dim, shared_bytes=compiled.metadata.shared,
                            **_resources(compiled.asm["cubin"])))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile the block-attention kernels for a CUDA target")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the compiler cannot take interpreted kernels")
    results = compile_kernels(args.arch, getattr(torch, args.dtype), args.head_dim)
    for r in results:
        print(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
