"""The paper's recipe data: `train/prepare_data.py mix` draws HotpotQA and segmenter-cut ChatQA2-style
records by weight into one trainer file (tiny local files in both formats, built here)."""

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_train_{name}", os.path.join(REPO, "train", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def prep():
    return _script("prepare_data")


def _jsonl(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def _hotpot(n):
    return [{"_id": f"h{i}", "question": f"where does person{i} live ?", "answer": f"city{i}",
             "context": [[f"Person{i}", [f"person{i} lives in city{i} .", " it is big ."]],
                         [f"Other{i}", [f"other{i} lives in town{i} ."]]], "type": "bridge"} for i in range(n)]


def _chat(n):
    """ChatQA2-style: a long document (paragraphs on different topics), turns, the last one answered."""
    out = []
    for i in range(n):
        doc = (f"# Installing tool{i}\n\nRun pip install tool{i} to get it.\n\nThen set TOOL{i}_HOME to the folder.\n\n"
               f"# The story of king{i}\n\nOnce upon a time king{i} ruled the valley.\n\nHe had {i + 2} daughters.")
        out.append({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                                 {"role": "user", "content": f"how many daughters had king{i} ?"},
                                 {"role": "assistant", "content": f"{i + 2}"}], "document": doc})
    return out


@pytest.fixture
def files(tmp_path):
    (tmp_path / "hotpot.json").write_text(json.dumps(_hotpot(40)))  # the official JSON list
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _chat(30)))
    return tmp_path


def _mix(prep, files, *extra, out="mix", seg="paragraphs"):
    return prep.main(["mix", "--source", "hotpotqa", str(files / "hotpot.json"), "--source", "chatqa2",
                      str(files / "chat.jsonl"), "--out", str(files / f"{out}.jsonl"), "--segmenter", seg, *extra])


def _count(rows):
    out = {}
    for r in rows:
        out[r["source"]] = out.get(r["source"], 0) + 1
    return out


def test_mix_honours_weights_splits_by_weight_and_is_seeded(prep, files):
    stats = _mix(prep, files, "--mix", "hotpotqa=0.7,chatqa2=0.3", "--size", "20", "--eval-out",
                 str(files / "mix_eval.jsonl"), "--eval-size", "10")
    train, held = _jsonl(files / "mix.jsonl"), _jsonl(files / "mix_eval.jsonl")
    assert _count(train) == {"hotpotqa": 14, "chatqa2": 6} and _count(held) == {"hotpotqa": 7, "chatqa2": 3}
    assert stats["sources"]["chatqa2"]["train"] == 6 and (stats["train"], stats["eval"]) == (20, 10)
    keys = [r["question"] for r in train + held]
    assert len(set(keys)) == 30  # no record twice, none in both splits
    assert [r["source"] for r in train] != sorted(r["source"] for r in train)  # interleaved, not blocks of sources
    # only the drawn ChatQA2 documents were segmented (9 of 30), through the cache
    assert stats["segmented"] == 9
    # weights are relative: 7,3 is 0.7,0.3; the same seed gives the same files; another seed other records
    _mix(prep, files, "--mix", "hotpotqa=7,chatqa2=3", "--size", "20", "--eval-out", str(files / "b_eval.jsonl"),
         "--eval-size", "10", out="b")
    assert _jsonl(files / "b.jsonl") == train and _jsonl(files / "b_eval.jsonl") == held
    _mix(prep, files, "--mix", "hotpotqa=7,chatqa2=3", "--size", "20", "--seed", "1", out="c")
    assert _count(_jsonl(files / "c.jsonl")) == {"hotpotqa": 14, "chatqa2": 6}
    assert {r["question"] for r in _jsonl(files / "c.jsonl")} != {r["question"] for r in train}
    # uneven weights: counts are the largest-remainder split (3.5, 1.75, 1.75 of 7 -> 3, 2, 2)
    assert prep.quotas(7, {"a": 2, "b": 1, "c": 1}) == {"a": 3, "b": 2, "c": 2}
    assert prep.quotas(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}


def test_mixed_records_share_the_block_schema_and_chatqa2_is_segmented(prep, files):
    """Both sources become trainer records the trainer reads; ChatQA2 documents are cut by the project's
    learned segmenter (the paper's ChatQA2Seg), HotpotQA paragraphs are one block each."""
    from vllm_blockattn.distill.data import load_records, load_segmenter

    _mix(prep, files, "--mix", "hotpotqa=1,chatqa2=1", "--size", "6", seg="learned")
    rows = _jsonl(files / "mix.jsonl")
    assert _count(rows) == {"hotpotqa": 3, "chatqa2": 3}
    learned = load_segmenter("learned")
    chat = {r["document"]: r for r in _chat(30)}
    for r in rows:
        assert set(r) == {"context", "question", "answer", "source"}
        assert r["context"] and all(isinstance(b, str) and b.strip() for b in r["context"])
        if r["source"] == "hotpotqa":
            assert len(r["context"]) == 2 and r["context"][0].startswith("Person")
        else:
            doc = "".join(r["context"])
            src = next(d for d in chat if d.split()[:3] == doc.split()[:3])
            assert r["context"] == learned(src) and len(r["context"]) > 1
            assert r["question"].startswith("User: hello\nAssistant: hi\n")
            assert r["answer"] == chat[src]["messages"][-1]["content"]
    loaded = load_records(files / "mix.jsonl")  # the trainer's loader (dataset_format: auto)
    # (the loader ends every paragraph with one blank line)
    assert [[b.strip() for b in x["context"]] for x in loaded] == [[b.strip() for b in r["context"]] for r in rows]


def test_mix_size_default_shortage_and_oversample(prep, files):
    # no --size: the most the sources hold at the weights without repeats (40 HotpotQA run out first)
    stats = _mix(prep, files, "--mix", "hotpotqa=0.7,chatqa2=0.3", "--eval-out", str(files / "e.jsonl"),
                 "--eval-size", "7")
    assert (stats["train"], stats["eval"]) == (50, 7)  # 57 = 40 / 0.7, rounded down
    assert (stats["sources"]["hotpotqa"]["train"], stats["sources"]["hotpotqa"]["eval"]) == (35, 5)
    rows = _jsonl(files / "mix.jsonl") + _jsonl(files / "e.jsonl")
    assert _count(rows) == {"hotpotqa": 40, "chatqa2": 17} and len({r["question"] for r in rows}) == 57
    # a source too short for the asked size: an error naming it, or repeats with --oversample
    with pytest.raises(ValueError, match=r"^source 'chatqa2' has 30 usable records.*asks for 40.*--oversample"):
        _mix(prep, files, "--mix", "hotpotqa=1,chatqa2=2", "--size", "60")
    both = r"source 'hotpotqa' has 40 .*asks for 50.*source 'chatqa2' has 30 .*asks for 50"
    with pytest.raises(ValueError, match=both):
        _mix(prep, files, "--mix", "hotpotqa=1,chatqa2=1", "--size", "100")
    _mix(prep, files, "--mix", "hotpotqa=1,chatqa2=1", "--size", "100", "--oversample", "--eval-out",
         str(files / "o_eval.jsonl"), "--eval-size", "4")
    train, held = _jsonl(files / "mix.jsonl"), _jsonl(files / "o_eval.jsonl")
    assert _count(train) == {"hotpotqa": 50, "chatqa2": 50}
    assert len({r["question"] for r in train if r["source"] == "chatqa2"}) == 28  # 30 minus 2 held out, repeated
    assert {r["question"] for r in held}.isdisjoint({r["question"] for r in train})
    # --max-chars skips long records before they are drawn
    long = _chat(1)[0]
    long["document"] += "\n\n" + "word " * 2000
    (files / "chat.jsonl").write_text(json.dumps(long) + "\n" + "".join(json.dumps(r) + "\n" for r in _chat(5)))
    stats = _mix(prep, files, "--mix", "hotpotqa=1,chatqa2=1", "--max-chars", "2000")
    assert stats["sources"]["chatqa2"]["skipped"] == 1 and stats["sources"]["chatqa2"]["train"] == 5


@pytest.mark.parametrize("mix, message", [
    ("hotpotqa0.7,chatqa2=0.3", r"'hotpotqa0.7' is not NAME=WEIGHT"),
    ("hotpotqa=abc,chatqa2=1", r"weight of 'hotpotqa' must be a number, got 'abc'"),
    ("hotpotqa=-1,chatqa2=1", r"weight of 'hotpotqa' must be a positive number"),
    ("hotpotqa=0,chatqa2=1", r"weight of 'hotpotqa' must be a positive number"),
    ("hotpotqa=nan,chatqa2=1", r"weight of 'hotpotqa' must be a positive number"),
    ("hotpotqa=1,hotpotqa=2", r"source 'hotpotqa' is given twice"),
    ("squad=1,hotpotqa=1", r"unknown source 'squad'; sources are the formats"),
    ("hotpotqa=1", r"at least two sources"),
    ("hotpotqa=1,triviaqa=1", r"no --source for \['triviaqa'\]; no --mix weight for \['chatqa2'\]"),
])
def test_bad_mix_specs_name_the_problem(prep, files, mix, message):
    with pytest.raises(ValueError, match=message):
        _mix(prep, files, "--mix", mix, seg="no.such.module:fn")  # refused before any segmenter loads


@pytest.mark.parametrize("argv, message", [
    (["mix", "--input", "a.json", "--mix", "hotpotqa=1,chatqa2=1"], "not --input"),
    (["mix", "--source", "hotpotqa", "a.json"], "needs --source NAME PATH"),
    (["hotpotqa", "--input", "a.json", "--mix", "hotpotqa=1,chatqa2=1"], "are for 'mix', not 'hotpotqa'"),
    (["--input", "a.json"], "the format"),
])
def test_bad_mix_command_lines(prep, files, capsys, argv, message):
    with pytest.raises(SystemExit):
        prep.main(argv + ["--out", str(files / "x.jsonl")])
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="source 'hotpotqa' is given twice"):
        prep.main(["mix", "--source", "hotpotqa", "a", "--source", "hotpotqa", "b", "--mix", "hotpotqa=1,chatqa2=1",
                   "--out", str(files / "x.jsonl")])


def test_the_recipe_data_config(prep, files):
    """train/configs/data_hotpotqa_chatqa2.yaml (the GPU configs' data) parses; the command line overrides it."""
    cfg = os.path.join(REPO, "train", "configs", "data_hotpotqa_chatqa2.yaml")
    args = prep.parse_args(["--config", cfg])
    assert args.format == "mix" and set(prep.parse_mix(args.mix)) == {"hotpotqa", "chatqa2"}
    assert set(prep.parse_sources(args.source)) == {"hotpotqa", "chatqa2"} and args.segmenter == "learned"
    for split in ("out", "eval_out"):  # the files the GPU configs train and evaluate on
        for name in ("qwen3_4b_gpu", "qwen3_8b_gpu", "qwen3_14b_gpu", "llama3_8b_gpu"):
            with open(os.path.join(REPO, "train", "configs", f"{name}.yaml")) as f:
                assert getattr(args, split) in f.read(), (name, split)
    stats = prep.main(["--config", cfg, "--source", "hotpotqa", str(files / "hotpot.json"), "--source", "chatqa2",
                       str(files / "chat.jsonl"), "--size", "10", "--eval-size", "2", "--segmenter", "paragraphs",
                       "--out", str(files / "r.jsonl"), "--eval-out", str(files / "r_eval.jsonl")])
    w = prep.parse_mix(args.mix)
    assert stats["sources"]["hotpotqa"]["train"] == prep.quotas(10, w)["hotpotqa"]
    bad = files / "bad.yaml"
    bad.write_text("format: mix\nmixx: {hotpotqa: 1}\n")
    with pytest.raises(SystemExit):
        prep.parse_args(["--config", str(bad), "--out", "x"])
