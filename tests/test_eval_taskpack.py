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
