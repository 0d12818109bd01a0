"""LongBench v1 (THUDM/LongBench): the 21 tasks, their official prompts, answer lengths and metrics,
and the loader that builds each row's prompt in the full or the block form.

Full form: the official prompt, middle-truncated to ``max_length`` tokens exactly as LongBench's
``pred.py`` does (first half + last half of the prompt's tokens). Block form: the same context, cut
into blocks by its natural units (``Passage N:`` of multi-doc QA, ``Paragraph N:`` / ``段落N`` of the
synthetic tasks) or by the segmenter, followed by a final block holding the prompt without its
context (instruction and question). Its context is truncated like the full form's (same head and
tail of the context), a little more when the sink groups would overflow ``max_length``. Option
``units: off`` ignores the natural units: the chosen segmenter cuts every task's whole context.

Every row records ``context_blocks`` (blocks before the final one; 0 in the full form), and the block
tasks report it as the metric ``blocks_per_prompt``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tqdm import tqdm

from . import longbench_metrics
from .blocks import FormOptions, block_text, segment, split_before, truncate_middle

HUB_DATASET = "THUDM/LongBench"
ENV_DIR = "BLOCKATTN_LONGBENCH_DIR"
ENV_ROUGE = "BLOCKATTN_ROUGE_RECURSION"


@dataclass(frozen=True)
class LongBenchTask:
    name: str
    group: str
    prompt: str  # official template with {context} and {input}
    max_gen: int
    metric: str
    units: str | None = None  # regex that starts a natural unit of the context


_MQA = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
_PASSAGE = r"(?m)^Passage \d+:"

TASKS: dict[str, LongBenchTask] = {t.name: t for t in [
    LongBenchTask("narrativeqa", "single",
                  "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                  "question asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
                  "\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a "
                  "single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
                  128, "qa_f1"),
    LongBenchTask("qasper", "single",
                  "You are given a scientific article and a question. Answer the question as concisely as you can, "
                  "using a single phrase or sentence if possible. If the question cannot be answered based on the "
                  "information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
                  "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n "
                  "Answer the question based on the above article as concisely as you can, using a single phrase or "
                  "sentence if possible. If the question cannot be answered based on the information in the article, "
                  "write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
                  "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
                  128, "qa_f1"),
    LongBenchTask("multifieldqa_en", "single",
                  "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based "
                  "on the above text, only give me the answer and do not output any other words.\n\nQuestion: "
                  "{input}\nAnswer:", 64, "qa_f1"),
    LongBenchTask("multifieldqa_zh", "single",
                  "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
                  "\n\n问题：{input}\n回答：", 64, "qa_f1_zh"),
    LongBenchTask("hotpotqa", "multi", _MQA, 32, "qa_f1", _PASSAGE),
    LongBenchTask("2wikimqa", "multi", _MQA, 32, "qa_f1", _PASSAGE),
    LongBenchTask("musique", "multi", _MQA, 32, "qa_f1", _PASSAGE),
    LongBenchTask("dureader", "multi",
                  "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
                  128, "rouge_zh", r"(?m)^文章\d+"),
    LongBenchTask("gov_report", "summarization",
                  "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
                  "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", 512, "rouge"),
    LongBenchTask("qmsum", "summarization",
                  "You are given a meeting transcript and a query containing a question or instruction. Answer the "
                  "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
                  "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512, "rouge"),
    LongBenchTask("multi_news", "summarization",
                  "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
                  "Now, write a one-page summary of all the news.\n\nSummary:", 512, "rouge"),
    LongBenchTask("vcsum", "summarization",
                  "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：", 512, "rouge_zh"),
    LongBenchTask("trec", "fewshot",
                  "Please determine the type of the question below. Here are some examples of questions.\n\n"
                  "{context}\n{input}", 64, "classification"),
    LongBenchTask("triviaqa", "fewshot",
                  "Answer the question based on the given passage. Only give me the answer and do not output any "
                  "other words. The following are some examples.\n\n{context}\n\n{input}", 32, "qa_f1"),
    LongBenchTask("samsum", "fewshot",
                  "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
                  "{context}\n\n{input}", 128, "rouge"),
    LongBenchTask("lsht", "fewshot", "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}", 64, "classification"),
    LongBenchTask("passage_count", "synthetic",
                  "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
                  "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
                  "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
                  "Please enter the final count of unique paragraphs after removing duplicates. The output format "
                  "should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
                  32, "count", r"(?m)^Paragraph \d+:"),
    LongBenchTask("passage_retrieval_en", "synthetic",
                  "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
                  "the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
                  "number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", "
                  "\"Paragraph 2\", etc.\n\nThe answer is: ", 32, "retrieval", r"(?m)^Paragraph \d+:"),
    LongBenchTask("passage_retrieval_zh", "synthetic",
                  "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
                  "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：", 32, "retrieval_zh",
                  r"(?m)^段落\d+"),
    LongBenchTask("lcc", "code", "Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim"),
    LongBenchTask("repobench-p", "code", "Please complete the code given below. \n{context}{input}Next line of code:\n",
                  64, "code_sim"),
]}

# LongBench's leaderboard reports English and Chinese separately (each: category means, Avg = mean of
# the six categories); the two code tasks count in both.
LANGUAGES = {name: ("code" if t.group == "code" else "zh" if t.metric.endswith("_zh") or name in ("lsht", "vcsum")
                    else "en") for name, t in TASKS.items()}

# pred.py wraps the prompt in the model's chat format for every task except these ("chat models are
# better off without build prompts on these tasks").
NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})


def uses_chat_template(task: str) -> bool:
    """Whether LongBench's ``pred.py`` applies the chat template to ``task`` (for chat models)."""
    return task_spec(task).name not in NO_CHAT_TEMPLATE


GROUPS = {
    "single": "Single-Document QA", "multi": "Multi-Document QA", "summarization": "Summarization",
    "fewshot": "Few-shot Learning", "synthetic": "Synthetic Tasks", "code": "Code Completion",
}


def task_spec(name: str) -> LongBenchTask:
    if name not in TASKS:
        raise ValueError(f"unknown LongBench task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def read_rows(task: str, data_dir: str | None = None) -> list[dict]:
    """The rows of ``task``: ``data_dir/{task}.jsonl`` (LongBench's ``data.zip`` layout) when a
    directory is given (argument or ``BLOCKATTN_LONGBENCH_DIR``), else the hub data set."""
    data_dir = data_dir or os.environ.get(ENV_DIR)
    if data_dir:
        path = os.path.join(data_dir, f"{task}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LongBench data for task {task!r} not found: expected {path}")
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    import datasets

    # THUDM/LongBench keeps its jsonl files in data.zip (its loading script is refused by datasets>=4).
    url = f"zip://data/{task}.jsonl::hf://datasets/{HUB_DATASET}/data.zip"
    try:
        return list(datasets.load_dataset("json", data_files={"test": url}, split="test"))
    except Exception as e:
        raise RuntimeError(
            f"could not read LongBench task {task!r} from the hub ({url}): {e}. Download "
            f"https://huggingface.co/datasets/{HUB_DATASET}/resolve/main/data.zip, unzip it and pass its data/ "
            f"folder as --metadata '{{\"longbench_dir\": \"...\"}}' (or {ENV_DIR})") from e


def _row_fields(row: dict, task: str) -> tuple[str, str, list[str]]:
    missing = [k for k in ("context", "answers") if k not in row]
    question = row.get("input", row.get("question"))
    if missing or question is None:
        raise ValueError(f"LongBench row of {task!r} lacks {missing or ['input']}; expected the official jsonl "
                         f"fields input, context, answers, length, dataset, language, all_classes, _id")
    answers = row["answers"]
    if isinstance(answers, str) or not answers:
        raise ValueError(f"LongBench row {row.get('_id')!r} of {task!r}: answers must be a non-empty list")
    return row["context"], question, list(answers)


def full_prompt(spec: LongBenchTask, context: str, question: str, opts: FormOptions) -> str:
    prompt = spec.prompt.format(context=context, input=question)
    tok = opts.tokenizer
    if tok is None or opts.max_length is None:
        return prompt
    # pred.py: tokenizer(prompt) with its special tokens (a Llama BOS is one of the first half's
    # tokens, then skipped when decoding), first and last max_length // 2 tokens
    ids = tok.encode(prompt)
    if len(ids) <= opts.max_length:
        return prompt
    half = opts.max_length // 2
    return tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True)


def _parts(spec: LongBenchTask, question: str) -> tuple[str, str]:
    head, tail = spec.prompt.split("{context}")
    return head, tail.format(input=question)


def block_blocks(spec: LongBenchTask, context: str, question: str, opts: FormOptions) -> list[str]:
    """Context blocks + the final block (instruction and question), truncated to ``max_length``."""
    head, tail = _parts(spec, question)
    final = (head.rstrip() + "\n\n" + tail.lstrip()) if head.strip() else tail.lstrip()

    def cut(ctx: str) -> list[str]:
        if not ctx.strip():
            return [final]
        units = split_before(ctx, spec.units) if spec.units and opts.units else None
        return (units or segment(ctx, opts)) + [final]

    blocks = cut(context)
    if opts.max_length is None or opts.tokenizer is None:
        return blocks
    lead, trail = opts.special_tokens()  # counted like the full form (pred.py counts a BOS)
    n_head, n_tail = opts.count_tokens(head) + lead, opts.count_tokens(tail) + trail
    n_ctx = opts.count_tokens(context)
    half = opts.max_length // 2
    keep_head, keep_tail = max(half - n_head, 0), max(half - n_tail, 0)  # the full form's cut
    for _ in range(32):  # then shave while the sink groups (or re-tokenisation) make it overflow
        if keep_head + keep_tail < n_ctx:
            blocks = cut(truncate_middle(context, keep_head, keep_tail, opts))
        total = sum(opts.count_tokens(b) for b in blocks) + opts.marker_tokens * len(blocks) + lead + trail
        if total <= opts.max_length or len(blocks) == 1:
            return blocks
        if keep_head + keep_tail >= n_ctx:
            keep_head, keep_tail = (n_ctx + 1) // 2, n_ctx // 2
        over = total - opts.max_length
        cut_tail = min(keep_tail, over // 2 + 1)
        cut_head = min(keep_head, over + 1 - cut_tail)
        keep_head, keep_tail = keep_head - cut_head, keep_tail - cut_tail
    return blocks


def build_prompt(spec: LongBenchTask, row: dict, opts: FormOptions, block: bool) -> tuple[str, int]:
    """(prompt text, number of blocks) of one row."""
    context, question, _ = _row_fields(row, spec.name)
    if not block:
        return full_prompt(spec, context, question, opts), 1
    blocks = block_blocks(spec, context, question, opts)
    return block_text(blocks, opts), len(blocks)


def load(longbench_task: str, block: bool = False, longbench_dir: str | None = None, **metadata) -> dict:
    """lm-eval ``custom_dataset`` entry: ``{"test": Dataset}`` with a ``prompt`` per row."""
    import datasets

    spec = task_spec(longbench_task)
    rouge_recursion = metadata.get("rouge_recursion") or os.environ.get(ENV_ROUGE) or "official"
    if rouge_recursion not in longbench_metrics.ROUGE_RECURSION_MODES:
        raise ValueError(f"rouge_recursion must be one of {longbench_metrics.ROUGE_RECURSION_MODES}, "
                         f"got {rouge_recursion!r}")
    opts = FormOptions.from_kwargs(metadata, max_gen_toks=spec.max_gen)
    docs = []
    for row in tqdm(read_rows(spec.name, longbench_dir), desc=f"longbench {spec.name} prompts", leave=False):
        prompt, n_blocks = build_prompt(spec, row, opts, bool(block))
        docs.append({
            "prompt": prompt, "block": bool(block), "num_blocks": n_blocks,
            "context_blocks": n_blocks - 1 if block else 0, "task": spec.name,
            "answers": list(row["answers"]), "all_classes": list(row.get("all_classes") or []),
            "length": int(row.get("length") or 0), "_id": str(row.get("_id", "")),
            "rouge_recursion": rouge_recursion,
        })
    return {"test": datasets.Dataset.from_list(docs)}


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval ``process_results``: the row's LongBench score under the key ``score``; in the block form
    also the number of context blocks of its prompt under ``blocks_per_prompt``."""
    spec = task_spec(doc["task"])
    out = {"score": longbench_metrics.score_row(spec.name, spec.metric, results[0], doc["answers"],
                                                doc.get("all_classes"),
                                                rouge_recursion=doc.get("rouge_recursion") or "official")}
    if doc.get("block"):
        out["blocks_per_prompt"] = int(doc["context_blocks"])
    return out
