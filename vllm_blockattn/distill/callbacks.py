"""Always-on, dependency-free logging of a distillation run: every log (train and eval) as one JSON line."""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback


class MetricsFileCallback(TrainerCallback):
    """Append every ``on_log`` record (loss, ce, kl, accuracies, learning rate, ...) with its step to
    ``<output_dir>/metrics.jsonl`` on the main process. Works next to any ``report_to`` integration
    (TensorBoard when installed) and survives resumption (it appends)."""

    def __init__(self, path: str | None = None):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        path = self.path or os.path.join(args.output_dir, "metrics.jsonl")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")
