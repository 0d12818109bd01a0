"""lm-eval adapters: the loader and scorer live in the installed package (vllm_blockattn.eval.locomo)."""

from vllm_blockattn.eval.locomo import load, process_results

__all__ = ["load", "process_results"]
