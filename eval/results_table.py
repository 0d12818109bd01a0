"""Results table in the shape of the paper's Tables 3 (LongBench) and 4 (LoCoMo): one row per
(model, form) pair (Full / Block / training-free Block), one column per category, and the average.

Run the evaluations (each row is one lm-eval run of the benchmark's group in the row's form):

    python eval/results_table.py --benchmark locomo --output_dir results/locomo \\
        --row "Full" vllm "pretrained=MODEL" full \\
        --row "Block" vllm '{"pretrained": "MODEL", "attention_backend": "blockattn"}' block \\
        --row "Training-free block" hf-block "pretrained=BASE,sink_token=<|endoftext|>" block \\
        --metadata '{"locomo_path": "data/locomo10.json"}'

or tabulate lm-eval result files written earlier (``lm_eval ... --output_path``):

    python eval/results_table.py --benchmark longbench --output_dir results/lb \\
        --from_results "Full=out/full/results_x.json" --from_results "Block=out/block/results_y.json"

Writes ``table.md`` and ``table.json`` (and each run's raw lm-eval results) under ``--output_dir``.
Scores are the pack's ``score`` metric x 100.
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
                    ("Synthetic", "longbench_synthetic"), ("Code", "longbench_code"), ("Avg", "longbench")],
    },
    "locomo": {
        "group": "locomo",
        "columns": [("Multi-hop", "locomo_multi_hop"), ("Temporal", "locomo_temporal"),
                    ("Open-domain", "locomo_open_domain"), ("Single-hop", "locomo_single_hop"),
                    ("Adversarial", "locomo_adversarial"), ("Avg", "locomo")],
    },
}
FORMS = ("full", "block")


def _suffix(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return "_block" if form == "block" else ""


def detect_form(results: dict, benchmark: str) -> str:
    group = BENCHMARKS[benchmark]["group"]
    for form in FORMS:
        if group + _suffix(form) in results:
            return form
    raise ValueError(f"lm-eval results hold neither {group!r} nor {group + '_block'!r}; "
                     f"run the benchmark's group (found: {sorted(results)[:8]})")


def scores_from_results(results: dict, benchmark: str, form: str) -> dict[str, float | None]:
    """Column label -> score x 100 (None where the run did not include that category)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {sorted(BENCHMARKS)}, got {benchmark!r}")
    out = {}
    for label, name in BENCHMARKS[benchmark]["columns"]:
        entry = results.get(name + _suffix(form))
        value = None if entry is None else entry.get("score,none")
        out[label] = None if value is None or value == "N/A" else round(100.0 * float(value), 2)
    return out


def markdown(rows: Sequence[dict], benchmark: str) -> str:
    labels = [label for label, _ in BENCHMARKS[benchmark]["columns"]]
    lines = ["| Method | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for row in rows:
        cells = ["-" if row["scores"][c] is None else f"{row['scores'][c]:.2f}" for c in labels]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _model_args(text: str):
    text = text.strip()
    return json.loads(text) if text.startswith("{") else text


def run_row(label: str, model: str, model_args: str, form: str, benchmark: str, include_path: str,
            metadata: dict, limit: float | None, gen_kwargs: str | None) -> dict:
    """One lm-eval run of the benchmark's group in ``form``; returns lm-eval's results dict."""
    from vllm_blockattn.eval.__main__ import prepare

    prepare()
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    args = _model_args(model_args)
    as_dict = args if isinstance(args, dict) else simple_parse_args_string(args)
    # only the pack's groups run: skip indexing lm-eval's own task files (~20 s)
    tm = TaskManager(include_path=include_path, include_defaults=False, metadata={**as_dict, **metadata})
    group = BENCHMARKS[benchmark]["group"] + _suffix(form)
    out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=[group], limit=limit, task_manager=tm,
                                  gen_kwargs=gen_kwargs)
    return out["results"]


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
    args = p.parse_args(argv)
    if not args.row and not args.from_results:
        p.error("give at least one --row or --from_results")
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
                     "scores": scores_from_results(results, args.benchmark, form)})
    for i, (label, model, model_args, form) in enumerate(args.row):
        results = run_row(label, model, model_args, form, args.benchmark, args.include_path, metadata,
                          args.limit, args.gen_kwargs)
        os.makedirs(args.output_dir, exist_ok=True)
        raw = os.path.join(args.output_dir, f"row{i}_results.json")
        with open(raw, "w") as f:
            json.dump(results, f, indent=2, default=str)
        rows.append({"label": label, "model": model, "model_args": model_args, "form": form, "source": raw,
                     "scores": scores_from_results(results, args.benchmark, form)})
    table = write(rows, args.benchmark, args.output_dir)
    print(table)
    return table


if __name__ == "__main__":
    main()
