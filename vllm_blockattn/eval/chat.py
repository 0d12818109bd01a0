"""Thinking off by default: Qwen3's chat templates and lm-eval's ``enable_thinking`` model argument.

Qwen3's chat templates branch on a template variable ``enable_thinking``: when it is ``False`` the
generation prompt ends with an empty ``<think>\\n\\n</think>\\n\\n`` block and the model answers at
once; left undefined (or ``True``, or ``None``) the model first writes its reasoning. The paper
evaluates (and the trainer formats) without thinking, so the pack renders chats with
``enable_thinking=False`` unless told otherwise:

- ``hf-block`` takes the model argument ``enable_thinking`` (default False) and, for
  ``enable_thinking=True``, ``think_end_token`` (the answer is what follows its last occurrence);
- lm-eval's ``hf`` and ``vllm`` models have the same two model arguments (lm-eval >= 0.4.9), whose
  default (None) leaves thinking on; :func:`thinking_off_argv` adds ``enable_thinking=False`` to
  their ``--model_args`` when the command line names no ``enable_thinking`` (the runner
  ``python -m vllm_blockattn.eval`` does this), and :func:`thinking_model_args` does the same for
  a model-args dict or string handed to ``lm_eval.simple_evaluate``.

Templates that never mention ``enable_thinking`` ignore the variable: the rendered text is the same
with or without it (jinja leaves unused variables alone), which the tests check.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

# lm-eval's models that accept enable_thinking (and think_end_token) as model arguments
THINKING_MODELS = frozenset({"hf", "huggingface", "vllm", "hf-block"})
DEFAULT_ENABLE_THINKING = False


def as_bool(value, what: str = "enable_thinking") -> bool:
    """A boolean model argument (lm-eval passes ``True``/``False`` as bools, a JSON string as text)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{what} must be true or false, got {value!r}")


def mentions_thinking(tokenizer) -> bool:
    """Whether the tokenizer's chat template reads ``enable_thinking`` (Qwen3's do)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates
        return any("enable_thinking" in str(t) for t in template.values())
    return template is not None and "enable_thinking" in str(template)


def template_kwargs(tokenizer, enable_thinking: bool = DEFAULT_ENABLE_THINKING) -> dict:
    """Extra ``apply_chat_template`` arguments: ``enable_thinking`` for a template that reads it, none
    for one that does not (some tokenizer classes refuse unknown arguments)."""
    return {"enable_thinking": bool(enable_thinking)} if mentions_thinking(tokenizer) else {}


def _option(argv: Sequence[str], names: tuple[str, ...]) -> list[str]:
    """The values given to option ``names`` (``--x v``, ``--x=v``; every value of an ``nargs='+'``
    option up to the next option)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in names:
            if eq:
                out.append(value)
            else:
                i += 1
                while i < len(argv) and not argv[i].startswith("-"):
                    out.append(argv[i])
                    i += 1
                continue
        i += 1
    return out


def thinking_off_argv(argv: Sequence[str]) -> list[str]:
    """lm-eval CLI arguments with ``--model_args enable_thinking=False`` appended for the ``hf`` and
    ``vllm`` models (lm-eval's default model is ``hf``) when no ``--model_args`` value mentions
    ``enable_thinking``. A ``--config`` file may hold the model arguments, so then nothing is added
    (set ``enable_thinking`` there). lm-eval merges repeated ``--model_args``."""
    argv = list(argv)
    if not argv or (not argv[0].startswith("-") and argv[0] != "run"):  # `ls`, `validate`, ...: no model
        return argv
    if _option(argv, ("--config", "-C")):
        return argv
    models = _option(argv, ("--model", "-M"))
    model = models[-1] if models else "hf"
    if model not in THINKING_MODELS or model == "hf-block":  # hf-block defaults to thinking off itself
        return argv
    if any("enable_thinking" in v for v in _option(argv, ("--model_args", "-a"))):
        return argv
    return [*argv, "--model_args", f"enable_thinking={DEFAULT_ENABLE_THINKING}"]


def thinking_model_args(model: str, model_args: dict | str | None):
    """``model_args`` (a dict, a JSON string or lm-eval's ``k=v,k=v`` string) with
    ``enable_thinking=False`` added for the ``hf``/``vllm`` models when it has no ``enable_thinking``;
    returned in the same form."""
    if model not in THINKING_MODELS or model == "hf-block":
        return model_args
    if model_args is None or isinstance(model_args, dict):
        args = dict(model_args or {})
        args.setdefault("enable_thinking", DEFAULT_ENABLE_THINKING)
        return args
    text = model_args.strip()
    if "enable_thinking" in text:
        return model_args
    if text.startswith("{"):
        return json.dumps({**json.loads(text), "enable_thinking": DEFAULT_ENABLE_THINKING})
    return f"{text},enable_thinking={DEFAULT_ENABLE_THINKING}" if text else f"enable_thinking={DEFAULT_ENABLE_THINKING}"
