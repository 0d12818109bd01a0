"""LoCoMo prompts against the official runner's (``task_eval/hf_llm_utils.py``: ``get_input_context``
and the user message of ``run_*``), stored in ``tests/fixtures/parity/locomo_prompts.json``: session
order (newest first: the official loop prepends), dates, and truncation (earliest sessions kept, the
latest turns of the session where the budget ends), on a synthetic conversation and, when
``BLOCKATTN_LOCOMO_PATH`` names ``locomo10.json``, on its first conversation (hashes only)."""

import hashlib
import json
import os
import re

import pytest

from vllm_blockattn.eval import blocks, locomo

PARITY = os.path.join(os.path.dirname(__file__), "fixtures", "parity")
TOKENIZER = os.path.join(PARITY, "tokenizer")
with open(os.path.join(PARITY, "locomo_prompts.json"), encoding="utf-8") as f:
    OFFICIAL = json.load(f)
with open(os.path.join(PARITY, "locomo_conversation.json"), encoding="utf-8") as f:
    SYNTHETIC = json.load(f)[0]
DATES = re.compile(r"^DATE: (.*)$", re.M)


def opts(max_length, **kw):
    return blocks.FormOptions.from_kwargs({"tokenizer": TOKENIZER, "max_length": max_length, **kw})


def full_prompt(sample, qi, max_length, **kw):
    key = f"{sample['sample_id']}/{qi}"
    return locomo.build_prompt(sample, sample["qa"][qi], key, opts(max_length), block=False, **kw)[0]


def test_fixture_covers_no_truncation_truncation_and_overruns():
    cases = OFFICIAL["synthetic"]
    assert len(cases) >= 20
    assert any(c["max_length"] == 10**6 for c in cases)
    assert any(c["fits"] and c["prompt"].count("DATE: ") < 4 for c in cases)  # truncated, within budget
    assert any(not c["fits"] for c in cases)  # the official loop leaves session headers uncounted


@pytest.mark.parametrize("case", [c for c in OFFICIAL["synthetic"] if c["fits"]],
                         ids=lambda c: f"{c['key']}@{c['max_length']}")
def test_full_prompt_equals_the_official_one(case):
    assert full_prompt(SYNTHETIC, case["question_index"], case["max_length"]) == case["prompt"]


def test_without_a_budget_the_whole_conversation_newest_session_first():
    case = next(c for c in OFFICIAL["synthetic"] if c["max_length"] == 10**6 and c["question_index"] == 1)
    sample, qa = SYNTHETIC, SYNTHETIC["qa"][1]
    prompt, n, _ = locomo.build_prompt(sample, qa, "parity-conv/1", blocks.FormOptions.from_kwargs({}), block=False)
    assert prompt == case["prompt"] and n == 1
    assert DATES.findall(prompt) == ["8:45 pm on 20 April, 2023", "1:15 pm on 1 April, 2023",
                                     "6:30 pm on 15 March, 2023", "9:00 am on 2 March, 2023"]
    # each session's turns keep their own order; image turns carry the official caption text
    assert prompt.index('Ben said, "I adopted a dog') < prompt.index('Ana said, "So cute!"')
    assert 'Ben said, "Here she is."\n and shared a photo of a brown dog on a sofa.\n' in prompt
    chrono, _, _ = locomo.build_prompt(sample, qa, "parity-conv/1", blocks.FormOptions.from_kwargs({}), block=False,
                                       session_order="chronological")
    assert DATES.findall(chrono) == DATES.findall(prompt)[::-1]


@pytest.mark.parametrize("case", [c for c in OFFICIAL["synthetic"] if not c["fits"]],
                         ids=lambda c: f"{c['key']}@{c['max_length']}")
def test_official_overruns_are_cut_to_the_budget(case):
    """Where the official prompt overruns max_length, ours fits and keeps a subset of its turns,
    from the same earliest sessions, in the same order."""
    ours = full_prompt(SYNTHETIC, case["question_index"], case["max_length"])
    tok = opts(case["max_length"]).tokenizer
    assert len(tok.encode(ours)) <= case["max_length"]
    official_dates = DATES.findall(case["prompt"])
    ours_dates = DATES.findall(ours)
    assert ours_dates == official_dates[len(official_dates) - len(ours_dates):]  # earliest sessions, newest first
    turns = re.findall(r'^\w+ said, ".*"$', ours, re.M)
    assert turns and all(t in case["prompt"] for t in turns)


def test_block_form_follows_the_same_order_and_fits():
    case = next(c for c in OFFICIAL["synthetic"] if c["fits"] and c["max_length"] == 600)
    o = opts(600)
    block, n, _ = locomo.build_prompt(SYNTHETIC, SYNTHETIC["qa"][case["question_index"]], case["key"], o, block=True)
    assert len(o.tokenizer.encode(block)) <= 600
    dates = DATES.findall(block.replace(o.sink_token, "\n"))
    assert dates and dates == DATES.findall(case["prompt"])[-len(dates):]
    o = blocks.FormOptions.from_kwargs({})
    block, n, _ = locomo.build_prompt(SYNTHETIC, SYNTHETIC["qa"][0], "parity-conv/0", o, block=True)
    parts = [p for p in block.split(o.sink_token * o.num_sinks) if p]
    assert n == len(parts) == 5 and [DATES.findall(p) for p in parts[:4]] == [
        ["8:45 pm on 20 April, 2023"], ["1:15 pm on 1 April, 2023"], ["6:30 pm on 15 March, 2023"],
        ["9:00 am on 2 March, 2023"]]
    assert parts[4].startswith("Below is a conversation between two people: Ana and Ben.")


def test_recent_truncation_option_keeps_the_latest_turns():
    ours = full_prompt(SYNTHETIC, 0, 600, truncation="recent")
    assert 'Ana said, "So cute!"' in ours and "9:00 am on 2 March, 2023" not in ours
    with pytest.raises(ValueError, match="locomo_truncation"):
        full_prompt(SYNTHETIC, 0, 600, truncation="latest")
    with pytest.raises(ValueError, match="session_order"):
        full_prompt(SYNTHETIC, 0, 600, session_order="random")


def test_official_sampling_settings_are_the_runner_s():
    # hf_llm_utils.py run_*: do_sample=True, top_k=10, temperature=0.4, top_p=0.9 (the pack decodes greedily)
    assert dict(kv.split("=") for kv in locomo.OFFICIAL_SAMPLING.split(",")) == {
        "do_sample": "True", "temperature": "0.4", "top_k": "10", "top_p": "0.9"}


def test_real_conversation_prompts_hash_equal():
    path = os.environ.get(locomo.ENV_PATH)
    if not path or not os.path.isfile(path):
        pytest.skip(f"set {locomo.ENV_PATH} to locomo10.json")
    sample = locomo.read_samples(path)[0]
    checked = 0
    for case in OFFICIAL["locomo10"]:
        ours = full_prompt(sample, case["question_index"], case["max_length"])
        assert DATES.findall(ours)[-len(case["dates"]):] == case["dates"][-len(DATES.findall(ours)):]
        if case["fits"]:
            assert hashlib.sha256(ours.encode("utf-8")).hexdigest() == case["sha256"], case["key"]
            checked += 1
    assert checked >= 5
