"""The task pack's yamls: generated from the task tables, and all of them indexed by lm-eval."""

import filecmp
import importlib.util
import os

from vllm_blockattn.eval import locomo_metrics
from vllm_blockattn.eval.longbench import GROUPS, TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(ROOT, "eval", "tasks")


def test_yamls_are_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("gen", os.path.join(TASKS_DIR, "_generate_configs.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for folder in ("longbench", "locomo"):
        (tmp_path / folder).mkdir()
    gen.main(str(tmp_path))
    for folder in ("longbench", "locomo"):
        written = sorted(os.listdir(tmp_path / folder))
        committed = sorted(f for f in os.listdir(os.path.join(TASKS_DIR, folder)) if f.endswith(".yaml"))
        assert written == committed, folder
        _, mismatch, errors = filecmp.cmpfiles(tmp_path / folder, os.path.join(TASKS_DIR, folder), written,
                                               shallow=False)
        assert not mismatch and not errors, (mismatch, errors)


def test_lm_eval_indexes_every_task_and_group():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=TASKS_DIR, include_defaults=False)
    names = set(tm.all_tasks)
    assert len(TASKS) == 21 and len(GROUPS) == 6
    for suffix in ("", "_block"):
        assert {f"longbench_{t}{suffix}" for t in TASKS} <= names
        assert {f"longbench_{g}{suffix}" for g in GROUPS} | {f"longbench{suffix}", f"locomo{suffix}"} <= names
        assert {f"locomo_{c}{suffix}" for c in locomo_metrics.CATEGORIES.values()} <= names


def test_docs_name_no_data_path_the_repository_lacks():
    """Example data paths in the evaluation docs are either placeholders outside the repository
    (absolute) or exist in it: a relative path such as data/locomo10.json would point into the
    repository, which holds no benchmark data."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    docs = ["README.md", "docs/eval.md", "eval/tasks/README.md", "eval/results_table.py"]
    found = []
    for doc in docs:
        with open(os.path.join(root, doc), encoding="utf-8") as f:
            text = f.read()
        for m in re.finditer(r'\\?"(locomo_path|longbench_dir)\\?": \\?"([^"\\]+)', text):
            found.append((doc, m.group(2)))
    assert len(found) >= 6
    bad = [(doc, p) for doc, p in found if not os.path.isabs(p) and not os.path.exists(os.path.join(root, p))]
    assert not bad, bad
