"""Training and evaluation of the cut head (and optionally the backbone) on SemanticSeg jsonl.

Runs under ``accelerate launch`` (several GPUs or processes) and as plain Python. Two modes:

- ``freeze_backbone=True``: the backbone's read-out features are computed once (no gradient) and only
  the head trains, in mini-batches of candidates. Minutes on a CPU.
- ``freeze_backbone=False``: backbone and head train together, one text per step with gradient
  accumulation; the model is wrapped by ``Accelerator.prepare`` (DDP on several GPUs).

Class imbalance (few cuts among many candidates) is handled by class-weighted cross-entropy with
weights inversely proportional to the class frequencies; the learning rate follows a cosine schedule
with linear warm-up.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from torch.nn import functional as F

from .data import read_records
from .metrics import evaluate
from .layout_features import layout_features
from .model import DEFAULT_BACKBONE, Segmenter


@dataclass
class SegmenterTrainConfig:
    """Settings of a segmenter training run.

    Args:
        train_file: SemanticSeg jsonl for training.
        eval_file: SemanticSeg jsonl for evaluation (optional).
        output_dir: where the checkpoint and ``eval_results.json`` go.
        backbone: Hugging Face model path (causal or encoder) or ``pkg:`` reference.
    """

    train_file: str = field(default="", metadata={"help": "SemanticSeg jsonl for training"})
    eval_file: str | None = field(default=None, metadata={"help": "SemanticSeg jsonl for evaluation"})
    output_dir: str = field(default="segmenter-out", metadata={"help": "checkpoint directory"})
    backbone: str = field(default=DEFAULT_BACKBONE, metadata={"help": "backbone path or pkg:<module>/<dir>"})
    freeze_backbone: bool = field(default=True, metadata={"help": "train the head only on cached features"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the training data"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate of the head"})
    backbone_learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate of the backbone"})
    batch_size: int = field(default=128, metadata={"help": "candidates per step (frozen backbone)"})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "texts per step (trained backbone)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of steps for linear warm-up"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    class_weighting: bool = field(default=True, metadata={"help": "inverse-frequency class weights in the CE"})
    threshold: float = field(default=0.5, metadata={"help": "cut threshold used for evaluation"})
    tune_threshold: bool = field(default=False, metadata={
        "help": "pick the threshold with the best F1 on the eval file and save it as the model's default"})
    tolerance: int = field(default=3, metadata={"help": "boundary match tolerance in chars"})
    window: int = field(default=512, metadata={"help": "tokens per backbone window"})
    overlap: int = field(default=128, metadata={"help": "tokens shared by consecutive windows"})
    head_hidden: int = field(default=256, metadata={"help": "cut head hidden width"})
    pattern: str = field(default=r"\n+", metadata={"help": "candidate regex (match ends are candidates)"})
    marker: str = field(default="auto", metadata={
        "help": "token read for each candidate: 'auto' (sep for encoders), 'none' (last token of the piece), or a token"})
    layout: bool = field(default=False, metadata={
        "help": "append layout features (newlines, indentation, headings, speakers) to the head's input"})
    max_seconds: float | None = field(default=None, metadata={
        "help": "stop optimising after this many seconds (the frozen-backbone feature pass is not counted)"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.learning_rate <= 0 or self.backbone_learning_rate <= 0:
            raise ValueError("learning rates must be positive")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights ``[w0, w1]`` normalised so a balanced set gets ``[1, 1]``."""
    n = labels.numel()
    counts = torch.bincount(labels.long(), minlength=2).float().clamp(min=1)
    return n / (2 * counts)


def cut_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Class-weighted cross-entropy. logits ``[N, 2]``, labels ``[N]`` in {0, 1}."""
    return F.cross_entropy(logits.float(), labels.long(), weight=weight)


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up then cosine decay to zero."""
    warm = int(total_steps * warmup_ratio)

    def factor(step):
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def record_probs(seg: Segmenter, rec: dict) -> list[float]:
    """Cut probabilities of a record's own candidates."""
    if not rec["candidates"]:
        return []
    seg.eval()
    enc = seg.encode(rec["text"], rec["candidates"])
    dev = next(seg.head.parameters()).device
    layout = layout_features(rec["text"], rec["candidates"]) if seg.config.layout else None
    logits = seg(enc.input_ids.to(dev), enc.attention_mask.to(dev), enc.readout_window.to(dev), enc.readout_pos.to(dev),
                 layout)
    return torch.softmax(logits.float(), -1)[:, 1].cpu().tolist()


@torch.no_grad()
def record_features(seg: Segmenter, rec: dict) -> torch.Tensor:
    """The frozen backbone's read-out states for a record's candidates, ``[n, hidden]`` (no layout)."""
    seg.eval()
    enc = seg.encode(rec["text"], rec["candidates"])
    dev = next(seg.head.parameters()).device
    return seg.features(*(t.to(dev) for t in (enc.input_ids, enc.attention_mask, enc.readout_window,
                                              enc.readout_pos))).cpu()


def fit_head(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: float = 3.0, batch_size: int = 128,
             learning_rate: float = 1e-3, weight_decay: float = 0.01, warmup_ratio: float = 0.05,
             class_weighting: bool = True, seed: int = 0, max_seconds: float | None = None,
             progress: bool = False) -> list[float]:
    """Train a cut head on cached inputs ``x [N, d]`` and labels ``y [N]`` on one CPU thread (no
    accelerate); returns the loss history. The same loop as the frozen-backbone training."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    weight = class_weights(y) if class_weighting else None
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                                     generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    total = max(1, math.ceil(len(dl) * epochs))
    sched = cosine_schedule(opt, total, warmup_ratio)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start, history, step = time.monotonic(), [], 0
    head.train()
    try:
        with tqdm(total=total, desc="training head", disable=not progress) as bar:
            while step < total and not (max_seconds is not None and time.monotonic() - start > max_seconds):
                for xb, yb in dl:
                    loss = cut_loss(head(xb), yb, weight)
                    loss.backward()
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                    step += 1
                    history.append(loss.item())
                    bar.update(1)
                    if step >= total or (max_seconds is not None and time.monotonic() - start > max_seconds):
                        break
    finally:
        torch.set_num_threads(threads)
        head.eval()
    return history


def scores_at(records: list[dict], probs: list[list[float]], threshold: float, tol: int = 3) -> dict:
    """Metrics of ``records`` when every candidate whose probability reaches ``threshold`` is cut."""
    items = []
    for rec, ps in zip(records, probs):
        pred = [c for c, p in zip(rec["candidates"], ps) if p >= threshold]
        gold = [c for c, y in zip(rec["candidates"], rec["labels"]) if y]
        items.append((rec["category"], pred, gold, len(rec["text"])))
    return evaluate(items, tol=tol)


def best_threshold(records: list[dict], probs: list[list[float]], tol: int = 3) -> float:
    """The threshold in 0.05..0.95 (step 0.05) with the best overall boundary F1 (ties: the lowest)."""
    grid = [round(0.05 * i, 2) for i in range(1, 20)]
    return max(grid, key=lambda th: (scores_at(records, probs, th, tol)["all"]["f1"], -th))


def evaluate_segmenter(seg: Segmenter, records: list[dict], threshold: float = 0.5, tol: int = 3,
                       progress: bool = True) -> dict:
    """Boundary P/R/F1 and Pk/WindowDiff per category of thresholded predictions on ``records``."""
    from tqdm.auto import tqdm

    probs = [record_probs(seg, rec) for rec in tqdm(records, desc="evaluating", disable=not progress)]
    return scores_at(records, probs, threshold, tol)


def train_segmenter(cfg: SegmenterTrainConfig, *, progress: bool = True) -> tuple[Segmenter, dict]:
    """Train per ``cfg``; saves the checkpoint to ``cfg.output_dir`` and returns (segmenter, eval metrics)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm

    # backbones carry parts the read-out never uses (BERT's pooler, for one): DDP must not wait for them
    acc = Accelerator(gradient_accumulation_steps=1 if cfg.freeze_backbone else cfg.gradient_accumulation_steps,
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)
    show = progress and acc.is_local_main_process
    train = read_records(cfg.train_file)
    if not train:
        raise ValueError(f"{cfg.train_file} holds no records")
    seg = Segmenter.from_backbone(cfg.backbone, seed=cfg.seed, window=cfg.window, overlap=cfg.overlap,
                                  head_hidden=cfg.head_hidden, pattern=cfg.pattern, threshold=cfg.threshold,
                                  layout=cfg.layout, marker=None if cfg.marker.lower() == "none" else cfg.marker)
    seg.to(acc.device)
    all_labels = torch.tensor([y for r in train for y in r["labels"]])
    if all_labels.numel() == 0:
        raise ValueError(f"{cfg.train_file} has no candidates to learn from")
    weight = class_weights(all_labels).to(acc.device) if cfg.class_weighting else None
    start = time.monotonic()
    out_of_time = lambda: cfg.max_seconds is not None and time.monotonic() - start > cfg.max_seconds  # noqa: E731
    history = []

    if cfg.freeze_backbone:
        seg.backbone.requires_grad_(False)
        seg.eval()
        feats, labels = [], []
        with torch.no_grad():
            for rec in tqdm(train, desc="backbone features", disable=not show):
                if not rec["candidates"]:
                    continue
                enc = seg.encode(rec["text"], rec["candidates"])
                f = seg.features(*(t.to(acc.device) for t in (enc.input_ids, enc.attention_mask,
                                                               enc.readout_window, enc.readout_pos))).cpu()
                feats.append(seg.head_input(f, rec["text"], rec["candidates"]))
                labels.append(torch.tensor(rec["labels"]))
        ds = torch.utils.data.TensorDataset(torch.cat(feats), torch.cat(labels))
        start = time.monotonic()  # max_seconds bounds the optimisation, not the feature pass
        dl = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
        opt = torch.optim.AdamW(seg.head.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        total = max(1, math.ceil(len(dl) * cfg.epochs))
        sched = cosine_schedule(opt, total, cfg.warmup_ratio)
        head, opt, dl, sched = acc.prepare(seg.head, opt, dl, sched)
        head.train()
        if acc.device.type == "cpu":
            # tiny matmuls gain nothing from threads, and on a shared CPU spinning OpenMP threads made
            # each step ~20x slower (measured: 100 steps 43 s with 2 threads, 2 s with 1)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
        bar = tqdm(total=total, desc="training head", disable=not show)
        step = 0
        while step < total and not out_of_time():
            for x, y in dl:
                loss = cut_loss(head(x), y, weight)
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                step += 1
                history.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if step >= total or out_of_time():
                    break
        bar.close()
        if acc.device.type == "cpu":
            torch.set_num_threads(threads)
    else:
        params = [{"params": seg.head.parameters(), "lr": cfg.learning_rate},
                  {"params": seg.backbone.parameters(), "lr": cfg.backbone_learning_rate}]
        opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
        usable = [r for r in train if r["candidates"]]
        dl = torch.utils.data.DataLoader(usable, batch_size=1, shuffle=True, collate_fn=lambda b: b[0],
                                         generator=torch.Generator().manual_seed(cfg.seed))
        total = max(1, math.ceil(len(dl) * cfg.epochs / cfg.gradient_accumulation_steps))
        sched = cosine_schedule(opt, total, cfg.warmup_ratio)
        model, opt, dl, sched = acc.prepare(seg, opt, dl, sched)
        model.train()
        bar = tqdm(total=total, desc="training", disable=not show)
        step = 0
        while step < total and not out_of_time():
            for rec in dl:
                enc = seg.encode(rec["text"], rec["candidates"])
                layout = layout_features(rec["text"], rec["candidates"]).to(acc.device) if cfg.layout else None
                with acc.accumulate(model):
                    logits = model(*(t.to(acc.device) for t in (enc.input_ids, enc.attention_mask,
                                                                  enc.readout_window, enc.readout_pos)), layout)
                    loss = cut_loss(logits, torch.tensor(rec["labels"], device=acc.device), weight)
                    acc.backward(loss)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                history.append(loss.item())
                if acc.sync_gradients:
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if step >= total or out_of_time():
                    break
        bar.close()

    seg = acc.unwrap_model(seg)
    seg.eval()
    metrics = {}
    if acc.is_main_process:
        if cfg.eval_file:
            from tqdm.auto import tqdm

            records = read_records(cfg.eval_file)
            probs = [record_probs(seg, r) for r in tqdm(records, desc="evaluating", disable=not show)]
            if cfg.tune_threshold:
                seg.config.threshold = best_threshold(records, probs, cfg.tolerance)
            metrics = scores_at(records, probs, seg.config.threshold, cfg.tolerance)
        seg.save_pretrained(cfg.output_dir, copy_backbone=not cfg.freeze_backbone)
        summary = {"config": asdict(cfg), "threshold": seg.config.threshold, "train_loss_first": history[:1],
                   "train_loss_last": history[-1:], "steps": len(history),
                   "seconds": round(time.monotonic() - start, 1), "eval": metrics}
        with open(os.path.join(cfg.output_dir, "eval_results.json"), "w") as f:
            json.dump(summary, f, indent=2)
    acc.wait_for_everyone()
    return seg, metrics


def config_from_args(argv=None) -> SegmenterTrainConfig:
    """Command-line flags, one per :class:`SegmenterTrainConfig` field."""
    import argparse

    ap = argparse.ArgumentParser(description="Train the segmenter's cut head on SemanticSeg jsonl.")
    for f in fields(SegmenterTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default,
                            help=f.metadata.get("help"))
        else:
            conv = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            if f.name == "max_seconds":
                conv = float
            ap.add_argument(flag, type=conv, default=f.default, help=f.metadata.get("help"),
                            required=f.name == "train_file")
    return SegmenterTrainConfig(**vars(ap.parse_args(argv)))
