"""LoCoMo (snap-research/LoCoMo): one task per QA category, prompts in the full or the block form.

The prompt follows the official Hugging Face runner (``task_eval/hf_llm_utils.py``): an intro naming
the two speakers, then every session as ``DATE: ...`` / ``CONVERSATION:`` / ``<speaker> said, "..."``
lines (image turns add `` and shared <caption>.``), then the QA instruction and the question.
Temporal questions get the official date hint; adversarial ones the official two-option form, with
the option order a fixed function of the question instead of ``random.random()``.

Block form: every session is a block (its date header and turns); the final block holds the intro,
the instruction and the question. Truncation (``max_length``) keeps the most recent turns, in both
forms alike; the official runner cuts inside the conversation instead, an artefact of its batching.
"""

from __future__ import annotations

import functools
import json
import os
import urllib.request

from tqdm import tqdm

from . import locomo_metrics
from .blocks import FormOptions, block_text

DEFAULT_PATH = "https://raw.githubusercontent.com/snap-research/locomo/main/data/locomo10.json"
ENV_PATH = "BLOCKATTN_LOCOMO_PATH"
MAX_GEN_TOKS = 50  # ANS_TOKENS_PER_QUES of the official runner

INTRO = ("Below is a conversation between two people: {a} and {b}. The conversation takes place over multiple "
         "days and the date of each conversation is wriiten at the beginning of the conversation.\n\n")
QA_PROMPT = ("\nBased on the above conversations, write a short answer for the following question in a few words. "
             "Do not write complete and lengthy sentences. Answer with exact words from the conversations whenever "
             "possible.\n\nQuestion: {question}\n")
TEMPORAL_HINT = " Use DATE of CONVERSATION to answer with an approximate date."
ADVERSARIAL_FORM = " (a) {a} (b) {b}. Select the correct answer by writing (a) or (b)."


@functools.lru_cache(maxsize=4)
def _read(path: str) -> str:
    if path.startswith(("http://", "https://")):
        with urllib.request.urlopen(path) as resp:  # noqa: S310 - the user's or the public data file
            return resp.read().decode("utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_samples(path: str | None = None) -> list[dict]:
    """The conversations of ``locomo10.json`` (argument, ``BLOCKATTN_LOCOMO_PATH`` or the public file)."""
    path = path or os.environ.get(ENV_PATH) or DEFAULT_PATH
    if not path.startswith(("http://", "https://")) and not os.path.isfile(path):
        raise FileNotFoundError(f"LoCoMo data file not found: {path} (set locomo_path or {ENV_PATH})")
    data = json.loads(_read(path))
    if not isinstance(data, list) or not all(isinstance(s, dict) and "conversation" in s and "qa" in s for s in data):
        raise ValueError(f"{path} is not LoCoMo data: expected a list of samples with 'conversation' and 'qa'")
    return data


def sessions(conversation: dict) -> list[tuple[str, list[str]]]:
    """``[(session header, [turn text, ...]), ...]`` in session order."""
    nums = sorted(int(k.split("_")[1]) for k in conversation
                  if k.startswith("session_") and k.count("_") == 1 and conversation[k])
    out = []
    for i in nums:
        header = f"DATE: {conversation.get(f'session_{i}_date_time', '')}\nCONVERSATION:\n"
        turns = []
        for t in conversation[f"session_{i}"]:
            turn = f"{t['speaker']} said, \"{t['text']}\"\n"
            if t.get("blip_caption"):
                turn += f" and shared {t['blip_caption']}."
            turns.append(turn + "\n")
        out.append((header, turns))
    return out


def question_text(qa: dict, key: str) -> tuple[str, dict | None]:
    """The question as asked, and for category 5 the options ``{'a': ..., 'b': ...}``."""
    q, cat = qa["question"], int(qa["category"])
    if cat == 2:
        return q + TEMPORAL_HINT, None
    if cat == 5:
        answer = str(qa.get("answer", qa.get("adversarial_answer", "")))
        first, second = locomo_metrics.adversarial_options(key)
        options = {first: locomo_metrics.NO_INFO, second: answer}
        return q + ADVERSARIAL_FORM.format(a=options["a"], b=options["b"]), options
    return q, None


def _keep_recent(parts: list[tuple[str, list[str]]], counts: list[tuple[int, list[int]]], budget: int,
                 per_session: int) -> list[tuple[str, list[str]]]:
    """The most recent turns that fit ``budget`` tokens (each session also costs its header and
    ``per_session`` more, the sink group in the block form)."""
    kept: list[tuple[str, list[str]]] = []
    used = 0
    for (header, turns), (n_header, n_turns) in zip(reversed(parts), reversed(counts)):
        taken: list[str] = []
        cost = n_header + per_session
        for turn, n in zip(reversed(turns), reversed(n_turns)):
            if used + cost + n > budget:
                break
            cost += n
            taken.append(turn)
        if taken:
            kept.append((header, taken[::-1]))
            used += cost
        if len(taken) < len(turns):
            break
    return kept[::-1]


def build_prompt(sample: dict, qa: dict, key: str, opts: FormOptions, block: bool) -> tuple[str, int, dict | None]:
    """(prompt text, number of blocks, category-5 options) for one question."""
    conv = sample["conversation"]
    intro = INTRO.format(a=conv.get("speaker_a", ""), b=conv.get("speaker_b", ""))
    question, options = question_text(qa, key)
    qa_prompt = QA_PROMPT.format(question=question)
    parts = sessions(conv)
    if opts.max_length is not None and opts.tokenizer is not None:
        counts = _token_counts(sample, key.rsplit("/", 1)[0], opts)
        fixed = opts.count_tokens(intro + qa_prompt) + 2 + (opts.num_sinks if block else 0)
        parts = _keep_recent(parts, counts, opts.max_length - fixed, opts.num_sinks if block else 1)
    if not block:
        conv_text = "".join("\n" + h + "".join(t) for h, t in parts)
        return intro + conv_text + "\n\n" + qa_prompt, 1, options
    blocks = [h + "".join(t) for h, t in parts] + [intro + qa_prompt.lstrip("\n")]
    return block_text(blocks, opts), len(blocks), options


_COUNT_CACHE: dict[tuple, list[tuple[int, list[int]]]] = {}


def _token_counts(sample: dict, sample_id: str, opts: FormOptions) -> list[tuple[int, list[int]]]:
    """Token counts of every session header and turn, computed once per conversation and tokenizer."""
    cache_key = (sample_id, opts.tokenizer_name)
    if cache_key not in _COUNT_CACHE:
        tok = opts.tokenizer
        parts = sessions(sample["conversation"])
        _COUNT_CACHE[cache_key] = [
            (len(tok.encode("\n" + h, add_special_tokens=False)),
             [len(ids) for ids in tok(t, add_special_tokens=False)["input_ids"]] if t else [])
            for h, t in parts
        ]
    return _COUNT_CACHE[cache_key]


def load(locomo_category: int | str = "all", block: bool = False, locomo_path: str | None = None,
         **metadata) -> dict:
    """lm-eval ``custom_dataset`` entry: ``{"test": Dataset}``, one row per question of the category."""
    import datasets

    if locomo_category != "all" and int(locomo_category) not in locomo_metrics.CATEGORIES:
        raise ValueError(f"locomo_category must be 'all' or one of {sorted(locomo_metrics.CATEGORIES)}, "
                         f"got {locomo_category!r}")
    opts = FormOptions.from_kwargs(metadata, max_gen_toks=MAX_GEN_TOKS)
    samples = read_samples(locomo_path)
    docs = []
    for s_idx, sample in enumerate(tqdm(samples, desc="locomo prompts", leave=False)):
        sample_id = str(sample.get("sample_id", s_idx))
        for q_idx, qa in enumerate(sample["qa"]):
            cat = int(qa["category"])
            if locomo_category != "all" and cat != int(locomo_category):
                continue
            key = f"{sample_id}/{q_idx}"
            prompt, n_blocks, options = build_prompt(sample, qa, key, opts, bool(block))
            docs.append({
                "prompt": prompt, "num_blocks": n_blocks, "category": cat, "id": key,
                "question": qa["question"], "answer": str(qa.get("answer", qa.get("adversarial_answer", ""))),
                "options": json.dumps(options) if options else "",
            })
    return {"test": datasets.Dataset.from_list(docs)}


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval ``process_results``: the official score of the post-processed answer (key ``score``)."""
    options = json.loads(doc["options"]) if doc.get("options") else None
    prediction = locomo_metrics.postprocess(results[0], doc["category"], options)
    return {"score": locomo_metrics.score(prediction, doc["answer"], doc["category"])}
