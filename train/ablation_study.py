"""Ablation study of block distillation with seeds and paired bootstrap intervals (CPU).

What it runs (docs/distillation.md, "Ablation study with intervals"):

1. For every teacher seed: a Qwen3-style teacher (default 4 layers x 128) trained from scratch under full attention
   with the LM loss on **all** tokens of sequences that start with a BOS, plus the answer tokens' mean CE
   (``--teacher-answer-weight``), on the fact-lookup task of ``vllm_blockattn.distill.ablation_task`` (the key
   at every block's first token, multi-token templated answers, a later block that restates an asked fact).
   Then ``<|block_sink|>`` is added (mean-initialised) and the teacher is measured: answer accuracy under full
   and block attention, and the mean attention mass every head puts on the BOS.
2. For every student seed (the training subset drawn from the teacher's pool, its order, the dropout draws) and
   every arm, a student is trained from the teacher for a fixed number of steps with the project's trainers
   (``BlockDistillationTrainer`` / ``BlockFinetuneTrainer``, ``ce_normalization: weights``, teacher outputs
   precomputed once per teacher and format), with a learning curve (block-attention exact match every
   ``--curve-every`` steps), then scored on the teacher's held-out questions: exact match of the whole answer,
   answer NLL and KL(teacher full || student) under block attention; the same under full attention on the
   sink-free sequence and on the sink-bearing one (retention).
3. Every finished run is one line of ``<out>/runs.jsonl`` (per-question values included), so a partial run is
   usable and a rerun with the same arguments skips what is done. The summary (``summary.json``), the table
   (``table.md``: each arm's mean and every arm minus the full method, with paired bootstrap 95% intervals) and
   the learning-curve plot (``curves.png``, when matplotlib is installed) are computed from whatever
   ``runs.jsonl`` holds (``--table-only`` redoes just that).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python train/ablation_study.py --out docs/results/ablation   # the study (~1 h)
    python train/ablation_study.py --out /tmp/abl --quick        # seconds: a tiny end-to-end smoke run
    python train/ablation_study.py --out docs/results/ablation --table-only   # table from runs.jsonl

``--teacher-recipe prose-lm`` (the follow-up in docs/distillation.md, results in docs/results/ablation_sink/): every
teacher step also trains the LM loss on ``--prose-batch`` windows of ``--prose-len`` prose tokens after a BOS (Jane
Austen's novels from Debian's r-cran-janeaustenr; ``--prose-dir synthetic`` for a stand-in), with the prose's
``--prose-vocab`` most frequent words added to the vocabulary; ``--teachers-only`` stops after measuring the
teachers (a recipe's pilot). The default recipe (``task-lm``) and its saved teachers are unchanged.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

ARMS = {
    # name: (trainer mode, config overrides, label)
    "full": ("distill", {}, "block distillation, full method"),
    "block_ft": ("block_finetune", {}, "Block-FT (Ma et al.)"),
    "no_sinks": ("distill", {"num_sinks": 0}, "w/o sinks (`num_sinks: 0`)"),
    "no_dropout": ("distill", {"block_dropout": False}, "w/o block dropout (`block_dropout: false`)"),
    "no_token_weights": ("distill", {"use_token_weights": False}, "w/o token weights (`use_token_weights: false`)"),
    "no_kl": ("distill", {"kl_weight": 0.0}, "w/o KL (`kl_weight: 0`)"),
}
DEFAULT_ARMS = ["full", "block_ft", "no_sinks", "no_dropout", "no_token_weights"]
NUM_SINKS = 4


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="results folder (runs.jsonl, summary.json, table.md, curves.png)")
    ap.add_argument("--work-dir", default=None, help="teacher checkpoints (default <repo>/outputs/ablation_work)")
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the whole pipeline")
    ap.add_argument("--table-only", action="store_true", help="only rebuild summary/table/plot from runs.jsonl")
    ap.add_argument("--teachers-only", action="store_true",
                    help="train (or load) and measure the teachers, no students (a pilot of a teacher recipe)")
    ap.add_argument("--teacher-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--student-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    ap.add_argument("--num-docs", type=int, default=6)
    ap.add_argument("--updates", type=float, default=0.7)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--teacher-batch", type=int, default=32)
    ap.add_argument("--teacher-lr", type=float, default=3e-3)
    ap.add_argument("--teacher-samples", type=int, default=20000)
    ap.add_argument("--teacher-weight-decay", type=float, default=0.01)
    ap.add_argument("--teacher-answer-weight", type=float, default=1.0,
                    help="the teacher's loss: LM loss on every token + this x the mean CE of the answer tokens")
    ap.add_argument("--teacher-recipe", choices=["task-lm", "prose-lm"], default="task-lm",
                    help="task-lm: the teacher sees the task only; prose-lm: every step also trains the LM loss on "
                         "--prose-batch windows of prose (BOS first), so that heads can form the attention-sink habit "
                         "of language models; the vocabulary adds the prose's most frequent words")
    ap.add_argument("--prose-dir", default=None,
                    help="prose-lm: janeaustenr's data directory (default: the installed package's, else the Debian "
                         "package fetched with apt-get download into <work-dir>/debs); 'synthetic': a built-in "
                         "stand-in (tests)")
    ap.add_argument("--prose-vocab", type=int, default=1000, help="prose-lm: prose words added to the vocabulary")
    ap.add_argument("--prose-len", type=int, default=128, help="prose-lm: tokens per prose window, BOS included")
    ap.add_argument("--prose-batch", type=int, default=16, help="prose-lm: prose windows per teacher step")
    ap.add_argument("--student-pool", type=int, default=2000, help="samples each student subset is drawn from")
    ap.add_argument("--student-samples", type=int, default=512, help="training samples of one student")
    ap.add_argument("--low-data-samples", type=int, default=64,
                    help="training samples of one student in the low-data condition, run after the main grid (0: none)")
    ap.add_argument("--low-data-arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    ap.add_argument("--student-steps", type=int, default=120)
    ap.add_argument("--student-batch", type=int, default=16)
    ap.add_argument("--student-lr", type=float, default=5e-4)
    ap.add_argument("--eval-samples", type=int, default=400)
    ap.add_argument("--curve-every", type=int, default=20)
    ap.add_argument("--curve-samples", type=int, default=200)
    ap.add_argument("--bootstrap-reps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.quick:
        a.teacher_seeds, a.student_seeds = a.teacher_seeds[:1], a.student_seeds[:2]
        a.hidden_size, a.num_layers, a.num_docs = 64, 2, 3
        a.teacher_steps, a.teacher_batch, a.teacher_samples = 6, 8, 64
        a.student_pool, a.student_samples, a.student_steps, a.student_batch = 24, 16, 3, 4
        a.low_data_samples, a.low_data_arms = 8, ["full", "block_ft"]
        a.eval_samples, a.curve_every, a.curve_samples, a.bootstrap_reps = 8, 2, 4, 50
        a.prose_vocab, a.prose_len, a.prose_batch = 50, 16, 4
    return a


# --- setup --------------------------------------------------------------------------------------------

def provenance(argv) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.relpath(sys.argv[0], root) if sys.argv and sys.argv[0] else
                                 "train/ablation_study.py", *(argv if argv is not None else sys.argv[1:])]),
            "python": platform.python_version(), "torch": torch.__version__}


def prose_source(a, work_dir) -> tuple[str, dict]:
    """(the prose text, its provenance): Jane Austen's six novels from Debian's r-cran-janeaustenr (public-domain
    texts in an MIT package; ``--prose-dir``, the installed package, or the .deb fetched into <work-dir>/debs),
    or the synthetic stand-in (``--prose-dir synthetic``)."""
    from vllm_blockattn.distill.ablation_task import synthetic_prose

    if a.prose_dir == "synthetic":
        return synthetic_prose(), {"source": "synthetic stand-in (vllm_blockattn.distill.ablation_task)"}
    from vllm_blockattn.segmenter.corpora import austen_documents, janeaustenr_data

    data_dir, version = a.prose_dir, None
    if data_dir is None:
        data_dir, version = janeaustenr_data(work_dir)
    docs = austen_documents(data_dir)
    if not docs:
        raise SystemExit(f"no novels found in {data_dir}")
    text = "\n\n".join("\n\n".join(d.sections) for d in docs)
    return text, {"source": "Jane Austen's novels, Debian r-cran-janeaustenr (MIT; texts public domain)",
                  "version": version or "installed", "novels": [d.source for d in docs], "chars": len(text)}


class Task:
    """Tokenizer, formatters and collators of the profile task (with and without sink groups); with the prose-lm
    recipe also the prose as token ids."""

    def __init__(self, a, work_dir=None):
        from vllm_blockattn.core.layout import BlockSettings
        from vllm_blockattn.distill.ablation_task import build_prose_tokenizer, build_tokenizer, prose_words
        from vllm_blockattn.distill.data import BlockDataCollator, ChatBlockFormatter

        self.a = a
        self.prose_ids, self.prose_info = None, None
        if a.teacher_recipe == "prose-lm":
            text, self.prose_info = prose_source(a, work_dir)
            words = prose_words(text)
            self.tokenizer = build_prose_tokenizer(words, a.prose_vocab)
            vocab = self.tokenizer.get_vocab()
            unk = vocab["[UNK]"]
            self.prose_ids = torch.tensor([vocab.get(w, unk) for w in words])
            self.prose_info |= {"tokens": len(words), "unk_share": round((self.prose_ids == unk).float().mean().item(), 4),
                                "vocab_size": len(self.tokenizer)}
        else:
            self.tokenizer = build_tokenizer()
        # the sink token is added after the teacher's full-attention training; its future id is the next free one
        self.settings = BlockSettings(sink_token_id=len(self.tokenizer), num_sinks=NUM_SINKS)
        self.fmt = ChatBlockFormatter(self.tokenizer, self.settings)
        self.fmt0 = ChatBlockFormatter(self.tokenizer, self.settings, sinks=False)
        self.collator = BlockDataCollator(self.tokenizer.pad_token_id, self.settings)

    def records(self, n, seed):
        from vllm_blockattn.distill.ablation_task import make_profile_records

        return make_profile_records(n, num_docs=self.a.num_docs, updates=self.a.updates, seed=seed)

    def samples(self, recs, sinks=True):
        fmt = self.fmt if sinks else self.fmt0
        return [fmt({k: r[k] for k in ("context", "question", "answer")}) for r in recs]


def lm_batches(samples, collator, batch_size, seed):
    epoch = 0
    while True:
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collator([samples[j] for j in order[i:i + batch_size]])
        epoch += 1


def prose_batches(ids, bos, length, batch_size, seed):
    """Random windows of ``length - 1`` prose tokens, each after a BOS: ``[batch_size, length]``."""
    g = torch.Generator().manual_seed(70_000 + seed)
    offsets = torch.arange(length - 1)
    while True:
        start = torch.randint(0, len(ids) - length, (batch_size,), generator=g)
        win = ids[start[:, None] + offsets[None]]
        yield torch.cat([torch.full((batch_size, 1), bos), win], 1)


def prose_lm_loss(model, x):
    logits = model(input_ids=x).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:])


def train_teacher(task, seed, work_dir, log):
    """Train (or load) the teacher of ``seed``: LM loss on every token of the sink-free sequence (BOS first)."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from vllm_blockattn.distill.ablation_task import answer_metrics, first_token_attention, view_inputs
    from vllm_blockattn.tiny import build_config

    a = task.a
    path = os.path.join(work_dir, f"teacher{seed}")
    done = os.path.join(path, "teacher.json")
    if os.path.exists(done):
        with open(done) as f:
            info = json.load(f)
        stored = info.get("recipe") or {}
        if a.teacher_recipe != "task-lm":  # saved before --teacher-weight-decay existed: the default 0.01 then
            stored = {"teacher_weight_decay": 0.01, **stored}
        if stored == teacher_recipe(a):
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa"), info
    torch.manual_seed(1000 + seed)
    sink_id = task.settings.sink_token_id
    config = build_config("qwen3", vocab_size=sink_id + 1, hidden_size=a.hidden_size, num_layers=a.num_layers,
                          num_heads=4, num_kv_heads=2, head_dim=max(32, a.hidden_size // 4),
                          eos_token_id=task.tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    train = task.samples(task.records(a.teacher_samples, seed=10_000 + seed), sinks=False)
    held_out = task.samples(task.records(200, seed=50_000 + seed), sinks=False)
    curve = []
    prose = task.prose_ids is not None
    if prose:  # the last 5% of the prose is held out (its LM loss is logged)
        cut = int(0.95 * len(task.prose_ids))
        bos = task.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        prose_it = prose_batches(task.prose_ids[:cut], bos, a.prose_len, a.prose_batch, seed)
        prose_eval = next(prose_batches(task.prose_ids[cut:], bos, a.prose_len, 32, 999))
    prose_losses = []
    opt = torch.optim.AdamW(model.parameters(), lr=a.teacher_lr, weight_decay=a.teacher_weight_decay)
    warm = max(1, a.teacher_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.1, 1 - (s - warm) / max(1, a.teacher_steps - warm))))
    t0 = time.perf_counter()
    bar = tqdm(total=a.teacher_steps, desc=f"teacher {seed} (LM, full attention)", mininterval=5)
    model.train()
    losses = []
    for step, b in zip(range(a.teacher_steps), lm_batches(train, task.collator, a.teacher_batch, seed)):
        kwargs, ids, labels = view_inputs(b, None, "full")
        logits = model(**kwargs).logits[:, :-1].float()
        n = b["content_index"].max(1).values + 1
        real = torch.arange(1, ids.shape[1])[None] < n[:, None]  # every next token of the real sequence
        answer = labels[:, 1:] != -100
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        lm = (nll * real).sum() / real.sum()
        loss = lm + a.teacher_answer_weight * (nll * answer).sum() / answer.sum()
        if prose:
            p_loss = prose_lm_loss(model, next(prose_it))
            loss = loss + p_loss
            prose_losses.append(p_loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(lm.item())
        bar.update(1)
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
        if (step + 1) % max(1, a.teacher_steps // 6) == 0 or step + 1 == a.teacher_steps:
            em = answer_metrics(model, held_out, task.collator, task.settings, "full")["em"]
            curve.append([step + 1, round(sum(losses[-50:]) / len(losses[-50:]), 4), sum(em) / len(em)])
            msg = f"teacher {seed} step {step + 1}: LM loss {curve[-1][1]:.3f}, full-attention EM {curve[-1][2]:.3f}"
            if prose:  # held-out prose loss, block EM without sinks, the heads' BOS attention on the task
                with torch.no_grad():
                    model.eval()
                    p_eval = prose_lm_loss(model, prose_eval).item()
                    model.train()
                attn = first_token_attention(model, held_out[:64], task.collator)
                em0 = answer_metrics(model, held_out, task.collator, task.settings, "block")["em"]
                curve[-1] += [round(p_eval, 4), sum(em0) / len(em0), round(attn.max().item(), 4),
                              int((attn > 0.3).sum())]
                msg += (f", prose loss {p_eval:.3f}, block EM (no sinks) {curve[-1][4]:.3f}, BOS attention max head "
                        f"{attn.max():.2f}, heads > 0.3: {curve[-1][6]} of {attn.numel()}")
            log(msg)
    bar.close()
    info = {"recipe": teacher_recipe(a), "seconds": time.perf_counter() - t0,
            "final_lm_loss": sum(losses[-50:]) / len(losses[-50:]), "curve": curve}
    if prose:
        info |= {"final_prose_loss": sum(prose_losses[-50:]) / len(prose_losses[-50:]), "prose": task.prose_info}
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    with open(done, "w") as f:
        json.dump(info, f)
    log(f"teacher {seed}: {a.teacher_steps} steps in {info['seconds']:.0f} s, LM loss {info['final_lm_loss']:.3f}")
    return model, info


def teacher_recipe(a) -> dict:
    keys = ["hidden_size", "num_layers", "teacher_steps", "teacher_batch", "teacher_lr", "teacher_samples",
            "teacher_answer_weight", "num_docs", "updates"]
    if a.teacher_recipe != "task-lm":  # the old recipe's dict is unchanged, so its saved teachers still load
        keys += ["teacher_recipe", "prose_dir", "prose_vocab", "prose_len", "prose_batch", "teacher_weight_decay"]
    return {k: getattr(a, k) for k in keys}


# --- students -----------------------------------------------------------------------------------------

def _bits(xs):
    return "".join("1" if x >= 0.5 else "0" for x in xs)


def _round(xs):
    return [round(float(x), 4) for x in xs]


def score(model, task, ev, teacher_lp, block_sinks=True):
    """Held-out metrics of ``model``: per-question lists under block / full / full-with-sinks attention."""
    from vllm_blockattn.distill.ablation_task import answer_metrics

    out = {}
    views = [("block", ev["sinks"] if block_sinks else ev["nosinks"]), ("full", ev["sinks"]),
             ("full_sinks", ev["sinks"])]
    for view, samples in views:
        m = answer_metrics(model, samples, task.collator, task.settings, view, teacher_lp)
        out[view] = {"em": _bits(m["em"]), "nll": _round(m["nll"]), "kl": _round(m["kl"])}
    return out


def make_curve_callback(task, curve_samples, every, curve):
    from transformers import TrainerCallback

    from vllm_blockattn.distill.ablation_task import answer_metrics

    def point(model, step):
        m = answer_metrics(model, curve_samples, task.collator, task.settings, "block")
        curve.append([step, sum(m["em"]) / len(m["em"]), sum(m["nll"]) / len(m["nll"])])

    class Curve(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            point(model, 0)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % every == 0 or state.global_step == args.max_steps:
                point(model, state.global_step)

    return Curve()


def train_student(arm, teacher, tokenizer, task, train_ds, caches, curve_samples, out_dir, seed):
    """Train one arm's student from a copy of ``teacher`` (``tokenizer`` already holds the sink token)."""
    from transformers import PrinterCallback

    from vllm_blockattn.distill import BlockDistillationConfig, BlockDistillationTrainer, BlockFinetuneTrainer

    a = task.a
    mode, overrides, _ = ARMS[arm]
    settings = dict(
        output_dir=out_dir, mode=mode, max_steps=a.student_steps, per_device_train_batch_size=a.student_batch,
        learning_rate=a.student_lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, a.student_steps // 20),
        weight_decay=0.0, bf16=False, gradient_checkpointing=False, logging_steps=max(1, a.student_steps // 4),
        save_strategy="no", report_to="none", use_cpu=True, seed=seed, data_seed=seed, block_dropout_rate=0.6,
        kl_weight=1.0, ce_tau=0.1, ce_beta=0.1, ce_normalization="weights", max_length=None,
        dataloader_num_workers=0, disable_tqdm=True, num_sinks=NUM_SINKS)
    args = BlockDistillationConfig(**(settings | overrides))
    sinks = args.num_sinks > 0
    curve: list = []
    cb = make_curve_callback(task, curve_samples, a.curve_every, curve)
    cls = BlockFinetuneTrainer if mode == "block_finetune" else BlockDistillationTrainer
    trainer = cls(copy.deepcopy(teacher), args, train_dataset=train_ds, processing_class=copy.deepcopy(tokenizer),
                  callbacks=[cb])
    trainer.remove_callback(PrinterCallback)  # the study logs one line per run
    if mode == "distill" and args.needs_teacher:
        # The teacher is frozen, so its outputs depend on the sample only: computed once per teacher and sample
        # format over the whole pool (BlockDistillationTrainer.build_teacher_cache), shared by every run.
        key = "sinks" if sinks else "nosinks"
        if key not in caches["cache"]:
            trainer.build_teacher_cache(caches["pool_ds"][key])
            caches["cache"][key] = trainer.teacher_cache
            caches["seconds"][key] = trainer.teacher_cache_seconds
        trainer.teacher_cache = caches["cache"][key]
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    hits = trainer._metrics["train"].get("teacher_cache_hit", [])
    if hits and min(hits) < 1:
        raise RuntimeError(f"arm {arm}: a training batch missed the teacher cache")
    return trainer.model, curve, seconds


def run_units(a, task, out, work_dir, log):
    from datasets import Dataset
    from tqdm import tqdm

    from vllm_blockattn.distill.ablation_task import answer_logprobs, answer_metrics, first_token_attention
    from vllm_blockattn.distill.sinks import add_sink_token

    raw = os.path.join(out, "runs.jsonl")
    done = {(r["kind"], r["teacher_seed"], r.get("student_seed"), r.get("arm"), r.get("condition"))
            for r in read_runs(raw)}

    def write(rec):
        with open(raw, "a") as f:
            f.write(json.dumps(rec) + "\n")

    teachers = {}
    for t in a.teacher_seeds:
        model, info = train_teacher(task, t, work_dir, log)
        tok = copy.deepcopy(task.tokenizer)
        added = add_sink_token(tok, model, num_sinks=NUM_SINKS, init="mean")
        if added.sink_token_id != task.settings.sink_token_id:
            raise RuntimeError(f"sink token got id {added.sink_token_id}, expected {task.settings.sink_token_id}")
        ev_recs = task.records(a.eval_samples, seed=20_000 + t)
        ev = {"sinks": task.samples(ev_recs), "nosinks": task.samples(ev_recs, sinks=False),
              "updated": _bits([r["updated"] for r in ev_recs])}
        teacher_lp = [lp for lp, _ in answer_logprobs(model, ev["sinks"], task.collator, task.settings, "full")]
        pool_recs = task.records(a.student_pool, seed=30_000 + t)
        pool = {"sinks": task.samples(pool_recs), "nosinks": task.samples(pool_recs, sinks=False)}
        caches = {"pool_ds": {k: Dataset.from_list(v) for k, v in pool.items()}, "cache": {}, "seconds": {}}
        teachers[t] = (model, tok, ev, teacher_lp, pool, caches)
        if ("teacher", t, None, None, None) not in done:
            attn = first_token_attention(model, ev["sinks"][:128], task.collator)
            res = score(model, task, ev, teacher_lp)
            res["block_nosinks"] = {k: (_bits(v) if k == "em" else _round(v)) for k, v in answer_metrics(
                model, ev["nosinks"], task.collator, task.settings, "block", teacher_lp).items()}
            extra = {}
            if task.prose_ids is not None:  # the heads' BOS attention on held-out prose (32 windows, BOS first)
                from vllm_blockattn.distill.ablation_task import first_token_attention_ids

                cut = int(0.95 * len(task.prose_ids))
                bos = task.tokenizer.convert_tokens_to_ids("<|endoftext|>")
                windows = next(prose_batches(task.prose_ids[cut:], bos, a.prose_len, 32, 999))
                extra["bos_attention_prose"] = [[round(x, 4) for x in row]
                                                for row in first_token_attention_ids(model, windows).tolist()]
            write({"kind": "teacher", "teacher_seed": t, **info, "updated": ev["updated"],
                   "bos_attention": [[round(x, 4) for x in row] for row in attn.tolist()], "metrics": res, **extra})
            log(f"teacher {t}: full EM {mean_bits(res['full']['em']):.3f}, block EM {mean_bits(res['block']['em']):.3f}"
                f" (no sinks {mean_bits(res['block_nosinks']['em']):.3f}); BOS attention mass: max head "
                f"{attn.max():.2f}, heads > 0.5: {(attn > 0.5).sum().item()} of {attn.numel()}")
    if a.teachers_only:
        return
    grid = [("main", a.student_samples, a.arms)]
    if a.low_data_samples > 0:
        grid.append(("low_data", a.low_data_samples, a.low_data_arms))
    todo = [(cond, n, s, t, arm) for cond, n, arms in grid for s in a.student_seeds for t in a.teacher_seeds
            for arm in arms if ("student", t, s, arm, cond) not in done]
    bar = tqdm(todo, desc="students", mininterval=5)
    for cond, n, s, t, arm in bar:
        bar.set_postfix(cond=cond, teacher=t, seed=s, arm=arm)
        model, tok, ev, teacher_lp, pool, caches = teachers[t]
        g = torch.Generator().manual_seed(40_000 + 100 * t + s)
        idx = torch.randperm(a.student_pool, generator=g)[:n].tolist()  # the low-data subset starts the main one
        sinks = ARMS[arm][1].get("num_sinks", NUM_SINKS) > 0
        key = "sinks" if sinks else "nosinks"
        train_ds = Dataset.from_list([pool[key][i] for i in idx])
        curve_samples = (ev[key])[: a.curve_samples]
        with _tmpdir(work_dir) as tmp:
            student, curve, seconds = train_student(arm, model, tok, task, train_ds, caches, curve_samples, tmp, s)
        res = score(student, task, ev, teacher_lp, block_sinks=sinks)
        write({"kind": "student", "condition": cond, "teacher_seed": t, "student_seed": s, "arm": arm,
               "steps": a.student_steps, "train_samples": n, "seconds": round(seconds, 1),
               "teacher_cache_seconds": {k: round(v, 1) for k, v in caches["seconds"].items()},
               "curve": [[c[0], round(c[1], 4), round(c[2], 4)] for c in curve], "metrics": res})
        log(f"{cond}: teacher {t} seed {s} {arm}: block EM {mean_bits(res['block']['em']):.3f}, full EM "
            f"{mean_bits(res['full']['em']):.3f}, {seconds:.0f} s")


class _tmpdir:
    def __init__(self, parent):
        import tempfile

        os.makedirs(parent, exist_ok=True)
        self._d = tempfile.TemporaryDirectory(dir=parent)

    def __enter__(self):
        return self._d.name

    def __exit__(self, *exc):
        self._d.cleanup()


# --- summary ------------------------------------------------------------------------------------------

def read_runs(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def mean_bits(s: str) -> float:
    return sum(c == "1" for c in s) / max(1, len(s))


def _values(m: dict, metric: str) -> list[float]:
    v = m[metric]
    return [float(c == "1") for c in v] if isinstance(v, str) else list(v)


METRICS = [("block", "em", "block EM"), ("block", "nll", "answer NLL (block)"),
           ("block", "kl", "KL(T full \\|\\| S block)"),
           ("full", "em", "full EM (retention)"), ("full_sinks", "em", "full EM with sinks")]


def summarize(runs: list[dict], reps: int, arms_order=None) -> dict:
    """Per arm: the mean and bootstrap interval of every metric, and the paired difference to the full method;
    the untrained teacher too (as the arm ``teacher``), and the learning curves (mean per step)."""
    from vllm_blockattn.distill.ablation_stats import mean_interval, paired_bootstrap

    teachers = {r["teacher_seed"]: r for r in runs if r["kind"] == "teacher"}
    students = [r for r in runs if r["kind"] == "student"]
    arms = arms_order or list(dict.fromkeys(r["arm"] for r in students))
    per_arm = {arm: {(r["teacher_seed"], r["student_seed"]): r for r in students if r["arm"] == arm} for arm in arms}
    # the untrained teacher as a pseudo-arm: one "unit" per student seed of the full method, so pairing works
    ref_units = per_arm.get("full", {})
    per_arm["teacher"] = {u: teachers[u[0]] for u in ref_units if u[0] in teachers} or {
        (t, 0): r for t, r in teachers.items()}
    out = {"n_runs": len(students), "teachers": {}, "arms": {}}
    for t, r in sorted(teachers.items()):
        attn = torch.tensor(r["bos_attention"])
        out["teachers"][str(t)] = {
            "seconds": r.get("seconds"), "final_lm_loss": r.get("final_lm_loss"),
            "updated_share": mean_bits(r["updated"]),
            **{f"{v}_{m}": sum(_values(r["metrics"][v], m)) / len(_values(r["metrics"][v], m))
               for v in ("full", "block", "block_nosinks", "full_sinks") for m in ("em", "nll")},
            "bos_attention_mean": attn.mean().item(), "bos_attention_max_head": attn.max().item(),
            "heads_over_half_on_bos": int((attn > 0.5).sum()), "heads": attn.numel(),
            "bos_attention_per_layer": attn.mean(1).tolist()}
        if r.get("bos_attention_prose"):
            pa = torch.tensor(r["bos_attention_prose"])
            out["teachers"][str(t)] |= {"bos_attention_prose_mean": pa.mean().item(),
                                        "bos_attention_prose_max_head": pa.max().item(),
                                        "heads_over_half_on_bos_prose": int((pa > 0.5).sum()),
                                        "final_prose_loss": r.get("final_prose_loss")}
    for arm in ["teacher", *arms]:
        units = per_arm[arm]
        row = {"n_units": len(units), "n_teacher_seeds": len({u[0] for u in units}), "metrics": {}}
        for view, metric, _ in METRICS:
            vals = {u: _values(r["metrics"][view], metric) for u, r in units.items()}
            cell = {"mean": mean_interval(vals, reps=reps)}
            if arm != "full" and "full" in per_arm:
                ref = {u: _values(r["metrics"][view], metric) for u, r in per_arm["full"].items()}
                cell["minus_full"] = paired_bootstrap(vals, ref, reps=reps)
            row["metrics"][f"{view}_{metric}"] = cell
        if arm != "teacher":
            curves: dict = {}
            for r in units.values():
                for step, em, _ in r["curve"]:
                    curves.setdefault(step, []).append(em)
            row["curve_block_em"] = [[s, sum(v) / len(v), len(v)] for s, v in sorted(curves.items())]
            if arm != "full" and "full" in per_arm:  # per step, units resampled (one curve value per unit)
                at = {u: {c[0]: c[1] for c in r["curve"]} for u, r in units.items()}
                ref = {u: {c[0]: c[1] for c in r["curve"]} for u, r in per_arm["full"].items()}
                row["curve_minus_full"] = {str(step): paired_bootstrap(
                    {u: [v[step]] for u, v in at.items() if step in v},
                    {u: [v[step]] for u, v in ref.items() if step in v}, reps=reps) for step in sorted(curves)}
            row["seconds_mean"] = sum(r["seconds"] for r in units.values()) / max(1, len(units))
        row["per_teacher"] = {}
        for t in sorted({u[0] for u in units}):
            rs = [r for u, r in units.items() if u[0] == t]
            row["per_teacher"][str(t)] = {"n": len(rs), **{
                f"{v}_em": sum(mean_bits(r["metrics"][v]["em"]) for r in rs) / len(rs) for v in ("block", "full",
                                                                                             "full_sinks")}}
        out["arms"][arm] = row
    return out


def _pct(x):
    return "" if x is None else f"{100 * x:.1f}"


def _fmt(cell, pct):
    f = _pct if pct else (lambda x: "" if x is None else f"{x:.3f}")
    return f"{f(cell['mean'])} [{f(cell['lo'])}, {f(cell['hi'])}]"


def _fmt_diff(cell, pct):
    if cell is None or cell["diff"] is None:
        return ""
    f = (lambda x: f"{100 * x:+.1f}") if pct else (lambda x: f"{x:+.3f}")
    return f"{f(cell['diff'])} [{f(cell['lo'])}, {f(cell['hi'])}]"


def table(summary: dict, labels: dict) -> str:
    lines = ["| arm | n | " + " | ".join(name for _, _, name in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for arm, row in summary["arms"].items():
        cells = [_fmt(row["metrics"][f"{v}_{m}"]["mean"], m == "em") for v, m, _ in METRICS]
        lines.append(f"| {labels.get(arm, arm)} | {row['n_units']} | " + " | ".join(cells) + " |")
    lines += ["", "Difference to the full method (arm minus full; paired bootstrap 95% interval):", "",
              "| arm | n pairs | " + " | ".join(f"delta {name}" for _, _, name in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    for arm, row in summary["arms"].items():
        if arm == "full":
            continue
        cells = [_fmt_diff(row["metrics"][f"{v}_{m}"].get("minus_full"), m == "em") for v, m, _ in METRICS]
        n = row["metrics"]["block_em"].get("minus_full", {}).get("n_units", 0)
        lines.append(f"| {labels.get(arm, arm)} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def detail_tables(summary: dict, labels: dict) -> str:
    """Per teacher seed (means over student seeds) and the learning curves (block EM on the curve subset)."""
    seeds = sorted({t for row in summary["arms"].values() for t in row.get("per_teacher", {})})
    lines = ["Per teacher seed (mean over student seeds; block EM / full EM / full EM with sinks, %):", "",
             "| arm | " + " | ".join(f"teacher {t}" for t in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for arm, row in summary["arms"].items():
        cells = []
        for t in seeds:
            c = row.get("per_teacher", {}).get(t)
            cells.append("" if c is None else
                         f"{_pct(c['block_em'])} / {_pct(c['full_em'])} / {_pct(c['full_sinks_em'])} (n={c['n']})")
        lines.append(f"| {labels.get(arm, arm)} | " + " | ".join(cells) + " |")
    steps = sorted({p[0] for row in summary["arms"].values() for p in row.get("curve_block_em", [])})
    lines += ["", "Learning curves (block EM on the curve subset, %, mean over units):", "",
              "| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for arm, row in summary["arms"].items():
        if row.get("curve_block_em"):
            at = {p[0]: p[1] for p in row["curve_block_em"]}
            lines.append(f"| {labels.get(arm, arm)} | " + " | ".join(_pct(at.get(s)) for s in steps) + " |")
    lines += ["", "Learning curves, arm minus full method (block EM points; paired bootstrap 95% interval over "
              "units, the curve subset fixed):", "",
              "| arm | " + " | ".join(f"step {s}" for s in steps if s) + " |",
              "|---|" + "---|" * len([s for s in steps if s])]
    for arm, row in summary["arms"].items():
        if row.get("curve_minus_full"):
            lines.append(f"| {labels.get(arm, arm)} | " + " | ".join(
                _fmt_diff(row["curve_minus_full"].get(str(s)), True) for s in steps if s) + " |")
    return "\n".join(lines) + "\n"


def teacher_table(summary: dict) -> str:
    lines = ["| teacher seed | LM loss | full EM | block EM (mean-init sinks) | block EM (no sinks) | "
             "full EM, sinks in sequence | mean BOS attention | max head | heads > 0.5 on BOS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t, r in summary["teachers"].items():
        lines.append(f"| {t} | {r['final_lm_loss']:.3f} | {_pct(r['full_em'])} | {_pct(r['block_em'])} | "
                     f"{_pct(r['block_nosinks_em'])} | {_pct(r['full_sinks_em'])} | {r['bos_attention_mean']:.2f} | "
                     f"{r['bos_attention_max_head']:.2f} | {r['heads_over_half_on_bos']} of {r['heads']} |")
    prose = {t: r for t, r in summary["teachers"].items() if "bos_attention_prose_max_head" in r}
    if prose:
        lines += ["", "On held-out prose (32 windows, BOS first; query positions >= 4):", "",
                  "| teacher seed | prose LM loss (train, last 50 steps) | mean BOS attention | max head | "
                  "heads > 0.5 on BOS |", "|---|---|---|---|---|"]
        for t, r in prose.items():
            lines.append(f"| {t} | {r['final_prose_loss']:.3f} | {r['bos_attention_prose_mean']:.2f} | "
                         f"{r['bos_attention_prose_max_head']:.2f} | {r['heads_over_half_on_bos_prose']} of "
                         f"{r['heads']} |")
    return "\n".join(lines) + "\n"


def plot(conditions: dict, labels: dict, path: str) -> bool:
    """Learning curves (block-attention exact match on the curve subset, mean over units), one panel per
    condition."""
    if not conditions:  # teachers only: no curves
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(conditions), figsize=(6.5 * len(conditions), 4.5), squeeze=False)
    for ax, (cond, summary) in zip(axes[0], conditions.items()):
        for arm, row in summary["arms"].items():
            if row.get("curve_block_em"):
                steps, ems, _ = zip(*row["curve_block_em"])
                ax.plot(steps, [100 * e for e in ems], marker="o", ms=3,
                        label=f"{labels.get(arm, arm)} (n={row['n_units']})")
        ax.set_title(f"{cond}: {summary.get('train_samples')} training samples per student")
        ax.set_xlabel("training step")
        ax.set_ylabel("block-attention exact match (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_summary(a, out, prov):
    """summary.json, table.md and curves.png from whatever runs.jsonl holds."""
    runs = read_runs(os.path.join(out, "runs.jsonl"))
    teachers = [r for r in runs if r["kind"] == "teacher"]
    conds = list(dict.fromkeys(r["condition"] for r in runs if r["kind"] == "student"))
    labels = {arm: lab for arm, (_, _, lab) in ARMS.items()} | {"teacher": "teacher, untrained (block attention)"}
    conditions, parts = {}, []
    for cond in conds:
        students = [r for r in runs if r["kind"] == "student" and r["condition"] == cond]
        summary = summarize(teachers + students, a.bootstrap_reps,
                            [arm for arm in ARMS if any(r["arm"] == arm for r in students)])
        summary["train_samples"] = students[0]["train_samples"]
        summary["steps"] = students[0]["steps"]
        conditions[cond] = summary
        parts.append(f"### Condition `{cond}`: {summary['train_samples']} training samples per student, "
                     f"{summary['steps']} steps\n\n{summary['n_runs']} student runs. Means with bootstrap 95% "
                     "intervals; EM in %, NLL and KL in nats per answer token.\n\n" + table(summary, labels) +
                     "\n" + detail_tables(summary, labels))
    if not conds and teachers:
        conditions["none"] = summarize(teachers, a.bootstrap_reps, [])
    teacher_md = teacher_table(next(iter(conditions.values()))) if conditions else ""
    md = "\n".join(parts) + "\n### Teachers (before any block training)\n\n" + teacher_md
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md)
    path, head = os.path.join(out, "summary.json"), {"provenance": prov, "settings": dict(vars(a))}
    if a.table_only and os.path.exists(path):  # keep the provenance and settings of the run that made the data
        with open(path) as f:
            old = json.load(f)
        head = {"provenance": old.get("provenance"), "settings": old.get("settings"), "table_provenance": prov}
    with open(path, "w") as f:
        json.dump({**head, "conditions": conditions}, f, indent=1)
    plotted = plot({c: v for c, v in conditions.items() if c != "none"}, labels, os.path.join(out, "curves.png"))
    return md, plotted


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = "ablation_work" if a.teacher_recipe == "task-lm" else "ablation_sink_work"
    work_dir = a.work_dir or os.path.join(root, "outputs", base + ("_quick" if a.quick else ""))
    prov = provenance(argv)
    log_path = os.path.join(a.out, "log.txt")

    def log(msg):
        line = f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    if not a.table_only:
        import transformers

        transformers.logging.set_verbosity_error()
        log(f"start: {prov['command']} (commit {prov['commit']})")
        task = Task(a, work_dir)
        run_units(a, task, a.out, work_dir, log)
    md, plotted = write_summary(a, a.out, prov)
    print(md)
    if not plotted:
        print("(matplotlib not installed: no curves.png)")


if __name__ == "__main__":
    main()
