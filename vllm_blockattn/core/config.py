"""The plugin's per-engine settings: sink token and count, page size, pad id, cache namespace.

Read from the model's ``config.json`` ``block_attention`` entry, overridden by
``additional_config={"blockattn": {...}}`` (keys: ``sink_token_id`` or ``sink_token``, ``num_sinks``;
for the sink-free layout ``num_sinks: 0`` with ``boundary_token_id`` or ``boundary_token``;
``pad_token_id``, ``segment``: the API server's segmenter, see :mod:`vllm_blockattn.frontend.server`;
``pin_fraction``: the share of KV pages that pinned documents may hold, default 0.5, and
``pin_tenant_fraction``: the share of those that one tenant (``cache_salt``) may hold, default 1, see
:mod:`vllm_blockattn.engine.pins`; ``dp_routing``: ``"blocks"`` (default) or ``"off"``, see
:mod:`vllm_blockattn.frontend.routing`).
An untrained model has no sink token: name an existing token as the marker (the "training-free"
baseline), e.g. ``additional_config={"blockattn": {"sink_token": "<|im_start|>"}}``.

A sink-free layout's boundary token must be a *special* token of the tokenizer: one boundary turns a
prompt into a block prompt, so a token that ordinary text can produce would make plain prompts block
prompts by accident. Such a setting is refused at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layout import CONFIG_KEY, BlockLayout, BlockLayoutError, BlockSettings, parse_block_prompt
from .paged import padded_length

_LAYOUT_KEYS = ("sink_token_id", "num_sinks", "boundary_token_id")
_OVERRIDE_KEYS = {*_LAYOUT_KEYS, "sink_token", "boundary_token", "pad_token_id", "segment", "pin_fraction",
                  "pin_tenant_fraction", "dp_routing"}
DP_ROUTING = ("blocks", "off")
DEFAULT_PIN_FRACTION = 0.5


@dataclass(frozen=True)
class BlockEngineConfig:
    settings: BlockSettings
    page_size: int
    pad_id: int
    max_model_len: int
    namespace: tuple  # goes into every block-mode page hash
    pin_fraction: float = DEFAULT_PIN_FRACTION  # share of the KV pages pinned documents may hold
    pin_tenant_fraction: float = 1.0  # share of those pinnable pages one tenant (cache_salt) may hold
    dp_routing: str = "blocks"  # data parallelism: send block requests where their blocks are

    def parse(self, token_ids) -> BlockLayout:
        return parse_block_prompt(token_ids, self.settings)

    def check_prompt(self, token_ids) -> BlockLayout:
        """Parse and check that the padded prompt fits the model; raises BlockLayoutError (a ValueError)."""
        layout = self.parse(token_ids)
        if layout.is_block_prompt:
            n = padded_length(layout, self.page_size)
            if n >= self.max_model_len:
                raise BlockLayoutError(
                    f"the block prompt takes {n} tokens once its {len(layout.context_blocks)} context blocks "
                    f"are padded to KV pages of {self.page_size}, which leaves no room to generate within "
                    f"max_model_len={self.max_model_len}"
                )
        return layout


def _settings_from(vllm_config) -> tuple[BlockSettings, dict]:
    model_config = vllm_config.model_config
    entry = getattr(model_config.hf_config, CONFIG_KEY, None) or {}
    if not isinstance(entry, dict):
        entry = dict(entry)
    override = dict((vllm_config.additional_config or {}).get("blockattn", {}) or {})
    unknown = set(override) - _OVERRIDE_KEYS
    if unknown:
        raise ValueError(f"unknown additional_config['blockattn'] keys {sorted(unknown)}; "
                         f"expected some of {sorted(_OVERRIDE_KEYS)}")
    merged = {k: v for k, v in entry.items() if k in _LAYOUT_KEYS}
    loaded = []  # the tokenizer, loaded at most once and only when a setting needs it

    def tokenizer():
        if not loaded:
            from transformers import AutoTokenizer

            loaded.append(AutoTokenizer.from_pretrained(model_config.tokenizer,
                                                        trust_remote_code=model_config.trust_remote_code))
        return loaded[0]

    if "sink_token" in override:
        merged["sink_token_id"] = BlockSettings.from_tokenizer(tokenizer(), override["sink_token"]).sink_token_id
    if "boundary_token" in override:
        merged["boundary_token_id"] = BlockSettings.from_tokenizer(
            tokenizer(), num_sinks=0, boundary_token=override["boundary_token"]).boundary_token_id
    merged.update({k: override[k] for k in _LAYOUT_KEYS if k in override})
    # An override may switch layouts: keep only the marker of the layout that results.
    merged.pop("sink_token_id" if merged.get("num_sinks") == 0 else "boundary_token_id", None)
    if "sink_token_id" not in merged and merged.get("num_sinks") != 0:
        raise ValueError(
            f"the blockattn backend needs a sink token: the model's config.json has no '{CONFIG_KEY}' entry; "
            "pass additional_config={'blockattn': {'sink_token': '<an existing token>'}} for an untrained model, "
            "or {'num_sinks': 0, 'boundary_token': '<a special token>'} for a checkpoint trained without sinks"
        )
    settings = BlockSettings.from_dict(merged)
    if settings.sink_free:
        check_boundary_token(tokenizer(), settings.boundary_token_id)
    return settings, override


def check_boundary_token(tokenizer, token_id: int) -> None:
    """Refuse a sink-free boundary token that ordinary text can produce: it must be a special token of
    ``tokenizer`` (then only text that spells the token itself yields it, and the server refuses it in
    documents, segmented text and chat messages as it refuses stray sinks)."""
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    special |= {int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    if token_id not in special:
        name = tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < len(tokenizer) else None
        raise ValueError(
            f"boundary_token_id {token_id} ({name!r}) is not a special token of the tokenizer: ordinary text can "
            "produce it, and every prompt that holds it would become a block prompt; add a dedicated special "
            "token (vllm_blockattn.distill.add_boundary_token) and name it in config.json's "
            f"'{CONFIG_KEY}' entry"
        )


_CACHE: dict[int, tuple[object, BlockEngineConfig]] = {}


def _build(vllm_config) -> BlockEngineConfig:
    settings, override = _settings_from(vllm_config)
    hf = vllm_config.model_config.hf_config
    pad = override.get("pad_token_id", getattr(hf, "pad_token_id", None))
    if pad is None:
        eos = getattr(hf, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    if pad == settings.marker_id:
        pad = 0 if settings.marker_id != 0 else 1
    model_config = vllm_config.model_config
    namespace = ("blockattn", str(model_config.model), settings.marker_id, settings.num_sinks)
    if "segment" in override:  # the API server's segmenter settings; checked at start-up
        from .request_options import ServerSegmentConfig

        ServerSegmentConfig.from_additional_config(vllm_config.additional_config)
    pin_fraction = override.get("pin_fraction", DEFAULT_PIN_FRACTION)
    if isinstance(pin_fraction, bool) or not isinstance(pin_fraction, int | float) or not 0 <= pin_fraction <= 1:
        raise ValueError(f"additional_config['blockattn']['pin_fraction'] must be a number in [0, 1], "
                         f"got {pin_fraction!r}")
    pin_tenant_fraction = override.get("pin_tenant_fraction", 1.0)
    if isinstance(pin_tenant_fraction, bool) or not isinstance(pin_tenant_fraction, int | float) \
            or not 0 < pin_tenant_fraction <= 1:
        raise ValueError(f"additional_config['blockattn']['pin_tenant_fraction'] must be a number in (0, 1], "
                         f"got {pin_tenant_fraction!r}")
    dp_routing = override.get("dp_routing", "blocks")
    if dp_routing not in DP_ROUTING:
        raise ValueError(f"additional_config['blockattn']['dp_routing'] must be one of {DP_ROUTING}, "
                         f"got {dp_routing!r}")
    return BlockEngineConfig(settings, vllm_config.cache_config.block_size, int(pad), model_config.max_model_len,
                             namespace, float(pin_fraction), float(pin_tenant_fraction), dp_routing)


def get_block_config(vllm_config) -> BlockEngineConfig:
    """Settings of the engine ``vllm_config`` describes (cached per config object)."""
    hit = _CACHE.get(id(vllm_config))
    if hit is None or hit[0] is not vllm_config:
        hit = _CACHE[id(vllm_config)] = (vllm_config, _build(vllm_config))
    return hit[1]
