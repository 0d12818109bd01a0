"""Block-distillation data: jsonl loaders, segmentation hook, chat formatting, synthetic retrieval set, collator.

Every loader yields *records* ``{"context": [block text, ...], "question": str, "answer": str}``.
:class:`ChatBlockFormatter` turns a record into token ids with the model's chat template: the template's
head (e.g. ``<|im_start|>user\\n``) is a prefix block, every context block gets its sink group, and the
final block holds the question, the template's turn switch and the assistant response (the only tokens
with labels). :class:`BlockDataCollator` pads a batch and adds the sink-free (full-attention) copy.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence

import torch

from ..core.layout import Block, BlockLayout, BlockSettings, build_block_prompt, parse_block_prompt
from .masks import content_index

Segmenter = Callable[[str], list[str]]


# --- segmentation -------------------------------------------------------------------------------------

def split_paragraphs(text: str) -> list[str]:
    """Cut text at blank lines; every paragraph keeps a trailing blank line so blocks read as in the source."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text)]
    return [p + "\n\n" for p in paras if p]


def load_segmenter(spec: str | None) -> Segmenter:
    """``None``/``"paragraphs"``: :func:`split_paragraphs`; ``"learned"`` or ``"learned:<checkpoint>"``: the
    learned segmenter (:func:`vllm_blockattn.segmenter.segment_text`, packaged default model or the given
    checkpoint, its own threshold); ``"package.module:function"``: any callable ``text -> list[str]``."""
    if spec in (None, "", "paragraphs"):
        return split_paragraphs
    if spec == "learned" or spec.startswith("learned:"):
        from ..segmenter import segment_text

        model = spec.split(":", 1)[1] if ":" in spec else None
        return lambda text: [b for b in segment_text(text, model=model) if b.strip()]
    if ":" not in spec:
        raise ValueError(f"segmenter must be 'paragraphs' or 'package.module:function', got {spec!r}")
    module, name = spec.split(":", 1)
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"segmenter {spec!r}: {module} has no callable {name!r}")
    return fn


# --- jsonl loaders ------------------------------------------------------------------------------------

def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for every non-empty line; errors name the file and the line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _need_str(obj: dict, key: str, where: str) -> str:
    val = obj.get(key)
    if not isinstance(val, str) or not val.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {val!r}")
    return val


def _hotpot_context(ctx, segment: Segmenter, where: str) -> list[str]:
    if isinstance(ctx, str):
        return segment(ctx)
    if isinstance(ctx, dict) and "title" in ctx and "sentences" in ctx:  # HF datasets' hotpot_qa layout
        ctx = list(zip(ctx["title"], ctx["sentences"]))
    if not isinstance(ctx, list) or not ctx:
        raise ValueError(f"{where}: 'context' must be text, a list of paragraphs or a list of [title, sentences]")
    blocks = []
    for i, item in enumerate(ctx):
        if isinstance(item, str):
            blocks.append(item.strip() + "\n\n")
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], list):
            blocks.append(f"{item[0]}: {''.join(item[1]).strip()}\n\n")
        else:
            raise ValueError(f"{where}: context item {i} must be a paragraph string or [title, [sentences]]")
    return blocks


def load_hotpotqa(path: str | os.PathLike, segment: Segmenter = split_paragraphs) -> list[dict]:
    """HotpotQA-style jsonl: ``question``, ``answer`` and ``context`` (the official ``[[title, [sentences]],
    ...]``, the HF ``{"title": [...], "sentences": [...]}``, a list of paragraphs, or one text that
    ``segment`` cuts). ``supporting_paragraphs`` is accepted in place of ``context``."""
    out = []
    for lineno, obj in read_jsonl(path):
        where = f"{os.fspath(path)}:{lineno}"
        ctx = obj.get("context", obj.get("supporting_paragraphs"))
        if ctx is None:
            raise ValueError(f"{where}: missing 'context' (or 'supporting_paragraphs')")
        out.append({"context": _hotpot_context(ctx, segment, where), "question": _need_str(obj, "question", where),
                    "answer": _need_str(obj, "answer", where)})
    return out


def chatqa2_record(obj: dict, where: str, segment: Segmenter = split_paragraphs) -> dict:
    """One ChatQA2-style object -> a record (see :func:`load_chatqa2`); errors start with ``where``."""
    doc = obj.get("document", obj.get("context"))
    if not isinstance(doc, str) or not doc.strip():
        raise ValueError(f"{where}: 'document' (or 'context') must be a non-empty string")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("user", "assistant")
            for m in msgs):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role: user|assistant, content}}")
    if msgs[-1]["role"] == "assistant":
        answer, msgs = msgs[-1]["content"], msgs[:-1]
    elif isinstance(obj.get("answers"), list) and obj["answers"] and isinstance(obj["answers"][0], str):
        answer = obj["answers"][0]
    else:
        raise ValueError(f"{where}: no response: end 'messages' with an assistant turn or give 'answers'")
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError(f"{where}: the turn before the response must be a user turn")
    history = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs[:-1])
    blocks = segment(doc)
    if not blocks:
        raise ValueError(f"{where}: the segmenter returned no blocks for the document")
    return {"context": blocks, "question": history + msgs[-1]["content"], "answer": answer}


def load_chatqa2(path: str | os.PathLike, segment: Segmenter = split_paragraphs) -> list[dict]:
    """ChatQA2-style jsonl: ``messages`` (user/assistant turns, the last assistant turn is the response, or
    ``answers[0]`` when the turns end with the user) and a long ``document`` (or ``context``) that
    ``segment`` cuts into blocks. Earlier turns go into the final block before the last question."""
    return [chatqa2_record(obj, f"{os.fspath(path)}:{lineno}", segment) for lineno, obj in read_jsonl(path)]


def load_records(path: str | os.PathLike, fmt: str = "auto", segment: Segmenter = split_paragraphs) -> list[dict]:
    """Load ``fmt`` (``"hotpotqa"``, ``"chatqa2"`` or ``"auto"``: chatqa2 when the first record has
    ``messages``) records from a jsonl file."""
    if fmt == "auto":
        first = next(read_jsonl(path), (0, {}))[1]
        fmt = "chatqa2" if "messages" in first else "hotpotqa"
    if fmt == "hotpotqa":
        return load_hotpotqa(path, segment)
    if fmt == "chatqa2":
        return load_chatqa2(path, segment)
    raise ValueError(f"dataset format must be 'hotpotqa', 'chatqa2' or 'auto', got {fmt!r}")


# --- synthetic multi-document retrieval ---------------------------------------------------------------

NAMES = ("alice bob carol dave erin frank grace heidi ivan judy kate liam mia noah olga paul quinn rosa sam tina "
         "uma victor wendy xavier yara zack").split()
ATTRIBUTES = {
    "city": "paris london rome tokyo cairo lima oslo delhi".split(),
    "pet": "cat dog fish bird horse snake rabbit turtle".split(),
    "color": "red blue green yellow black white purple orange".split(),
    "food": "rice bread pasta soup salad cake apple cheese".split(),
    "job": "nurse pilot baker chef farmer lawyer painter teacher".split(),
    "sport": "tennis golf chess rugby boxing hockey skiing surfing".split(),
    "drink": "tea coffee milk juice water cocoa cider lemonade".split(),
    "car": "fiat volvo honda tesla ford audi mini jeep".split(),
}


def retrieval_vocabulary() -> list[str]:
    """Every word the synthetic set uses (for a word-level tokenizer)."""
    words = list(NAMES) + list(ATTRIBUTES) + [v for vs in ATTRIBUTES.values() for v in vs]
    return words + ["doc", "lives", "has", ".", "?", "what", "is", "the", "of"]


def word_level_tokenizer(words: Sequence[str], chat_template: str):
    """A fast word-level tokenizer over ``words`` (whitespace-split; the first four must be
    ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``[UNK]``) with ``chat_template``: the synthetic
    sets' tokenizer, built offline in milliseconds (no sink token yet)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                 unk_token="[UNK]", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = chat_template
    return hf


def make_retrieval_records(n: int, *, num_docs: int = 4, facts_per_doc: int = 3, seed: int = 0,
                           question_style: str = "words", distinct_names: bool = False,
                           attributes: Sequence[str] | None = None, num_questions: int = 1,
                           distinct_attributes: bool = False, updates: float = 0.0) -> list[dict]:
    """A synthetic multi-document retrieval set: facts ``"<name> <attribute> <value> ."`` scattered over
    ``num_docs`` documents (one context block each); the question asks for one of them, answer one word.

    Names and attributes repeat across facts, so the answer needs the (name, attribute) pair, not one word.
    ``question_style``: ``"words"`` (``what is the pet of alice ?``) or ``"prefix"`` (``alice pet``, the
    fact's own prefix: the easiest form for a tiny model to learn).
    ``distinct_names``: every fact of a sample is about a different person (the name alone then
    identifies the fact).
    ``attributes``: the attributes used (default all of :data:`ATTRIBUTES`); a single one leaves no
    shortcut through the answer's type.
    ``distinct_attributes``: every fact of a sample has a different attribute (the asked attribute alone
    then identifies the fact: retrieval by the answer's type).
    ``num_questions`` > 1: the answer goes on with more (question, answer) pairs about other facts,
    ``"<value> . <question 2> <value 2> ..."`` (denser supervision for a tiny model; the first answer
    word is still the answer to ``question``).
    ``updates``: probability that the asked fact is stated twice, the first time in an earlier document
    and again, with another value, in a later one (which loses its own fact); the answer is the *later*
    value (the latest statement wins). Telling the two apart needs their order across documents.
    Needs ``num_docs >= 2`` and ``num_questions == 1``.
    """
    if n < 1 or num_docs < 1 or facts_per_doc < 1:
        raise ValueError(f"n, num_docs and facts_per_doc must be >= 1, got {n}, {num_docs}, {facts_per_doc}")
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    if not 0.0 <= updates <= 1.0:
        raise ValueError(f"updates must be in [0, 1], got {updates}")
    if updates > 0 and (num_docs < 2 or num_questions != 1):
        raise ValueError(f"updates needs num_docs >= 2 and num_questions == 1, got {num_docs} and {num_questions}")
    if question_style not in ("words", "prefix"):
        raise ValueError(f"question_style must be 'words' or 'prefix', got {question_style!r}")
    rng = random.Random(seed)
    attrs = list(ATTRIBUTES) if attributes is None else list(attributes)
    unknown = set(attrs) - set(ATTRIBUTES)
    if not attrs or unknown:
        raise ValueError(f"attributes must be a non-empty subset of {sorted(ATTRIBUTES)}, got {attributes!r}")
    out = []
    for _ in range(n):
        n_facts = num_docs * facts_per_doc
        if distinct_names and n_facts > len(NAMES):
            raise ValueError(f"distinct_names allows at most {len(NAMES)} facts per sample, got {n_facts}")
        if distinct_attributes and n_facts > len(attrs):
            raise ValueError(f"distinct_attributes allows at most {len(attrs)} facts per sample, got {n_facts}")
        fact_attrs = rng.sample(attrs, k=n_facts) if distinct_attributes else None
        names = rng.sample(NAMES, k=n_facts if distinct_names else min(len(NAMES), max(2, n_facts // 2)))
        seen, facts = set(), []
        while len(facts) < n_facts:
            name = names[len(facts)] if distinct_names else rng.choice(names)
            attr = fact_attrs[len(facts)] if distinct_attributes else rng.choice(attrs)
            if (name, attr) not in seen:
                seen.add((name, attr))
                facts.append((name, attr, rng.choice(ATTRIBUTES[attr])))
        asked = rng.sample(facts, k=min(num_questions, len(facts)))
        if updates > 0 and rng.random() < updates:
            first, later = sorted(rng.sample(range(num_docs), k=2))
            i, j = first * facts_per_doc, later * facts_per_doc
            k = facts.index(asked[0])
            facts[i], facts[k] = facts[k], facts[i]
            name, attr, old = asked[0]
            asked[0] = (name, attr, rng.choice([v for v in ATTRIBUTES[attr] if v != old]))
            facts[j] = asked[0]
        # "prefix" facts put the identifying word right before the value: "<attribute> <name> <value> ."
        # with distinct names, "<name> <attribute> <value> ." otherwise (easiest for a tiny model).
        name_last = question_style == "prefix" and distinct_names and not distinct_attributes
        order = (lambda a, b: f"{b} {a}") if name_last else (lambda a, b: f"{a} {b}")
        docs = [" ".join(f"{order(a, b)} {c} ." for a, b, c in facts[d * facts_per_doc:(d + 1) * facts_per_doc])
                + " " for d in range(num_docs)]
        qs = [f"what is the {a} of {n} ?" if question_style == "words" else order(n, a) for n, a, _ in asked]
        answer = " . ".join([asked[0][2]] + [f"{q} {v}" for q, (_, _, v) in zip(qs[1:], asked[1:])])
        out.append({"context": docs, "question": qs[0], "answer": answer})
    return out


# --- formatting ---------------------------------------------------------------------------------------

_SENTINEL = "\u2063BLOCKATTN_SENTINEL\u2063"


class ChatBlockFormatter:
    """Record -> ``{"input_ids", "labels"}`` under the model's chat template and the block layout.

    The user turn holds the context blocks then the question; the final block is the question, the
    template's end-of-user/start-of-assistant text and the response (the only labelled tokens).
    Records longer than ``max_length`` lose trailing context blocks; one whose final block alone is too
    long is skipped (``__call__`` returns None).

    ``enable_thinking`` (default False) goes to a chat template that reads it (Qwen3's): with False the
    template closes an empty ``<think></think>`` block in the generation prompt, so the response (the
    labelled tokens) is the answer alone, as the model is evaluated (without thinking); with True the
    empty think block becomes part of the labelled response. Templates that do not mention it get
    nothing extra.
    """

    def __init__(self, tokenizer, settings: BlockSettings, *, system: str | None = None, max_length: int | None = None,
                 sinks: bool = True, enable_thinking: bool = False):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; set one (block data is formatted as a chat)")
        self.tokenizer, self.settings, self.max_length = tokenizer, settings, max_length
        template = tokenizer.chat_template
        reads_thinking = "enable_thinking" in (" ".join(map(str, template.values())) if isinstance(template, dict)
                                               else str(template))
        # only for templates that read it: some tokenizer classes refuse unknown template arguments
        self.template_kwargs = {"enable_thinking": bool(enable_thinking)} if reads_thinking else {}
        # sinks=False (the "without sinks" ablation): no sink groups; the block boundaries travel as
        # ``block_lengths`` with every sample, since the token ids no longer mark them.
        self.sinks = sinks
        head_msgs = [{"role": "system", "content": system}] if system else []
        prompt = tokenizer.apply_chat_template(head_msgs + [{"role": "user", "content": _SENTINEL}], tokenize=False,
                                               add_generation_prompt=True, **self.template_kwargs)
        if prompt.count(_SENTINEL) != 1:
            raise ValueError("the chat template must render the user content exactly once")
        self.head, self.turn_switch = prompt.split(_SENTINEL)
        self.head_msgs = head_msgs

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def response_text(self, question: str, answer: str) -> str:
        msgs = self.head_msgs + [{"role": "user", "content": question}]
        prompt = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                    **self.template_kwargs)
        full = self.tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False,
                                                  **self.template_kwargs)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the assistant turn in a way that changes the prompt text")
        return full[len(prompt):]

    def prompt_ids(self, record: dict) -> list[int]:
        """The block prompt alone (for generation): prefix, context blocks, question + turn switch."""
        ids, _ = self._build(record, with_response=False)
        return ids

    def _build(self, record: dict, with_response: bool):
        ctx = list(record["context"])
        final = self._encode(record["question"] + self.turn_switch)
        resp = self._encode(self.response_text(record["question"], record["answer"])) if with_response else []
        head = self._encode(self.head)
        blocks = [self._encode(c) for c in ctx]
        k = self.settings.num_sinks if self.sinks else 0
        while True:
            n = len(head) + sum(len(b) + k for b in blocks) + k + len(final) + len(resp)
            if self.max_length is None or n <= self.max_length or not blocks:
                break
            blocks.pop()
        if self.max_length is not None and n > self.max_length:
            return None, 0
        if not self.sinks:
            parts = ([head] if head else []) + blocks + [final + resp]
            self._lengths = [len(p) for p in parts]
            return [t for p in parts for t in p], len(resp)
        ids = build_block_prompt([*blocks, final + resp], self.settings, prefix=head or None)
        return ids, len(resp)

    def __call__(self, record: dict) -> dict | None:
        ids, n_resp = self._build(record, with_response=True)
        if ids is None:
            return None
        labels = [-100] * (len(ids) - n_resp) + ids[len(ids) - n_resp:]
        if not self.sinks:
            return {"input_ids": ids, "labels": labels, "block_lengths": self._lengths}
        return {"input_ids": ids, "labels": labels}


# --- collation ----------------------------------------------------------------------------------------

def layout_from_lengths(lengths) -> BlockLayout:
    """A sink-free block layout from block lengths (the last block is the final one; zero lengths, e.g.
    batch padding, are ignored). Used by the "without sinks" ablation, whose ids carry no block markers."""
    lengths = [int(n) for n in lengths if int(n) > 0]
    if not lengths:
        raise ValueError("no blocks")
    blocks, pos = [], 0
    for i, n in enumerate(lengths):
        blocks.append(Block(pos, pos, pos + n, pos + n, i == len(lengths) - 1))
        pos += n
    return BlockLayout(tuple(blocks), pos, None)


class BlockDataCollator:
    """Pad block samples and add their sink-free (full-attention) copies.

    Returns ``input_ids``/``labels``/``attention_mask`` ``[B, L]`` (right-padded; labels -100 on pads),
    ``full_input_ids``/``full_labels`` ``[B, Lf]`` (the same samples without sink tokens, for the
    full-attention teacher and the block-finetune baseline), ``content_index`` ``[B, L]`` (student position
    -> full position, -1 for sinks and pads) and ``lengths`` ``[B]``. Attention masks are built by the
    trainer, where block dropout draws fresh blocks at every step.
    """

    def __init__(self, pad_token_id: int, settings: BlockSettings):
        self.pad_token_id, self.settings = pad_token_id, settings

    def layout(self, feature: dict):
        """The sample's layout: parsed from its sink groups, or from ``block_lengths`` (samples without sinks)."""
        if "block_lengths" in feature:
            return layout_from_lengths(feature["block_lengths"])
        return parse_block_prompt(list(feature["input_ids"]), self.settings)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        rows = []
        for i, f in enumerate(features):
            ids, labels = list(f["input_ids"]), list(f["labels"])
            if len(ids) != len(labels):
                raise ValueError(f"sample {i}: input_ids ({len(ids)}) and labels ({len(labels)}) differ in length")
            idx = content_index(self.layout(f))
            keep = (idx >= 0).tolist()
            rows.append((ids, labels, idx, [t for t, k in zip(ids, keep) if k], [t for t, k in zip(labels, keep) if k]))
        L, Lf = max(len(r[0]) for r in rows), max(len(r[3]) for r in rows)

        def pad(seqs, n, value):
            return torch.tensor([list(s) + [value] * (n - len(s)) for s in seqs], dtype=torch.long)

        out = {}
        if any("block_lengths" in f for f in features):
            if not all("block_lengths" in f for f in features):
                raise ValueError("a batch mixes samples with and without block_lengths")
            nb = max(len(f["block_lengths"]) for f in features)
            out["block_lengths"] = pad([f["block_lengths"] for f in features], nb, 0)
        return out | {
            "input_ids": pad([r[0] for r in rows], L, self.pad_token_id),
            "labels": pad([r[1] for r in rows], L, -100),
            "attention_mask": pad([[1] * len(r[0]) for r in rows], L, 0),
            "content_index": pad([r[2].tolist() for r in rows], L, -1),
            "full_input_ids": pad([r[3] for r in rows], Lf, self.pad_token_id),
            "full_labels": pad([r[4] for r in rows], Lf, -100),
            "lengths": torch.tensor([len(r[0]) for r in rows], dtype=torch.long),
        }
