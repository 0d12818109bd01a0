"""LoCoMo (snap-research/LoCoMo): one task per QA category, prompts in the full or the block form.

The prompt follows the official Hugging Face runner (``task_eval/hf_llm_utils.py``,
``get_input_context`` and ``run_*``): an intro naming the two speakers, then the sessions as
``DATE: ...`` / ``CONVERSATION:`` / ``<speaker> said, "..."`` lines (image turns add
`` and shared <caption>.``), then the QA instruction and the question. The official loop walks the
sessions from the first and *prepends* every turn and session header, so the prompt lists the
sessions newest first (each session's turns in their own order); that is the default here
(``session_order="official"``; ``"chronological"`` lists them oldest first). Temporal questions get
the official date hint; adversarial ones the official two-option form, with the option order a fixed
function of the question instead of ``random.random()``.

Truncation (``max_length``): the official loop adds sessions from the first one while they fit and,
in the session where the budget runs out, that session's latest turns; its budget check counts
every piece with the tokenizer's special tokens, the intro, the question prompt, all kept turns and
the header of the session being filled (``locomo_truncation="official"``, the default). Because it
leaves the other sessions' headers uncounted, the result can overrun the budget; then the budget is
lowered until the prompt fits. ``locomo_truncation="recent"`` keeps the most recent turns instead.

Block form: every session is a block (its date header and turns), in the same order; the final block
holds the intro, the instruction and the question. Its sink tokens count towards ``max_length``.

Scores: each question's official score is reported twice, as ``score`` (the question average: the
``locomo`` group weights its category tasks by their sizes, the official overall score) and as
``category_mean`` (the category average: the group takes the unweighted mean of the five category
means, the paper's "Average" column); within one category task the two are equal. The block form
also reports ``blocks_per_prompt``, the context blocks (kept sessions) of each prompt.
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


SESSION_ORDERS = ("official", "chronological")
TRUNCATIONS = ("official", "recent")
# The official runner samples its answers (hf_llm_utils.py: do_sample=True, top_k=10, temperature=0.4,
# top_p=0.9); the pack decodes greedily so runs repeat. lm-eval --gen_kwargs with this string samples
# as the official runner does.
OFFICIAL_SAMPLING = "do_sample=True,temperature=0.4,top_k=10,top_p=0.9"
# The system message of the official runner's run_llama (run_mistral and run_gemma send none); lm-eval's
# --system_instruction (results_table.py --system_instruction) adds it.
LLAMA_SYSTEM_PROMPT = ("You are a helpful, respectful and honest assistant whose job is to understand the following "
                       "conversation and answer questions based on the conversation. If you don't know the answer to "
                       "a question, please don't share false information.")


@functools.lru_cache(maxsize=4)
def _read(path: str) -> str:
    if path.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(path, timeout=60) as resp:  # noqa: S310 - the user's or the public file
                return resp.read().decode("utf-8")
        except OSError as e:  # URLError, timeouts, no network
            raise OSError(
                f"could not download the LoCoMo data from {path} ({e}). On a machine without internet access, "
                f"copy locomo10.json there and pass its path as locomo_path: --metadata "
                f"'{{\"locomo_path\": \"/path/to/locomo10.json\"}}' (or set {ENV_PATH})") from e
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
    """``[(session header, [turn text, ...]), ...]`` in session order (oldest first), every
    ``session_N`` of the conversation as the official runner takes them (an empty one too)."""
    nums = sorted(int(k.split("_")[1]) for k in conversation
                  if k.startswith("session_") and k.count("_") == 1 and isinstance(conversation[k], list))
    out = []
    for i in nums:
        header = f"DATE: {conversation.get(f'session_{i}_date_time', '')}\nCONVERSATION:\n"
        turns = []
        for t in conversation[f"session_{i}"]:
            turn = f"{t['speaker']} said, \"{t['text']}\"\n"
            if "blip_caption" in t:
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


def _keep_recent(parts: list[tuple[str, list[str]]], counts: list[dict], budget: int,
                 per_session: int) -> list[tuple[str, list[str]]]:
    """The most recent turns that fit ``budget`` tokens (each session also costs its header and
    ``per_session`` more, the sink group in the block form)."""
    kept: list[tuple[str, list[str]]] = []
    used = 0
    for (header, turns), cnt in zip(reversed(parts), reversed(counts)):
        taken: list[str] = []
        cost = cnt["header"] + per_session
        for turn, n in zip(reversed(turns), reversed(cnt["turns"])):
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


def _keep_official(parts: list[tuple[str, list[str]]], counts: list[dict], budget: int,
                   fixed: int) -> list[tuple[str, list[str]]]:
    """``get_input_context``'s selection: sessions from the first; a turn is added while
    ``fixed + (header + turn) + turns so far < budget`` (every count with the tokenizer's special
    tokens), walking each session's turns from its last; at the first turn that does not fit, that
    session (with the turns taken so far, maybe none) is the last one kept."""
    kept: list[tuple[str, list[str]]] = []
    total = 0
    for (header, turns), cnt in zip(parts, counts):
        taken: list[str] = []
        stop = False
        for turn, n_with_header, n in zip(reversed(turns), reversed(cnt["header_turns"]), reversed(cnt["turns_bos"])):
            if fixed + n_with_header + total < budget:
                taken.append(turn)
                total += n
            else:
                stop = True
                break
        kept.append((header, taken[::-1]))
        if stop:
            break
    return kept


def _prompt(intro: str, qa_prompt: str, parts: list[tuple[str, list[str]]], order: str, opts: FormOptions,
            block: bool) -> tuple[str, int]:
    ordered = parts[::-1] if order == "official" else parts
    if not block:
        conv_text = "".join("\n" + h + "".join(t) for h, t in ordered)
        return intro + conv_text + "\n\n" + qa_prompt, 1
    blocks = [h + "".join(t) for h, t in ordered] + [intro + qa_prompt.lstrip("\n")]
    return block_text(blocks, opts), len(blocks)


def build_prompt(sample: dict, qa: dict, key: str, opts: FormOptions, block: bool, session_order: str = "official",
                 truncation: str = "official") -> tuple[str, int, dict | None]:
    """(prompt text, number of blocks, category-5 options) for one question."""
    if session_order not in SESSION_ORDERS:
        raise ValueError(f"session_order must be one of {SESSION_ORDERS}, got {session_order!r}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"locomo_truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    conv = sample["conversation"]
    intro = INTRO.format(a=conv.get("speaker_a", ""), b=conv.get("speaker_b", ""))
    question, options = question_text(qa, key)
    qa_prompt = QA_PROMPT.format(question=question)
    parts = sessions(conv)
    tok = opts.tokenizer
    if opts.max_length is None or tok is None:
        prompt, n = _prompt(intro, qa_prompt, parts, session_order, opts, block)
        return prompt, n, options
    counts = _token_counts(sample, key.rsplit("/", 1)[0], opts)
    if truncation == "recent":
        fixed = opts.count_tokens(intro + qa_prompt) + 2 + (opts.marker_tokens if block else 0) + sum(opts.special_tokens())
        kept = _keep_recent(parts, counts, opts.max_length - fixed, opts.marker_tokens if block else 1)
        prompt, n = _prompt(intro, qa_prompt, kept, session_order, opts, block)
        return prompt, n, options
    fixed = len(tok.encode(intro)) + len(tok.encode(qa_prompt))  # start_tokens + question_tokens
    budget = opts.max_length
    for _ in range(64):
        kept = _keep_official(parts, counts, budget, fixed)
        prompt, n = _prompt(intro, qa_prompt, kept, session_order, opts, block)
        size = len(tok.encode(prompt))
        if size <= opts.max_length:
            break
        budget -= size - opts.max_length  # the uncounted headers (and sinks) overran it
    return prompt, n, options


_COUNT_CACHE: dict[tuple, list[dict]] = {}


def _token_counts(sample: dict, sample_id: str, opts: FormOptions) -> list[dict]:
    """Token counts of every session (header; turns; turns and header+turn with special tokens, as
    the official loop counts them), computed once per conversation and tokenizer."""
    cache_key = (sample_id, opts.tokenizer_name)
    if cache_key not in _COUNT_CACHE:
        tok = opts.tokenizer

        def lengths(texts, special):
            return [len(ids) for ids in tok(texts, add_special_tokens=special)["input_ids"]] if texts else []

        _COUNT_CACHE[cache_key] = [
            {"header": len(tok.encode("\n" + h, add_special_tokens=False)),
             "turns": lengths(t, False), "turns_bos": lengths(t, True),
             "header_turns": lengths([h + x for x in t], True)}
            for h, t in sessions(sample["conversation"])
        ]
    return _COUNT_CACHE[cache_key]


def load(locomo_category: int | str = "all", block: bool = False, locomo_path: str | None = None,
         **metadata) -> dict:
    """lm-eval ``custom_dataset`` entry: ``{"test": Dataset}``, one row per question of the category."""
    import datasets

    if locomo_category != "all" and int(locomo_category) not in locomo_metrics.CATEGORIES:
        raise ValueError(f"locomo_category must be 'all' or one of {sorted(locomo_metrics.CATEGORIES)}, "
                         f"got {locomo_category!r}")
    session_order = metadata.get("session_order") or os.environ.get("BLOCKATTN_LOCOMO_SESSION_ORDER") or "official"
    truncation = metadata.get("locomo_truncation") or os.environ.get("BLOCKATTN_LOCOMO_TRUNCATION") or "official"
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
            prompt, n_blocks, options = build_prompt(sample, qa, key, opts, bool(block), session_order, truncation)
            docs.append({
                "prompt": prompt, "block": bool(block), "num_blocks": n_blocks,
                "context_blocks": n_blocks - 1 if block else 0, "category": cat, "id": key,
                "question": qa["question"], "answer": str(qa.get("answer", qa.get("adversarial_answer", ""))),
                "options": json.dumps(options) if options else "",
            })
    return {"test": datasets.Dataset.from_list(docs)}


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval ``process_results``: the official score of the post-processed answer, under ``score``
    (aggregated over questions) and ``category_mean`` (aggregated over categories by the group); in
    the block form also the prompt's number of context blocks (``blocks_per_prompt``)."""
    options = json.loads(doc["options"]) if doc.get("options") else None
    prediction = locomo_metrics.postprocess(results[0], doc["category"], options)
    value = locomo_metrics.score(prediction, doc["answer"], doc["category"])
    out = {"score": value, "category_mean": value}
    if doc.get("block"):
        out["blocks_per_prompt"] = int(doc["context_blocks"])
    return out
