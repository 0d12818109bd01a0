"""The ablation study's task and measurements (``train/ablation_study.py``): a synthetic fact-lookup set built
so that untrained block attention loses accuracy, and per-question answer metrics under block attention, full
attention and full attention over the sink-bearing sequence.

The task (:func:`make_profile_records`): every context block states one fact ``"<attribute> <value> ."``, the
attribute (the key the question matches) at the block's **first token**: the token a block encoded alone
attends to first, where a full-attention model that parks attention on the BOS finds no BOS. The attributes of
one sample are distinct, so the attribute identifies the fact. The question names two attributes, and the
answer is **templated and multi-token**, ``"<attr> <value> , <attr> <value> ."`` plus the end-of-turn token:
the attribute words and the template are copied from the question (easy under any attention), only the two
values need the context, so token weighting has tokens to choose between. With probability ``updates`` a
later block restates the first asked fact with a new value and the latest statement wins: the answer then
combines facts from different blocks, and telling the two statements apart needs their order across blocks,
which a block encoded alone cannot see.

Answer metrics (:func:`answer_metrics`) are computed with teacher forcing: a question's answer is an exact
match when every answer token (end-of-turn included) is the greedy prediction, which is exactly when greedy
decoding reproduces the whole answer.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import torch

from ..core.layout import BlockSettings, parse_block_prompt
from ..core.reference import block_attention_mask, full_attention_mask
from .data import ATTRIBUTES, NAMES, BlockDataCollator, layout_from_lengths, word_level_tokenizer
from .masks import pad_attention_masks

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
# BOS, the user turn's content, then the answer and an end-of-turn token. The BOS is the first token of every
# full-attention sequence: the position a language model learns to park attention on.
CHAT_TEMPLATE = (
    "<|endoftext|>{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% else %}{{ ' ' + m['content'] + ' <|im_end|>' }}{% endif %}{% endfor %}"
)


def vocabulary() -> list[str]:
    """Every word of the task (specials first)."""
    values = [v for vs in ATTRIBUTES.values() for v in vs]
    return SPECIALS + list(NAMES) + list(ATTRIBUTES) + values + ["is", ",", ".", "?"]


def build_tokenizer():
    """A word-level tokenizer over :func:`vocabulary` with :data:`CHAT_TEMPLATE` (no sink token yet)."""
    return word_level_tokenizer(vocabulary(), CHAT_TEMPLATE)


def make_profile_records(n: int, *, num_docs: int = 6, updates: float = 0.5, seed: int = 0) -> list[dict]:
    """``n`` records ``{"context", "question", "answer", "updated"}`` of the fact-lookup task (module docstring).

    Args:
        num_docs: context blocks per record, one fact each (at most the number of attributes, 8); an update
            takes the place of a later fact.
        updates: probability that a later block restates the first asked fact with a new value.
    """
    if n < 1 or not 2 <= num_docs <= len(ATTRIBUTES):
        raise ValueError(f"n must be >= 1 and num_docs in [2, {len(ATTRIBUTES)}], got {n} and {num_docs}")
    if not 0.0 <= updates <= 1.0:
        raise ValueError(f"updates must be in [0, 1], got {updates}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        attrs = rng.sample(list(ATTRIBUTES), k=num_docs)
        facts = [(a, rng.choice(ATTRIBUTES[a])) for a in attrs]
        first, second = rng.sample(range(num_docs - 1), k=2)  # not the last block: an update may follow
        updated = rng.random() < updates
        asked = [facts[first], facts[second]]
        if updated:
            later = rng.choice([j for j in range(first + 1, num_docs) if j != second])
            attr, old = facts[first]
            asked[0] = (attr, rng.choice([v for v in ATTRIBUTES[attr] if v != old]))
            facts[later] = asked[0]
        docs = [f"{a} {v} . " for a, v in facts]
        question = f"{asked[0][0]} {asked[1][0]} ?"
        answer = f"{asked[0][0]} {asked[0][1]} , {asked[1][0]} {asked[1][1]} ."
        out.append({"context": docs, "question": question, "answer": answer, "updated": updated})
    return out


# --- measurements -------------------------------------------------------------------------------------

VIEWS = ("block", "full", "full_sinks")


def _layouts(batch: dict, settings: BlockSettings):
    if "block_lengths" in batch:  # samples without sinks carry their block boundaries
        return [layout_from_lengths(x) for x in batch["block_lengths"].tolist()]
    return [parse_block_prompt(batch["input_ids"][i, :n].tolist(), settings)
            for i, n in enumerate(batch["lengths"].tolist())]


def view_inputs(batch: dict, settings: BlockSettings, view: str, dtype=torch.float32):
    """``(model kwargs, input ids, labels)`` of a collated batch under one attention view.

    ``block``: the block sequence under the block mask at the layout's positions (what block inference
    computes); ``full``: the sink-free sequence under causal attention; ``full_sinks``: the block sequence,
    sink groups included, under plain causal attention.
    """
    if view == "block":
        ids, labels = batch["input_ids"], batch["labels"]
        lays = _layouts(batch, settings)
        mask = pad_attention_masks([block_attention_mask(x, dtype) for x in lays], ids.shape[1])
        pos = torch.zeros_like(ids)
        for i, x in enumerate(lays):
            pos[i, : x.num_tokens] = torch.tensor(x.positions())
    elif view in ("full", "full_sinks"):
        if view == "full":
            ids, labels = batch["full_input_ids"], batch["full_labels"]
            lengths = (batch["content_index"].max(1).values + 1).tolist()
        else:
            ids, labels, lengths = batch["input_ids"], batch["labels"], batch["lengths"].tolist()
        mask = pad_attention_masks([full_attention_mask(n, dtype) for n in lengths], ids.shape[1])
        pos = torch.arange(ids.shape[1]).expand_as(ids)
    else:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos), ids, labels


def _answer_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the positions predicting the response tokens, sample by sample in token order
    (every sample's response is at the end of its sequence, so the k-th rows of two views align)."""
    b, t = (labels != -100).nonzero(as_tuple=True)
    return b, t - 1


@torch.no_grad()
def answer_logprobs(model, samples: list[dict], collator: BlockDataCollator, settings: BlockSettings, view: str,
                    batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample: ``(log-probabilities [n_answer, V] at the positions predicting the answer tokens, the answer
    tokens [n_answer])`` under ``view`` (see :func:`view_inputs`)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(samples), batch_size):
            batch = collator(samples[i:i + batch_size])
            kwargs, ids, labels = view_inputs(batch, settings, view, model.dtype)
            logp = torch.log_softmax(model(**kwargs).logits.float(), -1)
            b, p = _answer_rows(labels)
            rows, gold = logp[b, p], ids[b, p + 1]
            counts = torch.bincount(b, minlength=ids.shape[0]).tolist()
            out.extend(zip(rows.split(counts), gold.split(counts)))
    finally:
        model.train(was_training)
    return out


def answer_metrics(model, samples, collator, settings, view: str, teacher: list[torch.Tensor] | None = None,
                   batch_size: int = 64) -> dict[str, list[float]]:
    """Per-question metrics under ``view``: ``em`` (1.0 when every answer token is the greedy prediction),
    ``nll`` (mean answer-token NLL, nats) and, given ``teacher`` (per sample the teacher's full-attention
    log-probabilities at the answer positions, from :func:`answer_logprobs`), ``kl``: the mean over answer
    positions of KL(teacher || model)."""
    res = answer_logprobs(model, samples, collator, settings, view, batch_size)
    em, nll, kl = [], [], []
    for i, (logp, gold) in enumerate(res):
        em.append(float((logp.argmax(-1) == gold).all()))
        nll.append(-logp.gather(1, gold[:, None]).mean().item())
        if teacher is not None:
            t = teacher[i]
            # a student may have more vocabulary rows than its teacher (a token added for training, e.g. the
            # sink-free layout's boundary); the teacher puts no mass there, so the KL runs over its rows
            if t.shape[0] != logp.shape[0] or t.shape[1] > logp.shape[1]:
                raise ValueError(f"sample {i}: teacher answer rows {tuple(t.shape)} do not fit the model's "
                                 f"{tuple(logp.shape)}")
            kl.append((t.exp() * (t - logp[:, : t.shape[1]])).sum(-1).mean().item())
    out = {"em": em, "nll": nll}
    if teacher is not None:
        out["kl"] = kl
    return out


@torch.no_grad()
def first_token_attention(model, samples, collator, batch_size: int = 64, skip: int = 4) -> torch.Tensor:
    """Mean attention mass on position 0 (the BOS) per layer and head, ``[layers, heads]``, under full
    attention on the sink-free sequences, over the query positions ``>= skip`` of every real token (early
    positions attend to the BOS for lack of anything else). Runs an eager-attention copy of ``model``."""
    import copy

    m = copy.deepcopy(model).eval()
    m.set_attn_implementation("eager")
    caught: list[torch.Tensor] = []
    hooks = [layer.self_attn.register_forward_hook(lambda _m, _a, out: caught.append(out[1]))
             for layer in m.model.layers]
    total, count = None, 0
    try:
        for i in range(0, len(samples), batch_size):
            batch = collator(samples[i:i + batch_size])
            kwargs, ids, _ = view_inputs(batch, None, "full", m.dtype)
            caught.clear()
            m(**kwargs)
            n = batch["content_index"].max(1).values + 1
            q = torch.arange(ids.shape[1])
            valid = (q[None] >= skip) & (q[None] < n[:, None])  # [B, L]
            mass = torch.stack([w[:, :, :, 0] for w in caught])  # [layers, B, heads, L]
            s = (mass * valid[None, :, None]).sum((1, 3))
            total = s if total is None else total + s
            count += valid.sum().item()
    finally:
        for h in hooks:
            h.remove()
    return total / max(1, count)


# --- prose for a teacher with attention-sink habits (``--teacher-recipe prose-lm``) ----------------------

_PROSE_WORD = re.compile(r"[a-z]+|[^\sa-z]")


def prose_words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks of ``text`` (the word-level tokenizer's units)."""
    return _PROSE_WORD.findall(text.lower())


def prose_vocabulary(words: list[str], size: int) -> list[str]:
    """:func:`vocabulary` followed by the ``size`` most frequent words of ``words`` that it lacks (ties by first
    occurrence, so the list is deterministic)."""
    base = vocabulary()
    have = set(base)
    counts = Counter(w for w in words if w not in have)
    return base + [w for w, _ in counts.most_common(size)]


def build_prose_tokenizer(words: list[str], size: int):
    """The task's tokenizer over :func:`prose_vocabulary` (prose words outside it map to ``[UNK]``)."""
    return word_level_tokenizer(prose_vocabulary(words, size), CHAT_TEMPLATE)


def synthetic_prose(n_words: int = 20_000, seed: int = 0) -> str:
    """A small stand-in for real prose (random sentences over a fixed word list with Zipf-like frequencies),
    for tests and smoke runs where the novels are not on the machine. It is not English and forms no
    language-model habits worth measuring."""
    rng = random.Random(seed)
    lex = ("the a of and to in was she he it her his that had not be with as for but at by so very could would "
           "mr mrs miss lady sir house room day time letter sister mother friend heart mind manner family").split()
    weights = [1.0 / (i + 1) for i in range(len(lex))]
    out, count = [], 0
    while count < n_words:
        k = rng.randint(4, 14)
        out.append(" ".join(rng.choices(lex, weights, k=k)) + rng.choice([" .", " ,", " ;", " !", " ?"]))
        count += k + 1
    return " ".join(out)


@torch.no_grad()
def first_token_attention_ids(model, ids: torch.Tensor, batch_size: int = 16, skip: int = 4) -> torch.Tensor:
    """:func:`first_token_attention` on unpadded sequences ``ids [N, L]`` (e.g. prose windows after a BOS) under
    plain causal attention: the mean attention mass on position 0 per layer and head, ``[layers, heads]``, over
    the query positions ``>= skip``."""
    import copy

    m = copy.deepcopy(model).eval()
    m.set_attn_implementation("eager")
    caught: list[torch.Tensor] = []
    hooks = [layer.self_attn.register_forward_hook(lambda _m, _a, out: caught.append(out[1]))
             for layer in m.model.layers]
    total = None
    try:
        for i in range(0, len(ids), batch_size):
            caught.clear()
            m(input_ids=ids[i:i + batch_size])
            s = torch.stack([w[:, :, skip:, 0].sum((0, 2)) for w in caught])  # [layers, heads]
            total = s if total is None else total + s
    finally:
        for h in hooks:
            h.remove()
    return total / (len(ids) * (ids.shape[1] - skip))
