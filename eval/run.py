"""Thin runner: ``python -m eval.run <lm-eval run arguments>`` (same as ``python -m vllm_blockattn.eval``).

    python -m eval.run --include_path eval/tasks --tasks locomo_block --model hf-block --model_args pretrained=PATH
"""

from vllm_blockattn.eval.__main__ import main

if __name__ == "__main__":
    main()
