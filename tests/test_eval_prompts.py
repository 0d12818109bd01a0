"""Prompt building of the task pack: natural units, the rule-based segmenter and its hook, middle
truncation, sink settings, and the LongBench / LoCoMo loaders on local files."""

import json
import os

import pytest

from vllm_blockattn.eval import blocks, locomo, longbench
from vllm_blockattn.core.layout import BlockSettings, parse_block_prompt

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "longbench")
# a small conversation of our own in LoCoMo's format (all five categories); the real locomo10.json
# only when BLOCKATTN_LOCOMO_PATH names it
SYNTHETIC = os.path.join(os.path.dirname(__file__), "fixtures", "parity", "locomo_conversation.json")
LOCOMO = os.environ.get(locomo.ENV_PATH)
needs_locomo = pytest.mark.skipif(not (LOCOMO and os.path.isfile(LOCOMO)),
                                  reason=f"set {locomo.ENV_PATH} to LoCoMo's locomo10.json")


def rows(task):
    with open(os.path.join(FIXTURES, f"{task}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def opts(path=None, **kw):
    return blocks.FormOptions.from_kwargs({"pretrained": path, **kw} if path else kw)


def block_texts(tok, prompt, settings):
    ids = tok.encode(prompt, add_special_tokens=False)
    layout = parse_block_prompt(ids, settings)
    return [tok.decode(ids[b.content_start:b.end]) for b in layout.blocks], ids


def test_split_before_natural_units():
    ctx = rows("hotpotqa")[0]["context"]
    units = blocks.split_before(ctx, longbench.TASKS["hotpotqa"].units)
    assert [u.split("\n")[0] for u in units] == ["Passage 1:", "Passage 2:", "Passage 3:"]
    assert "".join(units) == ctx
    assert blocks.split_before("no units here", r"(?m)^Passage \d+:") is None


def test_rule_based_segments_pack_and_preserve_text():
    text = "\n\n".join(" ".join(f"w{p}_{i}" for i in range(n)) for p, n in enumerate([5, 7, 30, 3, 3]))
    out = blocks.rule_based_segments(text, 10, lambda s: len(s.split()))
    assert "".join(out) == text
    assert all(len(b.split()) <= 10 for b in out)
    # greedy packing: p0 (5) | p1 (7) + 3 words of p2 | 10 | 10 | last 7 of p2 + p3 (3) | p4 (3);
    # the 30-word paragraph has no line or sentence breaks, so it is cut between words
    assert [len(b.split()) for b in out] == [5, 10, 10, 10, 10, 3]
    assert out[1].startswith("w1_0") and out[4].split()[-3:] == ["w3_0", "w3_1", "w3_2"]


def test_segmenter_hook(tmp_path, monkeypatch):
    (tmp_path / "my_seg.py").write_text(
        "def cut(text, max_tokens, tokenizer_name):\n    return text.split('|')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    o = opts(segmenter="my_seg:cut")
    assert blocks.segment("a|b|c", o) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="module:function"):
        blocks.segment("a", opts(segmenter="nonsense"))
    # "learned" hands the text to the project's segmenter API (here: a checkpoint that does not exist)
    with pytest.raises(OSError):
        blocks.segment("first part\n\nsecond part", opts(segmenter="learned", segmenter_model=str(tmp_path / "none")))


def test_env_and_bad_options(monkeypatch):
    monkeypatch.setenv("BLOCKATTN_NUM_SINKS", "2")
    monkeypatch.setenv("BLOCKATTN_SINK_TOKEN", "<|x|>")
    o = opts()
    assert (o.num_sinks, o.sink_token, o.max_length) == (2, "<|x|>", None)
    with pytest.raises(ValueError, match="num_sinks must be an integer"):
        opts(num_sinks="four")


def test_sink_defaults_and_training_free_marker(tiny_qwen3):
    o = opts(tiny_qwen3)
    assert (o.sink_token, o.num_sinks) == ("<|block_sink|>", 4)  # from config.json block_attention
    assert o.max_length == 32768  # max_position_embeddings, no answer tokens reserved here
    assert blocks.FormOptions.from_kwargs({"pretrained": tiny_qwen3, "max_model_len": 2048}, 32).max_length == 2016
    o = opts(tiny_qwen3, sink_token="<|endoftext|>", num_sinks=2)
    spec = longbench.TASKS["hotpotqa"]
    prompt, n = longbench.build_prompt(spec, rows("hotpotqa")[0], o, block=True)
    assert n == 4 and prompt.startswith("<|endoftext|>" * 2 + "Passage 1:") and "<|block_sink|>" not in prompt
    with pytest.raises(ValueError, match="not a single token"):
        opts(tiny_qwen3, sink_token="abc")
    # vLLM model_args carry the plugin's override; the prompts follow it
    o = opts(tiny_qwen3, additional_config={"blockattn": {"sink_token_id": 0, "num_sinks": 3}})
    assert (o.sink_token, o.num_sinks) == ("<|endoftext|>", 3)


def test_longbench_block_prompt_layout(tiny_qwen3):
    o = opts(tiny_qwen3)
    spec, row = longbench.TASKS["hotpotqa"], rows("hotpotqa")[0]
    prompt, n = longbench.build_prompt(spec, row, o, block=True)
    texts, _ = block_texts(o.tokenizer, prompt, BlockSettings(3, 4))
    assert n == len(texts) == 4
    assert "".join(texts[:3]) == row["context"]
    head, tail = spec.prompt.split("{context}")
    assert texts[3] == head.rstrip() + "\n\n" + tail.lstrip().format(input=row["input"])
    full, n_full = longbench.build_prompt(spec, row, o, block=False)
    assert n_full == 1 and full == spec.prompt.format(context=row["context"], input=row["input"])


def test_longbench_segmenter_fallback_for_single_doc(tiny_qwen3):
    o = opts(tiny_qwen3, block_tokens=16)
    spec, row = longbench.TASKS["multifieldqa_zh"], rows("multifieldqa_zh")[0]
    prompt, n = longbench.build_prompt(spec, row, o, block=True)
    texts, _ = block_texts(o.tokenizer, prompt, BlockSettings(3, 4))
    assert n == len(texts) >= 3
    assert "".join(texts[:-1]) == row["context"]
    assert texts[-1].endswith("问题：长江流入哪个海？\n回答：")


def test_middle_truncation_full_and_block(tiny_qwen3):
    spec = longbench.TASKS["passage_retrieval_en"]
    row = dict(rows("passage_retrieval_en")[0])
    row["context"] = "\n\n".join(f"Paragraph {i}: " + "word " * 40 for i in range(1, 21))
    o = opts(tiny_qwen3, max_length=800)
    tok = o.tokenizer
    full, _ = longbench.build_prompt(spec, row, o, block=False)
    ids = tok.encode(spec.prompt.format(context=row["context"], input=row["input"]), add_special_tokens=False)
    assert len(ids) > 1500
    assert full == tok.decode(ids[:400]) + tok.decode(ids[-400:])  # LongBench's pred.py cut
    block, n = longbench.build_prompt(spec, row, o, block=True)
    block_ids = tok.encode(block, add_special_tokens=False)
    assert 700 < len(block_ids) <= 800
    texts, _ = block_texts(tok, block, BlockSettings(3, 4))
    # head and tail of the context survive, cut into paragraph blocks; the middle paragraphs are gone
    assert texts[0].startswith("Paragraph 1:") and texts[-2].rstrip().endswith("word")
    assert "Paragraph 10:" not in block
    assert "The following is an abstract." in texts[-1] and n == len(texts) >= 4


def test_longbench_load_and_errors(tiny_qwen3, tmp_path):
    data = longbench.load("trec", block=True, longbench_dir=FIXTURES, pretrained=tiny_qwen3)["test"]
    assert len(data) == 2 and data[0]["all_classes"] == ["Individual", "Distance", "City", "Date"]
    assert data[0]["prompt"].count("<|block_sink|>") == 4 * data[0]["num_blocks"]
    assert longbench.process_results(data[0], ["\nCity\nDate"]) == {
        "score": 1.0, "blocks_per_prompt": data[0]["num_blocks"] - 1}  # the block form counts its context blocks
    with pytest.raises(FileNotFoundError, match="narrativeqa"):
        longbench.load("narrativeqa", longbench_dir=FIXTURES)
    with pytest.raises(ValueError, match="unknown LongBench task"):
        longbench.load("nq", longbench_dir=FIXTURES)
    (tmp_path / "qasper.jsonl").write_text(json.dumps({"input": "q", "context": "c"}) + "\n")
    with pytest.raises(ValueError, match="answers"):
        longbench.load("qasper", longbench_dir=str(tmp_path))


def test_locomo_prompts(tiny_qwen3):
    sample = locomo.read_samples(SYNTHETIC)[0]
    conv = sample["conversation"]
    n_sessions = len(locomo.sessions(conv))
    qa = next(q for q in sample["qa"] if q["category"] == 2)
    o = opts(tiny_qwen3, max_length=10**6)
    full, n, _ = locomo.build_prompt(sample, qa, "parity-conv/1", o, block=False)
    assert n == 1 and full.startswith("Below is a conversation between two people: Ana and Ben.")
    assert full.count("\nDATE: ") == n_sessions and full.endswith(qa["question"] + locomo.TEMPORAL_HINT + "\n")
    assert 'Ana said, "Hi Ben! I started a pottery class this week."\n' in full
    # the official runner prepends: the newest session comes first
    assert full.index(conv["session_4_date_time"]) < full.index(conv["session_1_date_time"])
    block, n, _ = locomo.build_prompt(sample, qa, "parity-conv/1", o, block=True)
    texts, _ = block_texts(o.tokenizer, block, BlockSettings(3, 4))
    assert n == len(texts) == n_sessions + 1
    assert all(t.startswith("DATE: ") for t in texts[:-1]) and texts[-1].startswith("Below is a conversation")
    assert texts[0].startswith(f"DATE: {conv['session_4_date_time']}\nCONVERSATION:\n")
    assert texts[-2].startswith(f"DATE: {conv['session_1_date_time']}\nCONVERSATION:\n")


def test_locomo_truncation_official_and_recent(tiny_qwen3):
    sample = locomo.read_samples(SYNTHETIC)[0]
    qa = sample["qa"][0]
    first = 'Ana said, "Hi Ben! I started a pottery class this week."'  # session 1's first turn
    newest_first = 'Ben said, "I adopted a dog named Pepper!"'  # session 4's first turn
    last = 'Ana said, "So cute!"'  # session 4's last turn
    full, _, _ = locomo.build_prompt(sample, qa, "parity-conv/0", opts(tiny_qwen3, max_length=10**6), block=False)
    o = opts(tiny_qwen3, max_length=len(opts(tiny_qwen3).tokenizer.encode(full)) - 60)
    for block in (False, True):
        # official: sessions from the earliest; the session where the budget ends keeps its latest turns
        prompt, n, _ = locomo.build_prompt(sample, qa, "parity-conv/0", o, block=block)
        assert len(o.tokenizer.encode(prompt)) <= o.max_length and first in prompt and last in prompt
        assert newest_first not in prompt
        # option: the most recent turns stay
        prompt, n, _ = locomo.build_prompt(sample, qa, "parity-conv/0", o, block=block, truncation="recent")
        assert len(o.tokenizer.encode(prompt)) <= o.max_length and last in prompt and first not in prompt


@needs_locomo
def test_locomo_truncation_on_real_data(tiny_qwen3):
    sample = locomo.read_samples(LOCOMO)[0]
    qa = sample["qa"][0]
    o = opts(tiny_qwen3, max_length=900)
    last = locomo.sessions(sample["conversation"])[-1][1][-1]
    for block in (False, True):
        prompt, n, _ = locomo.build_prompt(sample, qa, "conv-26/0", o, block=block)
        n_tokens = len(o.tokenizer.encode(prompt, add_special_tokens=False))
        assert 600 < n_tokens <= 900 and last not in prompt
        assert "DATE: 1:56 pm on 8 May, 2023" in prompt  # the first session is kept
        prompt, n, _ = locomo.build_prompt(sample, qa, "conv-26/0", o, block=block, truncation="recent")
        n_tokens = len(o.tokenizer.encode(prompt, add_special_tokens=False))
        assert 700 < n_tokens <= 900 and last in prompt
        assert "DATE: 1:56 pm on 8 May, 2023" not in prompt  # the first session is dropped


def test_locomo_adversarial_options_and_scoring():
    sample = locomo.read_samples(SYNTHETIC)[0]
    qa = next(q for q in sample["qa"] if q["category"] == 5)
    question, options = locomo.question_text(qa, "parity-conv/99")
    assert set(options.values()) == {locomo.locomo_metrics.NO_INFO, qa["adversarial_answer"]}
    assert question.endswith("Select the correct answer by writing (a) or (b).")
    no_info = next(k for k, v in options.items() if v == locomo.locomo_metrics.NO_INFO)
    doc = {"category": 5, "answer": qa["adversarial_answer"], "options": json.dumps(options)}
    # the same score twice: averaged over questions (score) and over categories (category_mean)
    assert locomo.process_results(doc, [f"({no_info})"]) == {"score": 1.0, "category_mean": 1.0}
    other = "b" if no_info == "a" else "a"
    assert locomo.process_results(doc, [f"({other})"]) == {"score": 0.0, "category_mean": 0.0}


def test_locomo_load_category_and_errors(tmp_path):
    data = locomo.load(3, block=False, locomo_path=SYNTHETIC)["test"]
    assert len(data) == 1 and set(data["category"]) == {3}
    with pytest.raises(ValueError, match="locomo_category"):
        locomo.load(7, locomo_path=SYNTHETIC)
    with pytest.raises(FileNotFoundError, match="LoCoMo data file"):
        locomo.read_samples(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not LoCoMo data"):
        locomo.read_samples(str(tmp_path / "bad.json"))


def test_locomo_unreachable_url_names_locomo_path(monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    locomo._read.cache_clear()
    with pytest.raises(OSError, match="locomo_path") as err:
        locomo.read_samples(locomo.DEFAULT_PATH)
    assert locomo.ENV_PATH in str(err.value) and locomo.DEFAULT_PATH in str(err.value)


@needs_locomo
def test_locomo_load_real_data():
    data = locomo.load(3, block=False, locomo_path=LOCOMO)["test"]
    assert len(data) == 96 and set(data["category"]) == {3}  # 96 open-domain questions in LoCoMo-10


@pytest.mark.parametrize("task", sorted(longbench.TASKS))
def test_every_longbench_task_builds_both_forms_and_scores_gold(task):
    spec = longbench.TASKS[task]
    context = "\n\n".join(f"Passage {i}:\nParagraph {i}: 文章{i} text number {i}." for i in range(1, 4))
    gold = {"retrieval": "Paragraph 2", "retrieval_zh": "段落2", "count": "3", "classification": "City"}
    answer = gold.get(spec.metric, "the answer 北京")
    row = {"input": "Which one?", "context": context, "answers": [answer], "all_classes": ["City", "Date"],
           "length": 12, "_id": "x"}
    o = opts(block_tokens=6)
    full, _ = longbench.build_prompt(spec, row, o, block=False)
    assert full == spec.prompt.format(context=context, input="Which one?")
    block, n = longbench.build_prompt(spec, row, o, block=True)
    assert n >= 2 and block.count("<|block_sink|>" * 4) == n
    head, tail = spec.prompt.split("{context}")
    assert block.rsplit("<|block_sink|>", 1)[1] == head.rstrip() + "\n\n" + tail.lstrip().format(input="Which one?")
    doc = {"task": task, "answers": [answer], "all_classes": row["all_classes"]}
    assert longbench.process_results(doc, [answer]) == {"score": pytest.approx(1.0)}
