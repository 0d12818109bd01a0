"""Evidence on CPU: block distillation recovers full-attention accuracy under block attention.

1. Train a small Qwen3-style teacher (word-level tokenizer, no sink token) under *full* attention on the
   synthetic multi-document retrieval set until it answers well.
2. Add ``<|block_sink|>`` (mean-initialised) and measure the teacher under block attention ("untrained").
3. Distil a block student from it (``BlockDistillationTrainer`` with ``teacher_cache=True``: the frozen
   teacher's outputs are computed once per training sample before training, timed separately), and, from
   the same start and on the same samples, train the block fine-tuning baseline (``BlockFinetuneTrainer``)
   for the same number of steps; a short live-teacher distillation run is timed too.
4. Print held-out answer accuracy (first answer token, greedy) and seconds per training step.

The synthetic set: 8 documents (one context block each) of one fact ``"<name> <attribute> <value> ."``.
The asked fact (question ``"<name> <attribute>"``) is stated twice, in an earlier and in a later
document with different values, and the answer is the later value (``--updates 1.0``: the latest
statement wins; ``make_retrieval_records(updates=...)``); the other documents have one attribute each.
A full-attention model can mark the later statement while reading it (it sees the earlier one);
under block attention every document is read alone, so both statements look alike and only their
order, seen from the question, tells them apart. The chat template starts with a BOS token, which a
full-attention model can lean on and which block attention hides from the documents.

Usage (about 5 minutes on 2 shared cores, one thread)::

    python train/demo_cpu.py                       # the measured table in docs/distillation.md
    python train/demo_cpu.py --student-steps 60    # a quicker, rougher run
    python train/demo_cpu.py --updates 0           # the earlier, easier task (no restated facts)
    python train/demo_cpu.py --ablations --timing-rounds 0 --live-timing-steps 0   # + the Table 5 ablations
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch


# A minimal chat template: BOS, the user turn's content, then the answer. The BOS gives the
# full-attention teacher a first token to park attention on (as real LLMs do); under block attention
# the documents cannot see it, which is one way block attention breaks a full-attention model.
DEMO_CHAT_TEMPLATE = (
    "<|endoftext|>{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% else %}{{ ' ' + m['content'] + ' <|im_end|>' }}{% endif %}{% endfor %}"
)


def build_word_tokenizer():
    """A word-level tokenizer over the synthetic set's words (no sink token)."""
    from vllm_blockattn.distill.data import retrieval_vocabulary, word_level_tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    return word_level_tokenizer(specials + ["system", "user", "assistant"] + retrieval_vocabulary(),
                                DEMO_CHAT_TEMPLATE)


def batches(samples, collator, batch_size, *, shuffle=False, seed=0):
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(samples))
    for i in range(0, len(samples), batch_size):
        yield collator([samples[j] for j in order[i:i + batch_size].tolist()])


def full_padding_mask(batch) -> torch.Tensor:
    """2D padding mask ``[B, Lf]`` of a collated batch's sink-free sequences."""
    n = batch["content_index"].max(1).values + 1
    return (torch.arange(batch["full_input_ids"].shape[1])[None] < n[:, None]).long()


@torch.no_grad()
def first_answer_logits(model, samples, collator, settings, *, block: bool, batch_size: int = 64):
    """Yields ``(logits [B, V], gold first answer token [B])`` per batch: the prediction of the first
    response token under full or block attention."""
    from vllm_blockattn.distill.data import layout_from_lengths
    from vllm_blockattn.distill.masks import pad_attention_masks
    from vllm_blockattn.core.layout import parse_block_prompt
    from vllm_blockattn.core.reference import block_attention_mask

    model.eval()
    for b in batches(samples, collator, batch_size):
        if block:
            ids, labels = b["input_ids"], b["labels"]
            if "block_lengths" in b:  # samples without sinks (the no-sinks ablation) carry their blocks
                lays = [layout_from_lengths(x) for x in b["block_lengths"].tolist()]
            else:
                lays = [parse_block_prompt(ids[i, :n].tolist(), settings) for i, n in enumerate(b["lengths"].tolist())]
            mask = pad_attention_masks([block_attention_mask(x, model.dtype) for x in lays], ids.shape[1])
            pos = torch.zeros_like(ids)
            for i, x in enumerate(lays):
                pos[i, : x.num_tokens] = torch.tensor(x.positions())
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        else:
            ids, labels = b["full_input_ids"], b["full_labels"]
            logits = model(input_ids=ids, attention_mask=full_padding_mask(b)).logits
        first = (labels != -100).long().argmax(1)  # first response token
        rows = torch.arange(ids.shape[0])
        yield logits[rows, first - 1].float(), ids[rows, first]


def accuracy(model, samples, collator, settings, *, block: bool, batch_size: int = 64) -> float:
    """Share of samples whose first answer token is the greedy prediction (full or block attention)."""
    hits = total = 0
    for logits, gold in first_answer_logits(model, samples, collator, settings, block=block, batch_size=batch_size):
        hits += (logits.argmax(-1) == gold).sum().item()
        total += gold.shape[0]
    return hits / total


def train_teacher(model, samples, eval_samples, collator, settings, *, steps, batch_size, lr, target, seed):
    """Plain full-attention SFT (CE on the response of sink-free sequences) until ``target`` accuracy."""
    from tqdm import tqdm

    from vllm_blockattn.distill.losses import token_nll

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    step, epoch, acc = 0, 0, 0.0
    bar = tqdm(total=steps, desc="teacher (full attention)")
    while step < steps:
        for b in batches(samples, collator, batch_size, shuffle=True, seed=seed + epoch):
            model.train()
            ids, labels = b["full_input_ids"], b["full_labels"]
            nll = token_nll(model(input_ids=ids, attention_mask=full_padding_mask(b)).logits, ids)
            resp = labels != -100
            loss = (nll * resp).sum() / resp.sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % 100 == 0:
                acc = accuracy(model, eval_samples, collator, settings, block=False)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
                if acc >= target:
                    bar.close()
                    return step, acc
            if step >= steps:
                break
        epoch += 1
    bar.close()
    return step, acc


class _StepTimer:
    """Trainer callback: wall seconds per optimizer step, the first (warm-up) step excluded."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer.t0)

        self.times, self.callback = [], CB()

    @property
    def seconds_per_step(self) -> float:
        t = self.times[1:] or self.times
        return sum(t) / len(t)


def train_student(kind, teacher, tokenizer, train_ds, *, steps, batch_size, lr, out, seed, teacher_cache=False,
                  **overrides):
    """Train a block student from a copy of ``teacher``; returns (trainer, step timer). ``overrides``: config
    fields of an ablation (``num_sinks=0``, ``block_dropout=False``, ``kl_weight=0``, ``use_token_weights=False``)."""
    from vllm_blockattn.distill import BlockDistillationConfig, BlockDistillationTrainer, BlockFinetuneTrainer

    settings = dict(
        output_dir=out, mode=kind, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=10, weight_decay=0.0, bf16=False,
        gradient_checkpointing=False, logging_steps=max(1, steps // 5), save_strategy="no", report_to="none",
        use_cpu=True, seed=seed, block_dropout_rate=0.6, kl_weight=1.0, ce_tau=0.1, ce_beta=0.1,
        max_length=None, dataloader_num_workers=0, teacher_cache=teacher_cache)
    args = BlockDistillationConfig(**(settings | overrides))
    timer = _StepTimer()
    cls = BlockDistillationTrainer if kind == "distill" else BlockFinetuneTrainer
    student = copy.deepcopy(teacher)
    trainer = cls(student, args, train_dataset=train_ds, processing_class=tokenizer, callbacks=[timer.callback])
    trainer.train()
    return trainer, timer


def interleaved_timing(runs, *, rounds: int, steps: int) -> list[float]:
    """Median s/step of each ``(trainer, timer)`` over ``rounds`` rounds of ``steps`` more steps, the
    trainers taking turns inside every round (so that load from other jobs on a shared machine hits them
    alike). Each round trains the already trained model further with a fresh optimizer; the first step of
    every round is left out (warm-up)."""
    import statistics

    per_run = [[] for _ in runs]
    for _ in range(rounds):
        for k, (trainer, timer) in enumerate(runs):
            trainer.args.max_steps = steps  # train() starts again at step 0, with a fresh optimizer
            timer.times = []
            trainer.train()
            if len(timer.times) != steps:
                raise RuntimeError(f"timing round ran {len(timer.times)} steps, expected {steps}")
            per_run[k].extend(timer.times[1:])
    return [statistics.median(t) for t in per_run]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--num-docs", type=int, default=8)
    ap.add_argument("--facts-per-doc", type=int, default=1)
    ap.add_argument("--arch", default="qwen3", choices=["qwen3", "llama"])
    ap.add_argument("--num-questions", type=int, default=1, help="questions per sample (denser supervision)")
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--teacher-target", type=float, default=0.995)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--student-train-samples", type=int, default=6400,
                    help="training samples of the students (the first ones of the teacher's set)")
    ap.add_argument("--live-timing-steps", type=int, default=20,
                    help="steps of a live-teacher distillation run, timed only (0: skip)")
    ap.add_argument("--timing-rounds", type=int, default=3,
                    help="rounds of interleaved timing of the three student runs after training (0: skip)")
    ap.add_argument("--timing-steps", type=int, default=10, help="steps per run and timing round")
    ap.add_argument("--updates", type=float, default=1.0,
                    help="share of samples whose asked fact is restated later with a new value (latest wins)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--teacher-lr", type=float, default=3e-3)
    ap.add_argument("--student-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ablations", action="store_true",
                    help="also distil without sinks / block dropout / KL / token weights (the paper's Table 5)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from vllm_blockattn.distill.data import BlockDataCollator, ChatBlockFormatter, make_retrieval_records
    from vllm_blockattn.distill.sinks import add_sink_token
    from vllm_blockattn.core.layout import BlockSettings
    from vllm_blockattn.tiny import build_config

    t_start = time.perf_counter()
    tokenizer = build_word_tokenizer()
    # The teacher's vocabulary has no sink token: it is added after full-attention training, as for a
    # real pretrained model. Its future id is the next free one; the formatter only needs the id.
    sink_id = len(tokenizer)
    settings = BlockSettings(sink_token_id=sink_id, num_sinks=4)
    config = build_config(a.arch, vocab_size=sink_id + 1, hidden_size=a.hidden_size, num_layers=a.num_layers,
                          num_heads=4, num_kv_heads=2, head_dim=32, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    fmt = ChatBlockFormatter(tokenizer, settings)
    recs = make_retrieval_records(a.train_samples + a.eval_samples, num_docs=a.num_docs,
                                  facts_per_doc=a.facts_per_doc, seed=a.seed, question_style="prefix",
                                  distinct_attributes=True, num_questions=a.num_questions,
                                  updates=a.updates)
    samples = [fmt(r) for r in recs]
    train, held_out = samples[: a.train_samples], samples[a.train_samples:]
    collator = BlockDataCollator(tokenizer.pad_token_id, settings)

    steps, acc_full = train_teacher(model, train, held_out, collator, settings, steps=a.teacher_steps,
                                    batch_size=a.batch_size, lr=a.teacher_lr, target=a.teacher_target, seed=a.seed)
    t_teacher = time.perf_counter() - t_start
    added = add_sink_token(tokenizer, model, num_sinks=4, init="mean")
    if added != settings:
        raise RuntimeError(f"sink token got id {added.sink_token_id}, expected {sink_id}")
    acc_full = accuracy(model, held_out, collator, settings, block=False)
    acc_block0 = accuracy(model, held_out, collator, settings, block=True)

    train_ds = Dataset.from_list(train[: a.student_train_samples])
    rows = [("full attention (teacher)", acc_full, None, None), ("block attention, untrained", acc_block0, None, None)]
    runs = [("distill", True, a.student_steps, "block distillation (cached teacher)", {}),
            ("block_finetune", False, a.student_steps, "block fine-tuning (Ma et al.)", {}),
            ("distill", True, a.student_steps, "block distillation, one student forward (CE on the dropout pattern, "
             "cached teacher)", {"ce_pattern": "dropout"})]
    if a.live_timing_steps > 0:
        runs.append(("distill", False, a.live_timing_steps, "block distillation (live teacher, timing only)", {}))
    ablations = {"w/o sinks": {"num_sinks": 0}, "w/o block dropout": {"block_dropout": False},
                 "w/o KL": {"kl_weight": 0.0}, "w/o token weights": {"use_token_weights": False},
                 "+ full-pattern KL (not in the paper)": {"full_kl_weight": 1.0}} if a.ablations else {}
    sinkless = None
    if "w/o sinks" in ablations:  # the same records formatted without sink groups
        fmt0 = ChatBlockFormatter(tokenizer, settings, sinks=False)
        sinkless = [fmt0(r) for r in recs]
        sinkless = (Dataset.from_list(sinkless[: a.student_train_samples]), sinkless[a.train_samples:])
    cache_seconds, trained = 0.0, []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, cache, steps_i, label, overrides) in enumerate(runs):
            trainer, timer = train_student(kind, model, tokenizer, train_ds, steps=steps_i, batch_size=a.batch_size,
                                           lr=a.student_lr, out=f"{tmp}/{i}", seed=a.seed, teacher_cache=cache,
                                           **overrides)
            cache_seconds += trainer.teacher_cache_seconds
            trained.append((trainer, timer))
            student, sps = trainer.model, timer.seconds_per_step
            if not cache and kind == "distill":  # the live-teacher run: timing only
                rows.append((f"{label}, {steps_i} steps", None, sps, None))
                continue
            rows.append((f"{label}, {steps_i} steps", accuracy(student, held_out, collator, settings, block=True),
                         sps, None))
            rows.append(("  ... same model under full attention", accuracy(student, held_out, collator, settings,
                                                                          block=False), None, None))
        for j, (label, overrides) in enumerate(ablations.items()):
            ds, held = sinkless if overrides.get("num_sinks") == 0 else (train_ds, held_out)
            trainer, timer = train_student("distill", model, tokenizer, ds, steps=a.student_steps,
                                           batch_size=a.batch_size, lr=a.student_lr, out=f"{tmp}/a{j}", seed=a.seed,
                                           teacher_cache=True, **overrides)
            student = trainer.model
            rows.append((f"block distillation {label} (cached teacher), {a.student_steps} steps",
                         accuracy(student, held, collator, settings, block=True), timer.seconds_per_step, None))
            rows.append(("  ... same model under full attention", accuracy(student, held, collator, settings,
                                                                          block=False), None, None))
        if a.timing_rounds > 0:
            medians = interleaved_timing(trained, rounds=a.timing_rounds, steps=a.timing_steps)
            k = 0
            for j, row in enumerate(rows):
                if row[2] is not None and k < len(medians):
                    rows[j] = (*row[:3], medians[k])
                    k += 1
    total = time.perf_counter() - t_start

    print(f"\nteacher: {steps} full-attention steps in {t_teacher:.0f} s; held-out questions: {len(held_out)}; "
          f"{a.num_docs} documents x {a.facts_per_doc} facts, updates {a.updates}; {a.arch} {a.num_layers} layers "
          f"x {a.hidden_size}; students: {a.student_train_samples} training samples")
    print(f"teacher cache: built once for {len(train_ds)} samples in {cache_seconds:.1f} s "
          f"({cache_seconds / max(1, -(-len(train_ds) // a.batch_size)):.3f} s per batch of {a.batch_size})")
    print(f"| model | held-out accuracy | s/step (batch {a.batch_size}), training run | s/step, interleaved "
          f"({a.timing_rounds} rounds x {a.timing_steps} steps, median) |")
    print("|---|---|---|---|")

    def fmt_s(x):
        return "" if x is None else f"{x:.3f}"

    for name, acc, sps, med in rows:
        print(f"| {name} | {'' if acc is None else f'{100 * acc:.1f}%'} | {fmt_s(sps)} | {fmt_s(med)} |")
    print(f"\ntotal runtime {total:.0f} s")


if __name__ == "__main__":
    main()
