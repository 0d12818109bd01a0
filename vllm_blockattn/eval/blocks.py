"""Turning a long context into blocks for the block form of a task, and the options every task loader
shares (sink token, block size, length budget, tokenizer).

Options come from lm-eval's task metadata, which holds the ``--model_args`` (``pretrained``,
``tokenizer``, and for vLLM ``additional_config={"blockattn": {"sink_token": ..., "num_sinks": ...}}``,
the plugin's own override) merged with ``--metadata`` JSON; environment variables are the fallback:

========================  ==========================  =============================================
option (``--metadata``)    environment variable        meaning
========================  ==========================  =============================================
``sink_token``             ``BLOCKATTN_SINK_TOKEN``    the block marker's text (default: the model's
                                                       ``block_attention.sink_token_id`` decoded, or its
                                                       ``boundary_token_id`` when ``num_sinks`` is 0,
                                                       else ``<|block_sink|>``)
``num_sinks``              ``BLOCKATTN_NUM_SINKS``     sinks per group (default: model config, else 4);
                                                       0: the sink-free layout, one boundary token per
                                                       block (``<|block_boundary|>`` by default)
``block_tokens``           ``BLOCKATTN_BLOCK_TOKENS``  target block size of the rule-based segmenter
``max_length``             ``BLOCKATTN_MAX_LENGTH``    prompt token budget (middle truncation)
``segmenter``              ``BLOCKATTN_SEGMENTER``     ``rule``, ``rule_stable``, ``learned``,
                                                       ``baseline:NAME`` or ``module:function``
``segmenter_blocks``       ``BLOCKATTN_SEGMENTER_      blocks a ``baseline:NAME`` segmenter makes:
                           BLOCKS``                    ``tokens`` (default), ``learned``, ``natural``
                                                       or a number (see :func:`segment`)
``units``                  ``BLOCKATTN_UNITS``         ``on`` (default): LongBench's block form cuts
                                                       at the natural units (``Passage N:``, ...);
                                                       ``off``: the segmenter cuts the whole context
========================  ==========================  =============================================

``segmenter_model``, ``segmenter_threshold``, ``segmenter_depth`` (the learned segmenter) and
``segmenter_scorer`` (the causal LM of the ``loss_topk``/``entropy_topk`` baselines) are metadata only.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.layout import BOUNDARY_TOKEN, CONFIG_KEY, DEFAULT_NUM_SINKS, SINK_TOKEN
from ..segmenter.rules import rule_based_segments  # noqa: F401 - part of this module's API (the "rule" form)

DEFAULT_BLOCK_TOKENS = 512
ENV = {
    "sink_token": "BLOCKATTN_SINK_TOKEN",
    "num_sinks": "BLOCKATTN_NUM_SINKS",
    "block_tokens": "BLOCKATTN_BLOCK_TOKENS",
    "max_length": "BLOCKATTN_MAX_LENGTH",
    "segmenter": "BLOCKATTN_SEGMENTER",
    "segmenter_blocks": "BLOCKATTN_SEGMENTER_BLOCKS",
    "units": "BLOCKATTN_UNITS",
}
_ON = frozenset({"on", "true", "yes", "1"})
_OFF = frozenset({"off", "false", "no", "0"})
SEGMENTER_BLOCKS = ("tokens", "learned", "natural")


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=True)


class ModelConfigError(ValueError):
    """The model's config (for its window and block settings) could not be read."""


@functools.lru_cache(maxsize=8)
def _model_config(name: str | None) -> dict:
    """The model's config as a dict: ``name/config.json`` for a local folder, else transformers'
    ``AutoConfig`` (hub name or cache). Raises :class:`ModelConfigError` when neither works."""
    if not name:
        return {}
    if os.path.isfile(os.path.join(name, "config.json")):
        with open(os.path.join(name, "config.json")) as f:
            return json.load(f)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name, trust_remote_code=True).to_dict()
    except Exception as e:  # offline without a cached copy, a typo, a gated repository, ...
        raise ModelConfigError(f"could not read the config of model {name!r}: {type(e).__name__}: {e}") from e


def _window(config: dict) -> int | None:
    """The model's context window: ``max_position_embeddings`` (top level or in ``text_config``)."""
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg, dict) and cfg.get("max_position_embeddings"):
            return int(cfg["max_position_embeddings"])
    return None


def _int_option(value, what: str, minimum: int = 1) -> int | None:
    if value is None or value == "":
        return None
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{what} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {out}")
    return out


def _switch(value, what: str, default: bool) -> bool:
    """An on/off option: ``on``/``off`` (also true/false, yes/no, 1/0, and YAML's booleans: a yaml
    ``units: off`` arrives as False)."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise ValueError(f"{what} must be 'on' or 'off', got {value!r}")


def _segmenter_blocks(value) -> str | int:
    if value is None or value == "":
        return "tokens"
    if isinstance(value, str) and value.strip().lower() in SEGMENTER_BLOCKS:
        return value.strip().lower()
    try:
        return _int_option(value, "segmenter_blocks")
    except ValueError:
        raise ValueError(f"segmenter_blocks must be one of {SEGMENTER_BLOCKS} or a positive integer, "
                         f"got {value!r}") from None


@dataclass(frozen=True)
class FormOptions:
    """What a task loader needs to build prompts: see the module docstring for the sources."""

    tokenizer_name: str | None
    sink_token: str
    num_sinks: int
    block_tokens: int
    max_length: int | None
    segmenter: str
    segmenter_model: str | None = None
    segmenter_threshold: float | None = None
    segmenter_depth: int | None = None
    segmenter_blocks: str | int = "tokens"
    segmenter_scorer: str | None = None
    units: bool = True

    @property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_name) if self.tokenizer_name else None

    def special_tokens(self) -> tuple[int, int]:
        """(leading, trailing) special tokens the tokenizer adds to an encoded text (e.g. Llama's BOS:
        (1, 0)); LongBench's ``pred.py`` counts them in the prompt length."""
        tok = self.tokenizer
        if tok is None:
            return 0, 0
        plain = tok.encode("x", add_special_tokens=False)
        full = tok.encode("x")
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return i, len(full) - i - len(plain)
        return 0, 0

    def count_tokens(self, text: str) -> int:
        """Token count with the model's tokenizer, or a word count when no tokenizer was named."""
        tok = self.tokenizer
        return len(tok.encode(text, add_special_tokens=False)) if tok is not None else len(text.split())

    @classmethod
    def from_kwargs(cls, kwargs: dict, max_gen_toks: int = 0) -> FormOptions:
        # vLLM's model_args (merged into the metadata by lm-eval) may carry the plugin's override
        plugin = (kwargs.get("additional_config") or {}).get("blockattn") or {}
        if isinstance(plugin, dict) and "sink_token" not in plugin:
            name = kwargs.get("tokenizer") or kwargs.get("pretrained")
            if isinstance(name, str) and name:
                # the block marker's text: the sink, or a sink-free checkpoint's boundary token (num_sinks 0)
                if "boundary_token" in plugin:
                    plugin = {**plugin, "sink_token": plugin["boundary_token"]}
                for key in ("sink_token_id", "boundary_token_id"):
                    if key in plugin:
                        plugin = {**plugin, "sink_token": load_tokenizer(name).convert_ids_to_tokens(int(plugin[key]))}

        def get(key):
            value = kwargs.get(key)
            if value in (None, "") and isinstance(plugin, dict):
                value = plugin.get(key)
            return os.environ.get(ENV[key]) if value in (None, "") and key in ENV else value

        tok_name = kwargs.get("tokenizer") or kwargs.get("pretrained")
        tok_name = tok_name if isinstance(tok_name, str) and tok_name else None
        max_length = _int_option(get("max_length"), "max_length")
        window = _int_option(kwargs.get("max_model_len"), "max_model_len")
        model_name = kwargs.get("pretrained") if isinstance(kwargs.get("pretrained"), str) else None
        try:
            config = _model_config(model_name or tok_name)
        except ModelConfigError as e:
            if max_length is None and window is None:
                raise ModelConfigError(
                    f"{e}. The default prompt budget (max_length) is the model's max_position_embeddings less "
                    f"the answer length; give it explicitly instead: --metadata '{{\"max_length\": N}}' or "
                    f"max_model_len=N in --model_args") from e
            config = {}  # the budget is given; block settings then come from options or defaults
        block_cfg = config.get(CONFIG_KEY) or {}
        sink_token = get("sink_token")
        marker_key = "boundary_token_id" if block_cfg.get("num_sinks") == 0 else "sink_token_id"
        if not sink_token and marker_key in block_cfg and tok_name:
            sink_token = load_tokenizer(tok_name).convert_ids_to_tokens(int(block_cfg[marker_key]))
        num_sinks = _int_option(get("num_sinks"), "num_sinks", minimum=0)  # 0: the sink-free layout
        if num_sinks is None:
            num_sinks = int(block_cfg.get("num_sinks", DEFAULT_NUM_SINKS))
        sink_token = sink_token or (BOUNDARY_TOKEN if num_sinks == 0 else SINK_TOKEN)
        window = window or _window(config)
        if max_length is None and window:
            # LongBench truncates to the model's window less the answer (e.g. 31500 for 32k models);
            # vLLM's max_model_len (in --model_args) is the window when given.
            max_length = int(window) - max_gen_toks
        opts = cls(
            tokenizer_name=tok_name,
            sink_token=sink_token,
            num_sinks=num_sinks,
            block_tokens=_int_option(get("block_tokens"), "block_tokens") or DEFAULT_BLOCK_TOKENS,
            max_length=max_length,
            segmenter=get("segmenter") or "rule",
            segmenter_model=kwargs.get("segmenter_model") or None,
            segmenter_threshold=float(kwargs["segmenter_threshold"]) if kwargs.get("segmenter_threshold") else None,
            segmenter_depth=_int_option(kwargs.get("segmenter_depth"), "segmenter_depth"),
            segmenter_blocks=_segmenter_blocks(get("segmenter_blocks")),
            segmenter_scorer=kwargs.get("segmenter_scorer") or None,
            units=_switch(get("units"), "units", default=True),
        )
        opts.check_sink()
        return opts

    @property
    def marker_tokens(self) -> int:
        """Marker tokens before every block in the prompt: k sinks, or one boundary (sink-free, which the
        engine drops before the model runs but which the prompt still carries)."""
        return self.num_sinks or 1

    def check_sink(self) -> None:
        """The marker text must encode to exactly one token per marker, or the layout cannot be parsed."""
        tok = self.tokenizer
        if tok is None:
            return
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0 (0: the sink-free layout), got {self.num_sinks}")
        ids = tok.encode(self.sink_token * self.marker_tokens, add_special_tokens=False)
        if len(ids) != self.marker_tokens or len(set(ids)) != 1:
            raise ValueError(
                f"sink_token {self.sink_token!r} is not a single token of tokenizer {self.tokenizer_name!r} "
                f"({self.marker_tokens} copies encode to {ids[:12]}); name a special token of the model "
                f"(e.g. --metadata '{{\"sink_token\": \"<|endoftext|>\"}}' for the training-free baseline)"
            )


def block_text(blocks: Sequence[str], opts: FormOptions) -> str:
    """The block prompt's text: ``[S x k] block`` for every block (the last is the final block); one
    boundary token per block for a sink-free checkpoint (``num_sinks`` 0)."""
    from ..core.layout import build_block_text

    return build_block_text(blocks, sink_token=opts.sink_token, num_sinks=opts.num_sinks)


def split_before(text: str, pattern: str, min_units: int = 2) -> list[str] | None:
    """Cut ``text`` before every match of ``pattern`` (a natural unit such as ``Passage 3:``).

    Text before the first match joins the first unit. Returns None when fewer than ``min_units``
    units are found, so the caller can fall back to the segmenter. The pieces concatenate to ``text``.
    """
    starts = [m.start() for m in re.finditer(pattern, text)]
    if len(starts) < min_units:
        return None
    cuts = [0] + [s for s in starts if s > 0] + [len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if a < b]


def segment(text: str, opts: FormOptions) -> list[str]:
    """Cut a context into blocks: THE hook where a segmenter plugs in.

    ``opts.segmenter`` is ``"rule"`` (the rule-based fallback: greedy packing, so a cut depends on where
    the text starts), ``"rule_stable"`` (the content-defined rule segmenter,
    :func:`vllm_blockattn.segmenter.rules.stable_rule_segments`: the same blocks wherever a document
    appears, blocks about half of ``block_tokens`` on average), ``"learned"`` (the project's learned
    segmenter, :func:`vllm_blockattn.segmenter.api.segment_text`, with ``segmenter_model``,
    ``segmenter_threshold`` and ``segmenter_depth``; the packaged model when no path is given),
    ``"baseline:NAME"`` (a baseline of :mod:`vllm_blockattn.segmenter.baselines`, see
    :func:`baseline_segments`), or ``"module:function"``, called as
    ``function(text, max_tokens=..., tokenizer_name=...)`` and returning the blocks as strings.
    """
    if opts.segmenter == "rule":
        blocks = rule_based_segments(text, opts.block_tokens, opts.count_tokens)
    elif opts.segmenter == "rule_stable":
        from ..segmenter.rules import stable_rule_segments

        blocks = stable_rule_segments(text, opts.block_tokens, opts.count_tokens)
    elif opts.segmenter == "learned":
        blocks = _learned(text, opts)
    elif opts.segmenter.startswith("baseline:"):
        blocks = baseline_segments(opts.segmenter.split(":", 1)[1], text, opts)
    else:
        module, _, name = opts.segmenter.partition(":")
        if not name:
            raise ValueError(f"segmenter must be 'rule', 'rule_stable', 'learned', 'baseline:NAME' or "
                             f"'module:function', got {opts.segmenter!r}")
        fn = getattr(importlib.import_module(module), name)
        blocks = list(fn(text, max_tokens=opts.block_tokens, tokenizer_name=opts.tokenizer_name))
    blocks = [b for b in blocks if b.strip()]
    if not blocks:
        raise ValueError("the segmenter returned no non-empty block for a non-empty context")
    return blocks


def _learned(text: str, opts: FormOptions) -> list[str]:
    from ..segmenter.api import segment_text

    return segment_text(text, model=opts.segmenter_model, threshold=opts.segmenter_threshold,
                        depth=opts.segmenter_depth)


@functools.lru_cache(maxsize=2)
def _scorer(path: str):
    from ..segmenter.baselines import LMScorer

    return LMScorer.from_pretrained(path)


def baseline_blocks_count(text: str, opts: FormOptions) -> int:
    """How many blocks a baseline segmenter makes of ``text`` (``opts.segmenter_blocks``): ``tokens``
    one block per ``block_tokens`` tokens, rounded up (a fixed granularity); ``learned`` as many as the
    learned segmenter makes of the same text (the paper aligns every baseline's parallel degree with
    its segmenter's); a number: that many. Never more than the text has cut positions for."""
    from ..segmenter.baselines import token_units

    how = opts.segmenter_blocks
    if how == "tokens":
        k = -(-opts.count_tokens(text) // opts.block_tokens)
    elif how == "learned":
        k = len(_learned(text, opts))
    else:
        k = int(how)
    units, _ = token_units(text, opts.tokenizer)
    return max(1, min(k, len(units) + 1))


def baseline_segments(name: str, text: str, opts: FormOptions) -> list[str]:
    """The blocks of ``text`` by the baseline segmenter ``name`` (``random``, ``average`` (equal token
    lengths), ``punctuation``, ``random_candidate``, ``average_candidate``, ``blank_line``, ``heading``,
    ``loss_topk``, ``entropy_topk``), units counted with the model's tokenizer. ``segmenter_blocks``
    sets the count (:func:`baseline_blocks_count`); ``natural`` takes every point of ``blank_line`` /
    ``heading``. ``loss_topk``/``entropy_topk`` score tokens with the causal LM ``segmenter_scorer``."""
    from ..segmenter.baselines import BASELINES, NATURAL, baseline_blocks, natural_blocks

    if name not in BASELINES:
        raise ValueError(f"unknown baseline segmenter {name!r}; expected baseline:NAME with NAME one of {BASELINES}")
    if opts.segmenter_blocks == "natural":
        if name not in NATURAL:
            raise ValueError(f"segmenter_blocks 'natural' is for the baselines {NATURAL}, not {name!r}")
        return natural_blocks(name, text)
    scorer = None
    if name in ("loss_topk", "entropy_topk"):
        if not opts.segmenter_scorer:
            raise ValueError(f"baseline {name!r} scores tokens with a causal LM: name it as segmenter_scorer "
                             f"(--metadata '{{\"segmenter_scorer\": \"/path/to/model\"}}')")
        scorer = _scorer(opts.segmenter_scorer)
    return baseline_blocks(name, text, baseline_blocks_count(text, opts), tokenizer=opts.tokenizer,
                           scorer=scorer)


def truncate_middle(text: str, keep_head: int, keep_tail: int, opts: FormOptions) -> str:
    """Keep the first ``keep_head`` and last ``keep_tail`` tokens of ``text`` (LongBench's middle
    truncation, decoded with special tokens skipped)."""
    tok = opts.tokenizer
    if tok is None:
        words = text.split(" ")
        return " ".join(words[:keep_head] + (words[-keep_tail:] if keep_tail else []))
    ids = tok.encode(text, add_special_tokens=False)
    if keep_head + keep_tail >= len(ids):
        return text
    head = tok.decode(ids[:keep_head], skip_special_tokens=True)
    tail = tok.decode(ids[len(ids) - keep_tail :], skip_special_tokens=True) if keep_tail else ""
    return head + tail
