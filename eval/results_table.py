"""Results table in the shape of the paper's Tables 3 (LongBench) and 4 (LoCoMo): one row per
(model, form) pair (Full / Block / training-free Block, with a segmenter where it matters), one column
per category, and the average.

Run the evaluations (each row is one lm-eval run of the benchmark's group in the row's form):

    python eval/results_table.py --benchmark locomo --output_dir results/locomo \\
        --row "Full" vllm "pretrained=MODEL" full \\
        --row "Block" vllm '{"pretrained": "MODEL", "attention_backend": "blockattn"}' block \\
        --row "Block, learned segmenter" vllm '{"pretrained": "MODEL", "attention_backend": "blockattn"}' block+learned \\
        --row "Training-free block" hf-block "pretrained=BASE,sink_token=<|endoftext|>" block \\
        --metadata '{"locomo_path": "/path/to/locomo10.json"}'

FORM is ``full``, ``block`` or ``block+SEGMENTER`` (``rule``, ``learned`` or ``module:function``: the
``segmenter`` task option for that row). ``--variants MODEL TRAINED BASE`` adds the paper's rows for
one model type (Full; Block per ``--segmenters``; training-free block of BASE).

Chat templates (``--chat_template``): ``none`` (default), ``all``, or ``official``: LongBench's
``pred.py`` rule (every task but trec, triviaqa, samsum, lsht, lcc and repobench-p), run as two
lm-eval passes over one loaded model with the groups averaged here as lm-eval would (unweighted mean
of tasks, then of groups); for LoCoMo ``official`` is ``all`` (its runner always applies it).
``--locomo_sampling official`` samples as LoCoMo's runner does (temperature 0.4, top-k 10, top-p 0.9).
``--language en`` / ``zh``: LongBench's leaderboard columns for one language (code tasks in both).

Or tabulate lm-eval result files written earlier (``lm_eval ... --output_path``):

    python eval/results_table.py --benchmark longbench --output_dir results/lb \\
        --from_results "Full=out/full/results_x.json" --from_results "Block=out/block/results_y.json"

Writes ``table.md`` and ``table.json`` (and each run's raw lm-eval results) under ``--output_dir``.
Scores are the pack's ``score`` metric x 100. LoCoMo's ``Avg`` is the paper's: the mean of the five
category means (the group's ``category_mean``); ``Avg (questions)`` is the mean over questions (the
group's ``score``). ``Blocks/prompt`` is the block form's context blocks per prompt (the group's
``blocks_per_prompt``; ``-`` for the full form). Rows run here get thinking off for Qwen3 chat
templates unless their model_args say otherwise (``enable_thinking``, as ``python -m eval.run``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

BENCHMARKS = {
    "longbench": {
        "group": "longbench",
        "columns": [("Single-Doc QA", "longbench_single"), ("Multi-Doc QA", "longbench_multi"),
                    ("Summarization", "longbench_summarization"), ("Few-shot", "longbench_fewshot"),
                    ("Synthetic", "longbench_synthetic"), ("Code", "longbench_code"), ("Avg", "longbench"),
                    ("Blocks/prompt", "longbench", "blocks_per_prompt")],
    },
    "locomo": {
        "group": "locomo",
        "columns": [("Multi-hop", "locomo_multi_hop"), ("Temporal", "locomo_temporal"),
                    ("Open-domain", "locomo_open_domain"), ("Single-hop", "locomo_single_hop"),
                    ("Adversarial", "locomo_adversarial"), ("Avg", "locomo", "category_mean"),
                    ("Avg (questions)", "locomo"), ("Blocks/prompt", "locomo", "blocks_per_prompt")],
    },
}
FORMS = ("full", "block")
CHAT_TEMPLATE_MODES = ("none", "all", "official")


def _suffix(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return "_block" if form == "block" else ""


def parse_form(form: str) -> tuple[str, str | None]:
    """``full`` | ``block`` | ``block+SEGMENTER`` -> (form, segmenter or None)."""
    base, plus, segmenter = form.partition("+")
    if base not in FORMS or (plus and (base != "block" or not segmenter)):
        raise ValueError(f"form must be 'full', 'block' or 'block+SEGMENTER' (rule, learned, module:function), "
                         f"got {form!r}")
    return base, segmenter or None


def longbench_tasks(suffix: str) -> dict[str, list[str]]:
    """Group -> lm-eval task names of the pack (``suffix`` '' or '_block')."""
    from vllm_blockattn.eval.longbench import GROUPS, TASKS

    return {g: [f"longbench_{t.name}{suffix}" for t in TASKS.values() if t.group == g] for g in GROUPS}


def chat_template_split(benchmark: str, form: str, mode: str) -> list[tuple[list[str], bool]]:
    """The lm-eval passes of one row: [(tasks, apply_chat_template), ...]."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    group = BENCHMARKS[benchmark]["group"] + _suffix(form)
    if mode == "none":
        return [([group], False)]
    if mode == "all" or benchmark == "locomo":  # LoCoMo's runner applies the chat template to every question
        return [([group], True)]
    from vllm_blockattn.eval.longbench import uses_chat_template

    suffix = _suffix(form)
    tasks = [t for members in longbench_tasks(suffix).values() for t in members]
    name = lambda t: t[len("longbench_"):len(t) - len(suffix)]  # noqa: E731
    with_t = [t for t in tasks if uses_chat_template(name(t))]
    without = [t for t in tasks if not uses_chat_template(name(t))]
    return [(with_t, True), (without, False)]


def aggregate_longbench(results: dict, form: str) -> dict:
    """Add the group and overall entries of per-task LongBench results as lm-eval's groups compute
    them (``weight_by_size: false``): mean of the tasks in a group, mean of the groups overall."""
    suffix = _suffix(form)
    out = dict(results)
    group_scores = []
    for g, members in longbench_tasks(suffix).items():
        vals = [float(out[t]["score,none"]) for t in members if t in out and out[t].get("score,none") not in (None, "N/A")]
        if vals:
            out[f"longbench_{g}{suffix}"] = {"score,none": sum(vals) / len(vals), "tasks": len(vals)}
            group_scores.append(sum(vals) / len(vals))
    if group_scores:
        out[f"longbench{suffix}"] = {"score,none": sum(group_scores) / len(group_scores), "groups": len(group_scores)}
        blocks = [float(v["blocks_per_prompt,none"]) for t, v in out.items()
                  if t in {m for ms in longbench_tasks(suffix).values() for m in ms}
                  and v.get("blocks_per_prompt,none") not in (None, "N/A")]
        if blocks:  # the mean over tasks (a task's count of prompts is not in its results)
            out[f"longbench{suffix}"]["blocks_per_prompt,none"] = sum(blocks) / len(blocks)
    return out


def detect_form(results: dict, benchmark: str) -> str:
    group = BENCHMARKS[benchmark]["group"]
    for form in FORMS:
        if group + _suffix(form) in results:
            return form
    raise ValueError(f"lm-eval results hold neither {group!r} nor {group + '_block'!r}; "
                     f"run the benchmark's group (found: {sorted(results)[:8]})")


def scores_from_results(results: dict, benchmark: str, form: str, language: str = "all") -> dict[str, float | None]:
    """Column label -> score x 100 (None where the run did not include that category).

    ``language`` (LongBench only): ``all`` reads the pack's groups (all 21 tasks); ``en`` / ``zh``
    recompute the columns as LongBench's leaderboard does for one language: each category the mean of
    its tasks in that language (the code tasks count in both), Avg the mean of the categories."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {sorted(BENCHMARKS)}, got {benchmark!r}")
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if language != "all":
        if benchmark != "longbench":
            raise ValueError("language applies to --benchmark longbench")
        return _longbench_language_scores(results, form, language)
    out = {}
    for label, name, *metric in BENCHMARKS[benchmark]["columns"]:
        entry = results.get(name + _suffix(form)) or {}
        key = metric[0] if metric else "score"
        value = entry.get(f"{key},none")
        if value is None and key == "category_mean":
            value = entry.get("score,none")  # results written before the pack reported category_mean
        scale = 1.0 if key == "blocks_per_prompt" else 100.0
        out[label] = None if value is None or value == "N/A" else round(scale * float(value), 2)
    return out


LANGUAGES = ("all", "en", "zh")


def _longbench_language_scores(results: dict, form: str, language: str) -> dict[str, float | None]:
    from vllm_blockattn.eval.longbench import LANGUAGES as TASK_LANGUAGE

    suffix = _suffix(form)
    out: dict[str, float | None] = {}
    means = []
    for label, name, *_ in BENCHMARKS["longbench"]["columns"]:
        if name == "longbench":
            continue
        group = name[len("longbench_"):]
        vals = []
        for task in longbench_tasks(suffix)[group]:
            bare = task[len("longbench_"):len(task) - len(suffix)]
            entry = results.get(task) or {}
            if TASK_LANGUAGE[bare] in (language, "code") and entry.get("score,none") not in (None, "N/A"):
                vals.append(float(entry["score,none"]))
        mean = sum(vals) / len(vals) if vals else None
        out[label] = None if mean is None else round(100.0 * mean, 2)
        if mean is not None:
            means.append(mean)
    out["Avg"] = round(100.0 * sum(means) / len(means), 2) if means else None
    out["Blocks/prompt"] = scores_from_results(results, "longbench", form)["Blocks/prompt"]
    return out


def markdown(rows: Sequence[dict], benchmark: str) -> str:
    labels = [label for label, *_ in BENCHMARKS[benchmark]["columns"]]
    lines = ["| Method | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for row in rows:
        cells = ["-" if row["scores"][c] is None else f"{row['scores'][c]:.2f}" for c in labels]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _model_args(text: str):
    text = text.strip()
    return json.loads(text) if text.startswith("{") else text


def run_row(label: str, model: str, model_args: str, form: str, benchmark: str, include_path: str,
            metadata: dict, limit: float | None, gen_kwargs: str | None, chat_template: str = "none",
            system_instruction: str | None = None) -> dict:
    """One row: lm-eval over the benchmark's group in ``form`` (one pass, or two over the same loaded
    model under ``chat_template="official"`` for LongBench); returns lm-eval's results dict."""
    from vllm_blockattn.eval.__main__ import prepare
    from vllm_blockattn.eval.chat import thinking_model_args

    prepare()
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    form, segmenter = parse_form(form)
    passes = chat_template_split(benchmark, form, chat_template)
    args = _model_args(model_args)
    as_dict = args if isinstance(args, dict) else simple_parse_args_string(args)
    as_dict = thinking_model_args(model, as_dict)  # thinking off for Qwen3 templates unless asked
    row_metadata = {**metadata, **({"segmenter": segmenter} if segmenter else {})}
    # only the pack's groups run: skip indexing lm-eval's own task files (~20 s)
    tm = TaskManager(include_path=include_path, include_defaults=False, metadata={**as_dict, **row_metadata})
    lm = get_model(model).create_from_arg_obj(as_dict, {})
    results: dict = {}
    for tasks, apply in passes:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=tm, gen_kwargs=gen_kwargs,
                                      apply_chat_template=apply, system_instruction=system_instruction if apply else None)
        results.update(out["results"])
    if len(passes) > 1:
        results = aggregate_longbench(results, form)
    return results


def variant_rows(model: str, trained: str, base: str, segmenters: list[str], sink_token: str) -> list[list[str]]:
    """The paper's rows for one model type: Full (trained, stock attention), Block with each segmenter
    (trained, block attention), training-free block (base model, an existing token as the sink)."""
    if model not in ("vllm", "hf-block"):
        raise ValueError(f"--variants takes the model type vllm or hf-block, got {model!r}")
    full = {"pretrained": trained}
    block = {"pretrained": trained, **({"attention_backend": "blockattn"} if model == "vllm" else {})}
    if model == "vllm":
        free = {"pretrained": base, "attention_backend": "blockattn",
                "additional_config": {"blockattn": {"sink_token": sink_token}}}
    else:
        free = {"pretrained": base, "sink_token": sink_token}
    rows = [["Full", "vllm" if model == "vllm" else "hf", json.dumps(full), "full"]]
    for seg in segmenters:
        rows.append([f"Block ({seg} segmenter)", model, json.dumps(block), f"block+{seg}"])
    rows.append([f"Training-free block ({segmenters[0]} segmenter)", model, json.dumps(free), f"block+{segmenters[0]}"])
    return rows


def write(rows: list[dict], benchmark: str, output_dir: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    table = markdown(rows, benchmark)
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(output_dir, "table.json"), "w") as f:
        json.dump({"benchmark": benchmark, "rows": rows}, f, indent=2)
    return table


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    p.add_argument("--row", nargs=4, action="append", default=[], metavar=("LABEL", "MODEL", "MODEL_ARGS", "FORM"),
                   help="run lm-eval for one row: model name (vllm, hf-block, hf), model_args (k=v,... or JSON), "
                        "form (full or block)")
    p.add_argument("--from_results", action="append", default=[], metavar="LABEL=RESULTS_JSON",
                   help="a row from an lm-eval results file (its form is read from the group it holds)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--include_path", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks"))
    p.add_argument("--metadata", default="{}", help="JSON passed to the tasks (longbench_dir, locomo_path, ...)")
    p.add_argument("--limit", type=float, default=None, help="docs per task (lm-eval --limit), for quick checks")
    p.add_argument("--gen_kwargs", default=None)
    p.add_argument("--chat_template", default="none", choices=CHAT_TEMPLATE_MODES,
                   help="none; all; official: LongBench pred.py's per-task rule (LoCoMo: all)")
    p.add_argument("--system_instruction", default=None,
                   help="system message with the chat template (lm-eval's --system_instruction); 'locomo-llama' is "
                        "the one LoCoMo's runner sends to Llama models")
    p.add_argument("--locomo_sampling", default="greedy", choices=("greedy", "official"),
                   help="official: LoCoMo runner's sampling (temperature 0.4, top-k 10, top-p 0.9)")
    p.add_argument("--variants", nargs=3, metavar=("MODEL", "TRAINED", "BASE"), default=None,
                   help="add the paper's rows: MODEL vllm or hf-block, TRAINED block-trained checkpoint, BASE "
                        "its untrained base (training-free row)")
    p.add_argument("--segmenters", default="rule,learned", help="segmenters of --variants' block rows")
    p.add_argument("--language", default="all", choices=LANGUAGES,
                   help="LongBench: all (the pack's groups over all 21 tasks) or en / zh (LongBench's leaderboard: "
                        "one language's tasks per category, code in both)")
    p.add_argument("--base_sink_token", default="<|endoftext|>", help="sink token of the training-free row")
    args = p.parse_args(argv)
    if args.variants:
        args.row += variant_rows(*args.variants, [x for x in args.segmenters.split(",") if x], args.base_sink_token)
    if not args.row and not args.from_results:
        p.error("give at least one --row, --variants or --from_results")
    if args.language != "all" and args.benchmark != "longbench":
        p.error("--language applies to --benchmark longbench")
    for _, _, _, form in args.row:
        try:
            parse_form(form)
        except ValueError as e:
            p.error(str(e))
    gen_kwargs = args.gen_kwargs
    if args.locomo_sampling == "official":
        if args.benchmark != "locomo":
            p.error("--locomo_sampling official is for --benchmark locomo")
        from vllm_blockattn.eval.locomo import OFFICIAL_SAMPLING

        gen_kwargs = OFFICIAL_SAMPLING + ("," + gen_kwargs if gen_kwargs else "")
    if args.system_instruction == "locomo-llama":
        from vllm_blockattn.eval.locomo import LLAMA_SYSTEM_PROMPT

        args.system_instruction = LLAMA_SYSTEM_PROMPT
    metadata = json.loads(args.metadata)
    rows = []
    for spec in args.from_results:
        label, sep, path = spec.partition("=")
        if not sep:
            p.error(f"--from_results expects LABEL=PATH, got {spec!r}")
        with open(path) as f:
            results = json.load(f)["results"]
        form = detect_form(results, args.benchmark)
        rows.append({"label": label, "source": path, "form": form,
                     "scores": scores_from_results(results, args.benchmark, form, args.language)})
    for i, (label, model, model_args, form) in enumerate(args.row):
        results = run_row(label, model, model_args, form, args.benchmark, args.include_path, metadata,
                          args.limit, gen_kwargs, args.chat_template, args.system_instruction)
        os.makedirs(args.output_dir, exist_ok=True)
        raw = os.path.join(args.output_dir, f"row{i}_results.json")
        with open(raw, "w") as f:
            json.dump(results, f, indent=2, default=str)
        rows.append({"label": label, "model": model, "model_args": model_args, "form": form, "source": raw,
                     "chat_template": args.chat_template, "gen_kwargs": gen_kwargs,
                     "scores": scores_from_results(results, args.benchmark, parse_form(form)[0], args.language)})
    table = write(rows, args.benchmark, args.output_dir)
    print(table)
    return table


if __name__ == "__main__":
    main()
