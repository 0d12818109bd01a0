"""lm-eval adapters: the loader and scorer live in the installed package (vllm_blockattn.eval.longbench)."""

from vllm_blockattn.eval.longbench import load, process_results

__all__ = ["load", "process_results"]
