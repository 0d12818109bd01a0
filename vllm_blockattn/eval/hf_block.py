"""``hf-block``: an lm-eval model that runs a Hugging Face checkpoint under block attention.

It needs nothing but the prompt text: the layout is parsed from the token ids (sink groups, see
:mod:`vllm_blockattn.core.layout`), so the same task prompts serve this model and vLLM. A prompt without
sink groups runs with ordinary causal attention (the full form).

How a prompt runs: every non-final block is encoded alone with its global positions (its queries see
only its own tokens, which is exactly the block mask's rows for that block), their KV is concatenated,
and the final block runs against it causally. Generated tokens join the final block, which attends to
everything, so plain cached decoding after that prefill is exact. Tests prove the result equal to the
mask-form oracle (:func:`vllm_blockattn.core.reference.block_forward` / ``block_generate``).

    python -m vllm_blockattn.eval --include_path eval/tasks --tasks locomo_block --model hf-block \\
        --model_args pretrained=PATH[,sink_token=<|endoftext|>,num_sinks=4,dtype=bfloat16,device=cuda]

With ``--apply_chat_template`` the chat is rendered with ``enable_thinking=False`` (for templates that
read it, such as Qwen3's) unless ``enable_thinking=True`` is given (then with ``think_end_token``).
"""

from __future__ import annotations

import logging
import os

import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models first)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..core.layout import BlockLayout, BlockSettings, parse_block_prompt
from .blocks import ENV
from .chat import DEFAULT_ENABLE_THINKING, as_bool, template_kwargs

eval_logger = logging.getLogger("lm_eval")


def resolve_settings(tokenizer, pretrained: str, sink_token: str | None = None,
                     num_sinks: int | str | None = None) -> BlockSettings | None:
    """Block settings: model args, then ``BLOCKATTN_SINK_TOKEN`` / ``BLOCKATTN_NUM_SINKS``, then the
    checkpoint's ``block_attention`` config, then a ``<|block_sink|>`` token in the vocabulary.
    ``num_sinks=0`` is the sink-free layout: ``sink_token`` then names the boundary token
    (``<|block_boundary|>`` by default)."""
    sink_token = sink_token or os.environ.get(ENV["sink_token"]) or None
    num_sinks = num_sinks if num_sinks not in (None, "") else os.environ.get(ENV["num_sinks"]) or None
    num_sinks = None if num_sinks is None else int(num_sinks)
    from_config = BlockSettings.from_pretrained(pretrained) if os.path.isfile(
        os.path.join(pretrained, "config.json")) else None
    if sink_token is not None:
        ids = tokenizer.encode(sink_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"sink_token {sink_token!r} must be one token of the model's tokenizer, got ids {ids}")
        k = num_sinks if num_sinks is not None else (from_config.num_sinks if from_config else 4)
        return BlockSettings(num_sinks=0, boundary_token_id=ids[0]) if k == 0 else BlockSettings(ids[0], k)
    if from_config is not None and (num_sinks is None or (num_sinks == 0) == from_config.sink_free):
        return from_config if num_sinks in (None, 0) else BlockSettings(from_config.sink_token_id, num_sinks)
    try:
        if num_sinks == 0:
            return BlockSettings.from_tokenizer(tokenizer, num_sinks=0)
        base = BlockSettings.from_tokenizer(tokenizer)
    except ValueError:
        return None
    return BlockSettings(base.sink_token_id, num_sinks if num_sinks is not None else base.num_sinks)


@register_model("hf-block")
class HFBlockLM(TemplateLM):
    """Block-attention Hugging Face model for lm-eval (batch size 1, greedy generation).

    Args:
        pretrained: checkpoint path or hub name.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``, ``auto``).
        device: torch device.
        sink_token / num_sinks: the block marker, for a model without ``block_attention`` settings
            (the training-free baseline names an existing special token).
        add_bos_token: prepend BOS (it then forms a block of its own before the first sink group).
        max_model_len: the model's window (default: the config's ``max_position_embeddings``); longer
            prompts are refused. Like vLLM's argument of that name, the task pack also reads it (through
            lm-eval's metadata) to size its prompts: window less the answer length.
        enable_thinking: passed to a chat template that reads it (Qwen3's); default False, the model
            answers without reasoning first (lm-eval's ``hf``/``vllm`` argument of the same name).
        think_end_token: with ``enable_thinking=True``, the text that ends the reasoning (``</think>``
            for Qwen3); the answer is what follows its last occurrence. Required then, as in lm-eval.
        chat_template_args: further keyword arguments for the chat template.
    """

    def __init__(self, pretrained: str, dtype: str = "float32", device: str = "cpu", sink_token: str | None = None,
                 num_sinks: int | None = None, add_bos_token: bool = False, max_model_len: int | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, trust_remote_code: bool = False,
                 attn_implementation: str = "sdpa", enable_thinking: bool | str = DEFAULT_ENABLE_THINKING,
                 think_end_token: str | None = None, chat_template_args: dict | None = None, **kwargs):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if str(batch_size) not in ("1", "auto"):
            raise ValueError(f"hf-block runs one request at a time; batch_size must be 1, got {batch_size!r}")
        if kwargs:
            raise ValueError(f"hf-block got unknown model_args {sorted(kwargs)}")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device (default "cuda") to every model
            eval_logger.warning("hf-block: CUDA is not available, running on the CPU")
            device = "cpu"
        self.pretrained = pretrained
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            pretrained, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation).to(device).eval()
        self._device = torch.device(device)
        self.settings = resolve_settings(self.tokenizer, pretrained, sink_token, num_sinks)
        self.add_bos_token = bool(add_bos_token) if not isinstance(add_bos_token, str) else add_bos_token == "True"
        self._max_model_len = int(max_model_len or getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.enable_thinking = as_bool(enable_thinking)
        if self.enable_thinking and not think_end_token:
            raise ValueError("hf-block: enable_thinking=True needs think_end_token (e.g. think_end_token=</think>), "
                             "so that the reasoning is cut off the answer")
        self.think_end_token = think_end_token or None
        self.chat_template_args: dict = {**template_kwargs(self.tokenizer, self.enable_thinking),
                                         **(chat_template_args or {})}

    # ---- lm-eval plumbing -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_special_tokens=special)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt,
                                                  **self.chat_template_args)

    # ---- block attention ----------------------------------------------------------------------
    def layout(self, ids: list[int]) -> BlockLayout | None:
        """The prompt's block layout, or None for an ordinary prompt (or a model with no sink token)."""
        if self.settings is None:
            return None
        layout = parse_block_prompt(ids, self.settings)
        # a sink-free `B question` is ordinary attention, but its boundary token is still removed
        return layout if layout.is_block_prompt or layout.has_markers_removed else None

    @torch.no_grad()
    def prefill(self, ids: list[int], keep: int = 1):
        """Run the prompt; returns (logits of its last ``keep`` tokens ``[keep, vocab]``, KV cache,
        start of the final block).

        Without a layout the whole prompt is the final block (stock causal attention).
        """
        from transformers.cache_utils import DynamicCache

        if self._max_model_len and len(ids) > self._max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds max_model_len {self._max_model_len}; "
                             f"lower the task's max_length (--metadata '{{\"max_length\": N}}')")
        dev = self._device
        layout = self.layout(ids)
        cache = DynamicCache(config=self.model.config)
        start = 0
        # global positions over the tokens that take part in attention (a sink-free boundary takes none)
        positions = layout.positions() if layout is not None else list(range(len(ids)))
        if layout is not None:
            per_layer: list[tuple[list, list]] | None = None
            for blk in layout.context_blocks:
                block_cache = DynamicCache(config=self.model.config)
                pos = torch.tensor([positions[blk.start:blk.end]], device=dev)
                self.model(input_ids=torch.tensor([ids[blk.start:blk.end]], device=dev), position_ids=pos,
                           past_key_values=block_cache, use_cache=True, logits_to_keep=1)
                if per_layer is None:
                    per_layer = [([], []) for _ in block_cache.layers]
                for layer, entry in enumerate(block_cache.layers):
                    per_layer[layer][0].append(entry.keys)
                    per_layer[layer][1].append(entry.values)
            for layer, (ks, vs) in enumerate(per_layer or []):
                cache.update(torch.cat(ks, dim=-2), torch.cat(vs, dim=-2), layer)
            start = layout.final.start
        pos = torch.tensor([positions[start:]], device=dev)
        if keep > len(ids) - start:
            raise ValueError(f"asked for the logits of {keep} tokens but the final block has {len(ids) - start}")
        out = self.model(input_ids=torch.tensor([ids[start:]], device=dev), position_ids=pos,
                         past_key_values=cache, use_cache=True, logits_to_keep=keep)
        return out.logits[0], cache, start

    @torch.no_grad()
    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int], until: list[str]) -> list[int]:
        """Greedy continuation of ``ids`` under block attention, stopping at ``stop_ids`` or a string
        of ``until`` in the decoded text."""
        logits, cache, _ = self.prefill(ids)
        out: list[int] = []
        nxt = int(logits[-1].argmax())
        pos = cache.get_seq_length()  # the next position: every prompt token the model saw
        while True:
            if nxt in stop_ids:
                break
            out.append(nxt)
            if len(out) >= max_new_tokens:
                break
            if until:
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                if any(u in text for u in until):
                    break
            step = self.model(input_ids=torch.tensor([[nxt]], device=self._device),
                              position_ids=torch.tensor([[pos]], device=self._device),
                              past_key_values=cache, use_cache=True)
            nxt = int(step.logits[0, -1].argmax())
            pos += 1
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for req in tqdm(requests, desc="hf-block generate", disable=disable_tqdm):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            if gen_kwargs.get("do_sample"):
                raise ValueError("hf-block decodes greedily; do_sample=True is not supported")
            ids = self.tok_encode(context)
            out = self.greedy(ids, max_new, {self.eot_token_id}, until)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if self.think_end_token and self.think_end_token in text:
                text = text.split(self.think_end_token)[-1].lstrip()
            for u in until:
                text = text.split(u)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for key, context_enc, continuation_enc in tqdm(requests, desc="hf-block loglikelihood", disable=disable_tqdm):
            ids = list(context_enc) + list(continuation_enc)
            # The continuation is the end of the final block; logits come from the position before each token.
            n = len(continuation_enc)
            logits, _, _ = self.prefill(ids[:-1], keep=n)
            logp = torch.log_softmax(logits[-n:].float(), dim=-1)
            target = torch.tensor(continuation_enc, device=logp.device)
            ll = float(logp.gather(1, target[:, None]).sum())
            greedy = bool((logp.argmax(-1) == target).all())
            results.append((ll, greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (ll, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("hf-block does not implement loglikelihood_rolling (perplexity tasks)")
