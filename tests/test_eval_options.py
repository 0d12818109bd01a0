"""The task pack's evaluation options for the paper's tables: ``units: off`` with the segmenter of choice
and blocks per prompt (LongBench block form), LoCoMo's category average next to its question average,
and chat templates rendered with ``enable_thinking=False`` (evaluation and training formatting)."""

import json
import os

import pytest

from vllm_blockattn.eval import blocks, chat, locomo_metrics, longbench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(ROOT, "eval", "tasks")

# A LongBench multi-doc row: three "Passage N:" units, two of them with paragraphs (blank lines)
# inside, so that a blank-line cut and the unit cut differ.
PASSAGES = [
    "Passage 1:\nRhine\nThe Rhine flows from the Swiss Alps to the North Sea.\n\nIt ends in the Netherlands.\n",
    "Passage 2:\nAmsterdam\nAmsterdam is the capital of the Netherlands.\n",
    "Passage 3:\nBern\nBern is the federal city of Switzerland.\n\nIt lies on the Aare.\n\nIts old town is a "
    "world heritage site.",
]
ROW = {"_id": "h1", "input": "Which city is the capital of the country where the Rhine ends?",
       "context": "".join(PASSAGES), "answers": ["Amsterdam"], "length": 60, "all_classes": None}


def opts(**kw):
    return blocks.FormOptions.from_kwargs(kw)  # no model: word counts, no truncation


def context_blocks(o, row=ROW, task="hotpotqa"):
    out = longbench.block_blocks(longbench.TASKS[task], row["context"], row["input"], o)
    return out[:-1]  # the final block is the question


# ---- units: off ---------------------------------------------------------------------------------


def test_units_on_cuts_at_passages_and_off_hands_the_context_to_the_segmenter():
    assert context_blocks(opts()) == PASSAGES  # default: the natural units
    # units off: every blank line cuts (blank_line baseline at its own count), wherever the passages are
    o = opts(units="off", segmenter="baseline:blank_line", segmenter_blocks="natural")
    got = context_blocks(o)
    assert got == ["Passage 1:\nRhine\nThe Rhine flows from the Swiss Alps to the North Sea.\n\n",
                   "It ends in the Netherlands.\nPassage 2:\nAmsterdam\nAmsterdam is the capital of the "
                   "Netherlands.\nPassage 3:\nBern\nBern is the federal city of Switzerland.\n\n",
                   "It lies on the Aare.\n\n", "Its old town is a world heritage site."]
    assert "".join(got) == ROW["context"]
    # the same segmenter with the units on cuts nothing here: the units win
    assert context_blocks(opts(segmenter="baseline:blank_line", segmenter_blocks="natural")) == PASSAGES


def test_units_off_with_the_rule_and_fixed_length_segmenters():
    o = opts(units=False, block_tokens=12)  # yaml's `units: off` arrives as False
    got = context_blocks(o)
    assert got == blocks.rule_based_segments(ROW["context"], 12, o.count_tokens) and got != PASSAGES
    assert all(o.count_tokens(b) <= 12 for b in got)
    # "average": equal token lengths, as many blocks as segmenter_blocks says (here 5), or one per
    # block_tokens tokens by default (52 words / 10 -> 6)
    five = context_blocks(opts(units="off", segmenter="baseline:average", segmenter_blocks=5))
    assert len(five) == 5 and "".join(five) == ROW["context"]
    sizes = [len(b.split()) for b in five]
    assert max(sizes) - min(sizes) <= 1, sizes
    six = context_blocks(opts(units="off", segmenter="baseline:average", block_tokens=10))
    assert len(six) == -(-len(ROW["context"].split()) // 10) == 6


def test_segmenter_blocks_learned_takes_the_learned_segmenters_count(monkeypatch):
    seen = []

    def fake_learned(text, o):  # the learned segmenter's blocks: only their number matters here
        seen.append(text)
        return [text[:10], text[10:20], text[20:30], text[30:]]

    monkeypatch.setattr(blocks, "_learned", fake_learned)
    got = context_blocks(opts(units="off", segmenter="baseline:punctuation", segmenter_blocks="learned"))
    assert seen == [ROW["context"]]
    # four blocks, cut after the sentence ends nearest equal-length targets (not at the passages)
    assert got == ["Passage 1:\nRhine\nThe Rhine flows from the Swiss Alps to the North Sea.\n\n",
                   "It ends in the Netherlands.\nPassage 2:\nAmsterdam\nAmsterdam is the capital of the "
                   "Netherlands.\n",
                   "Passage 3:\nBern\nBern is the federal city of Switzerland.\n\n",
                   "It lies on the Aare.\n\nIts old town is a world heritage site."]


def test_option_sources_and_errors(monkeypatch):
    assert opts().units is True and opts(units="on").units is True and opts(units="OFF").units is False
    monkeypatch.setenv("BLOCKATTN_UNITS", "off")
    monkeypatch.setenv("BLOCKATTN_SEGMENTER_BLOCKS", "7")
    o = opts()
    assert (o.units, o.segmenter_blocks) == (False, 7)
    assert opts(units="on").units is True  # metadata before the environment
    with pytest.raises(ValueError, match="units must be 'on' or 'off'"):
        opts(units="sometimes")
    with pytest.raises(ValueError, match="segmenter_blocks must be one of"):
        opts(segmenter_blocks="many")
    with pytest.raises(ValueError, match="unknown baseline segmenter"):
        blocks.segment("a b. c d.", opts(segmenter="baseline:nope"))
    with pytest.raises(ValueError, match="'natural' is for the baselines"):
        blocks.segment("a b. c d.", opts(segmenter="baseline:average", segmenter_blocks="natural"))
    with pytest.raises(ValueError, match="segmenter_scorer"):
        blocks.segment("a b. c d.", opts(segmenter="baseline:loss_topk"))


def test_blocks_per_prompt_recorded_and_reported(tmp_path, tiny_qwen3):
    from vllm_blockattn.core.layout import BlockSettings, parse_block_prompt

    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(ROW) + "\n")
    common = {"pretrained": tiny_qwen3, "longbench_dir": str(tmp_path)}
    on = longbench.load("hotpotqa", block=True, **common)["test"][0]
    off = longbench.load("hotpotqa", block=True, units="off", segmenter="baseline:blank_line",
                         segmenter_blocks="natural", **common)["test"][0]
    full = longbench.load("hotpotqa", block=False, units="off", **common)["test"][0]
    assert (on["context_blocks"], off["context_blocks"], full["context_blocks"]) == (3, 4, 0)
    tok = blocks.load_tokenizer(tiny_qwen3)
    for doc in (on, off):  # the prompt's own layout has that many blocks before the final one
        layout = parse_block_prompt(tok.encode(doc["prompt"], add_special_tokens=False),
                                    BlockSettings.from_pretrained(tiny_qwen3))
        assert len(layout.blocks) - 1 == doc["context_blocks"]
        assert longbench.process_results(doc, ["Amsterdam"]) == {"score": 1.0,
                                                                 "blocks_per_prompt": doc["context_blocks"]}
    assert longbench.process_results(full, ["Amsterdam"]) == {"score": 1.0}  # the full form has no blocks


# ---- LoCoMo: question average and category average ---------------------------------------------

# A hand-made conversation: 3 sessions; categories of unequal sizes so that the two averages differ.
LOCOMO_SAMPLE = {
    "sample_id": "conv-x",
    "conversation": {
        "speaker_a": "Ann", "speaker_b": "Ben",
        "session_1_date_time": "1 May 2023", "session_1": [
            {"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat named Tom."},
            {"speaker": "Ben", "dia_id": "D1:2", "text": "I moved to Oslo."}],
        "session_2_date_time": "8 May 2023", "session_2": [
            {"speaker": "Ann", "dia_id": "D2:1", "text": "Tom likes fish."}],
        "session_3_date_time": "15 May 2023", "session_3": [
            {"speaker": "Ben", "dia_id": "D3:1", "text": "I started learning the violin."}],
    },
    "qa": [
        {"question": "What is the cat's name?", "answer": "Tom", "category": 4},
        {"question": "Where did Ben move?", "answer": "Oslo", "category": 4},
        {"question": "What does Tom like?", "answer": "fish", "category": 4},
        {"question": "What instrument does Ben learn?", "answer": "violin", "category": 4},
        {"question": "When did Ann adopt a cat?", "answer": "May 2023", "category": 2},
        {"question": "What pets and places are mentioned?", "answer": "cat, Oslo", "category": 1},
        {"question": "Would Ann like a dog?", "answer": "maybe", "category": 3},
        {"question": "What is Ben's dog called?", "adversarial_answer": "Rex", "category": 5},
    ],
}
# the fake model answers these questions right and the others wrong
RIGHT = {"What is the cat's name?": "Tom", "Where did Ben move?": "Oslo", "What does Tom like?": "fish",
         "What instrument does Ben learn?": "violin", "When did Ann adopt a cat?": "in the north"}


def expected():
    # per question: four single-hop right (1.0), temporal wrong (0.0), multi-hop wrong, open-domain wrong,
    # adversarial right (the model picks "No information available")
    scores = {4: [1.0] * 4, 2: [0.0], 1: [0.0], 3: [0.0], 5: [1.0]}
    question = sum(sum(v) for v in scores.values()) / 8  # 5 / 8
    category = sum(sum(v) / len(v) for v in scores.values()) / 5  # (1 + 0 + 0 + 0 + 1) / 5
    return question, category


def test_averages_of_hand_made_scores():
    pairs = [(4, 1.0), (4, 1.0), (4, 1.0), (4, 1.0), (2, 0.0), (1, 0.0), (3, 0.0), (5, 1.0)]
    out = locomo_metrics.averages(pairs)
    question, category = expected()
    assert out["question_mean"] == pytest.approx(question) == 0.625
    assert out["category_mean"] == pytest.approx(category) == 0.4
    assert out["categories"] == {"multi_hop": 0.0, "temporal": 0.0, "open_domain": 0.0, "single_hop": 1.0,
                                 "adversarial": 1.0}
    # over the categories present only
    assert locomo_metrics.averages([(4, 1.0), (4, 0.0), (2, 1.0)])["category_mean"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="category"):
        locomo_metrics.averages([(6, 1.0)])
    with pytest.raises(ValueError, match="no scored"):
        locomo_metrics.averages([])


class _Oracle:
    """A fake lm-eval model: the right answer for the questions of RIGHT, "(a)"/"(b)" for the option
    saying "No information available", "no idea" otherwise."""

    def __new__(cls):
        from lm_eval.api.model import LM

        class Oracle(LM):
            def generate_until(self, requests, disable_tqdm=False):
                out = []
                for req in requests:
                    prompt = req.args[0]
                    question = prompt.rsplit("Question: ", 1)[1].strip()
                    if " (a) " in question:
                        out.append("(a)" if "(a) No information available" in question else "(b)")
                        continue
                    out.append(next((a for q, a in RIGHT.items() if question.startswith(q)), "no idea"))
                return out

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return Oracle()


def _run(tasks, metadata):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=TASKS_DIR, include_defaults=False, metadata=metadata)
    return lm_eval.simple_evaluate(model=_Oracle(), tasks=tasks, task_manager=tm, bootstrap_iters=0)["results"]


def test_locomo_groups_report_question_and_category_averages(tmp_path):
    path = tmp_path / "locomo.json"
    path.write_text(json.dumps([LOCOMO_SAMPLE]))
    res = _run(["locomo", "locomo_block"], {"locomo_path": str(path)})
    question, category = expected()
    for group in ("locomo", "locomo_block"):
        assert res[group]["score,none"] == pytest.approx(question), res[group]
        assert res[group]["category_mean,none"] == pytest.approx(category), res[group]
    assert res["locomo_single_hop"]["category_mean,none"] == res["locomo_single_hop"]["score,none"] == 1.0
    # blocks per prompt: the three sessions of every prompt, in the block form only
    assert res["locomo_block"]["blocks_per_prompt,none"] == 3.0
    assert res["locomo_temporal_block"]["blocks_per_prompt,none"] == 3.0
    assert "blocks_per_prompt,none" not in res["locomo"]


def test_longbench_block_group_reports_blocks_per_prompt(tmp_path):
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "_id": "h2",
                                                                                  "context": PASSAGES[1]}) + "\n")
    on = _run(["longbench_hotpotqa_block"], {"longbench_dir": str(tmp_path)})
    off = _run(["longbench_hotpotqa_block"], {"longbench_dir": str(tmp_path), "units": "off",
                                              "segmenter": "baseline:blank_line", "segmenter_blocks": "natural"})
    # units on: 3 passages and 1 passage (a single unit is no split: the segmenter's one block);
    # units off: 4 blank-line blocks and 1
    assert on["longbench_hotpotqa_block"]["blocks_per_prompt,none"] == pytest.approx((3 + 1) / 2)
    assert off["longbench_hotpotqa_block"]["blocks_per_prompt,none"] == pytest.approx((4 + 1) / 2)


# ---- enable_thinking ------------------------------------------------------------------------------

# The branches of Qwen3's chat template that matter here: the generation prompt closes an empty think
# block when enable_thinking is false, and the last assistant turn is rendered with its think block.
QWEN3_LIKE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if loop.last %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{{- message.content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def qwen3_like_model(tiny_qwen3, tmp_path_factory):
    """The tiny checkpoint with a Qwen3-style template (a copy of its folder)."""
    import shutil

    path = tmp_path_factory.mktemp("tiny-qwen3-think") / "model"
    shutil.copytree(tiny_qwen3, path)
    cfg = path / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data["chat_template"] = QWEN3_LIKE
    cfg.write_text(json.dumps(data))
    for extra in ("chat_template.jinja", "chat_template.json"):
        if (path / extra).exists():
            (path / extra).write_text(QWEN3_LIKE if extra.endswith("jinja") else json.dumps(
                {"chat_template": QWEN3_LIKE}))
    return str(path)


def test_hf_block_renders_without_thinking_by_default(qwen3_like_model, one_torch_thread):
    from vllm_blockattn.eval.hf_block import HFBlockLM

    chat_history = [{"role": "user", "content": "Where is Bern?"}]
    off = HFBlockLM(qwen3_like_model).apply_chat_template(chat_history)
    assert off.endswith("<|im_start|>assistant\n" + EMPTY_THINK)  # the model answers without reasoning
    on = HFBlockLM(qwen3_like_model, enable_thinking="True", think_end_token="</think>")
    assert on.apply_chat_template(chat_history).endswith("<|im_start|>assistant\n")  # it may reason first
    assert HFBlockLM(qwen3_like_model, enable_thinking="false").apply_chat_template(chat_history) == off
    with pytest.raises(ValueError, match="think_end_token"):
        HFBlockLM(qwen3_like_model, enable_thinking=True)


def test_templates_without_enable_thinking_are_unchanged(tiny_qwen3):
    tok = blocks.load_tokenizer(tiny_qwen3)  # the tiny ChatML template never mentions enable_thinking
    msgs = [{"role": "user", "content": "hi"}]
    plain = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False) == plain
    assert chat.template_kwargs(tok) == {}


def test_training_formatting_without_thinking(qwen3_like_model, tiny_qwen3):
    from transformers import AutoTokenizer

    from vllm_blockattn.core.layout import BlockSettings
    from vllm_blockattn.distill.data import ChatBlockFormatter

    tok = AutoTokenizer.from_pretrained(qwen3_like_model)
    assert chat.template_kwargs(tok) == {"enable_thinking": False}
    settings = BlockSettings.from_pretrained(qwen3_like_model)
    rec = {"context": ["Bern is in Switzerland. ", "Oslo is in Norway. "], "question": "Where is Bern?",
           "answer": "Switzerland"}
    off = ChatBlockFormatter(tok, settings)
    assert off.turn_switch.endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    assert off.response_text(rec["question"], rec["answer"]) == "Switzerland<|im_end|>\n"
    sample = off(rec)
    labelled = [t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab != -100]
    assert tok.decode(labelled) == "Switzerland<|im_end|>\n"  # no think tokens are trained on
    on = ChatBlockFormatter(tok, settings, enable_thinking=True)
    assert on.response_text(rec["question"], rec["answer"]) == EMPTY_THINK + "Switzerland<|im_end|>\n"
    # a template without the variable formats exactly as before
    plain = AutoTokenizer.from_pretrained(tiny_qwen3)
    assert ChatBlockFormatter(plain, settings)(rec) == ChatBlockFormatter(plain, settings, enable_thinking=True)(rec)


def test_runner_turns_thinking_off_for_lm_evals_models():
    off = ["--model_args", "enable_thinking=False"]
    base = ["--tasks", "locomo", "--include_path", "eval/tasks"]
    assert chat.thinking_off_argv(["--model", "vllm", "--model_args", '{"pretrained": "M"}', *base]) == [
        "--model", "vllm", "--model_args", '{"pretrained": "M"}', *base, *off]
    assert chat.thinking_off_argv(["run", "--model=hf", "--model_args", "pretrained=M", *base])[-2:] == off
    assert chat.thinking_off_argv(["--model_args", "pretrained=M", *base])[-2:] == off  # lm-eval's default: hf
    for kept in (["--model", "vllm", "-a", "pretrained=M,enable_thinking=True,think_end_token=</think>"],
                 ["--model", "hf-block", "--model_args", "pretrained=M"],  # defaults to off itself
                 ["--model", "local-completions", "--model_args", "model=M"],
                 ["--config", "run.yaml"], ["ls", "tasks"]):
        assert chat.thinking_off_argv(kept) == kept
    assert chat.thinking_model_args("vllm", {"pretrained": "M"}) == {"pretrained": "M", "enable_thinking": False}
    assert chat.thinking_model_args("hf", "pretrained=M") == "pretrained=M,enable_thinking=False"
    assert json.loads(chat.thinking_model_args("vllm", '{"pretrained": "M"}'))["enable_thinking"] is False
    assert chat.thinking_model_args("hf", "pretrained=M,enable_thinking=True") == "pretrained=M,enable_thinking=True"
    assert chat.thinking_model_args("hf-block", {"pretrained": "M"}) == {"pretrained": "M"}


def test_lm_evals_hf_model_renders_without_thinking_with_the_added_argument(qwen3_like_model, one_torch_thread):
    """The mechanism the runner relies on: lm-eval's own hf model takes enable_thinking and hands it
    to the chat template; without it the Qwen3 template leaves thinking on."""
    from lm_eval.models.huggingface import HFLM

    chat_history = [{"role": "user", "content": "Where is Bern?"}]
    args = chat.thinking_model_args("hf", {"pretrained": qwen3_like_model, "device": "cpu"})
    assert HFLM(**args).apply_chat_template(chat_history).endswith("assistant\n" + EMPTY_THINK)
    assert HFLM(pretrained=qwen3_like_model, device="cpu").apply_chat_template(chat_history).endswith("assistant\n")


def test_sink_free_checkpoint_gets_one_boundary_per_block(tiny_sinkfree):
    """A checkpoint trained without sinks: the task pack's block forms place its boundary token, one per
    block, read from config.json (or from the vLLM plugin's override), and budget one token per block."""
    from transformers import AutoTokenizer

    from vllm_blockattn.core.layout import BlockSettings, parse_block_prompt

    o = blocks.FormOptions.from_kwargs({"pretrained": tiny_sinkfree, "max_length": 512})
    assert (o.sink_token, o.num_sinks, o.marker_tokens) == ("<|block_boundary|>", 0, 1)
    text = blocks.block_text(["one doc", "two doc", "Q?"], o)
    assert text == "<|block_boundary|>one doc<|block_boundary|>two doc<|block_boundary|>Q?"
    ids = AutoTokenizer.from_pretrained(tiny_sinkfree).encode(text, add_special_tokens=False)
    assert len(parse_block_prompt(ids, BlockSettings.from_pretrained(tiny_sinkfree)).blocks) == 3
    via_plugin = blocks.FormOptions.from_kwargs({"pretrained": tiny_sinkfree, "max_length": 512, "additional_config": {
        "blockattn": {"num_sinks": 0, "boundary_token": "<|block_boundary|>"}}})
    assert (via_plugin.sink_token, via_plugin.num_sinks) == ("<|block_boundary|>", 0)
