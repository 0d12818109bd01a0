"""The sink-free layout (checkpoints trained without sinks, e.g. Block-Attention's Block-FT models) in
vLLM: ``config.json`` says ``{"num_sinks": 0, "boundary_token_id": ...}``; one boundary token marks
where each block starts and is dropped before the model runs. Results equal the HF reference (which
removes the boundary before attention), the block cache hits at other offsets and orders, and stray
boundaries are rejected one request at a time."""

import gc

import pytest

from vllm_blockattn import BlockSettings, build_block_prompt, parse_block_prompt

from tests._reference import assert_matches, block_reference, load_hf
from tests.test_plugin import DOCS, MAX_TOKENS, PREFIX, QUESTION

vllm = pytest.importorskip("vllm")

@pytest.fixture(scope="module")
def hf(tiny_sinkfree):
    return load_hf(tiny_sinkfree)


@pytest.fixture(scope="module")
def llm(tiny_sinkfree):
    from vllm import LLM

    engine = LLM(model=tiny_sinkfree, attention_backend="blockattn", dtype="float32", enforce_eager=True,
                 max_model_len=2048, seed=0)
    yield engine
    del engine
    gc.collect()


def greedy():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)


def ids_of(hf, docs, prefix=PREFIX, question=QUESTION):
    _, tok, settings = hf
    return build_block_prompt(list(docs) + [question], settings, tokenizer=tok, prefix=prefix)


def run(llm, ids):
    return llm.generate([{"prompt_token_ids": ids}], greedy(), use_tqdm=False)[0]


def reference(hf, ids):
    model, _, settings = hf
    return block_reference(model, settings, ids, MAX_TOKENS)


def test_checkpoint_records_the_sink_free_layout(tiny_sinkfree, hf):
    _, tok, settings = hf
    assert settings.sink_free and settings.to_dict() == {
        "num_sinks": 0, "boundary_token_id": tok.convert_tokens_to_ids("<|block_boundary|>")}
    ids = ids_of(hf, DOCS[:2])
    assert ids.count(settings.boundary_token_id) == 3  # one per block; no sinks anywhere


def test_block_prompts_match_the_reference_and_never_send_a_boundary_to_the_model(llm, hf, monkeypatch):
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    seen: list[list[int]] = []
    schedule = scheduler.schedule

    def recording_schedule(*a, **kw):
        out = schedule(*a, **kw)
        seen.extend(list(r.prompt_token_ids) for r in out.scheduled_new_reqs)
        return out

    monkeypatch.setattr(scheduler, "schedule", recording_schedule)
    boundary = hf[2].boundary_token_id
    for docs, prefix in ((DOCS[:1], PREFIX), (DOCS[:3], PREFIX), (DOCS[1:3], None)):
        ids = ids_of(hf, docs, prefix=prefix)
        assert_matches(run(llm, ids), reference(hf, ids))
    # the question alone after a boundary: an ordinary prompt, the boundary dropped
    _, tok, _ = hf
    q = tok.encode(QUESTION, add_special_tokens=False)
    assert_matches(run(llm, [boundary] + q), reference(hf, [boundary] + q))
    assert seen and all(boundary not in ids for ids in seen)


def test_cache_hits_at_other_offsets_and_orders_equal_cold(llm, hf):
    llm.reset_prefix_cache()
    first = ids_of(hf, [DOCS[0], DOCS[1], DOCS[2]])
    cold = run(llm, first)
    assert cold.num_cached_tokens == 0
    assert_matches(cold, reference(hf, first))
    reordered = ids_of(hf, [DOCS[2], DOCS[0], DOCS[1]], prefix="<|im_start|>system\nBe brief.\n")
    out = run(llm, reordered)
    assert out.num_cached_tokens >= 3 * 32
    assert_matches(out, reference(hf, reordered))
    new_first = ids_of(hf, [DOCS[3], DOCS[1], DOCS[0]])
    out = run(llm, new_first)
    assert out.num_cached_tokens >= 2 * 32
    assert_matches(out, reference(hf, new_first))
    warm = run(llm, first)
    assert warm.num_cached_tokens > 0 and warm.outputs[0].token_ids == cold.outputs[0].token_ids


def test_a_document_is_the_same_block_with_or_without_neighbours(llm, hf):
    """A document sent alone and the same document among others share their pages: the key is the
    document's content, never its boundary or its neighbours."""
    llm.reset_prefix_cache()
    run(llm, ids_of(hf, [DOCS[2]], prefix=None))
    out = run(llm, ids_of(hf, [DOCS[1], DOCS[3], DOCS[2]], prefix=None))
    assert out.num_cached_tokens >= 32 * (len(hf[1].encode(DOCS[2], add_special_tokens=False)) // 32)


@pytest.mark.parametrize("bad, message", [
    ("double", "boundary token run of length 2"),
    ("end", "ends the prompt"),
])
def test_stray_boundaries_are_rejected_and_the_engine_keeps_serving(llm, hf, bad, message):
    boundary = hf[2].boundary_token_id
    ids = ids_of(hf, DOCS[:2])
    at = ids.index(boundary)
    bad_ids = {"double": ids[:at] + [boundary] + ids[at:], "end": ids + [boundary]}[bad]
    with pytest.raises(ValueError, match=message):
        run(llm, bad_ids)
    good = ids_of(hf, DOCS[1:2])
    assert_matches(run(llm, good), reference(hf, good))


def test_a_boundary_that_ordinary_text_can_produce_is_refused_at_start_up(tiny_sinkfree, tmp_path):
    import json
    import shutil

    from vllm_blockattn.core.config import check_boundary_token
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_sinkfree)
    ordinary = tok.encode(" the", add_special_tokens=False)[0]
    with pytest.raises(ValueError, match="not a special token of the tokenizer"):
        check_boundary_token(tok, ordinary)
    check_boundary_token(tok, BlockSettings.from_pretrained(tiny_sinkfree).boundary_token_id)
    # and through the engine's own settings
    path = tmp_path / "m"
    shutil.copytree(tiny_sinkfree, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["block_attention"] = {"num_sinks": 0, "boundary_token_id": ordinary}
    (path / "config.json").write_text(json.dumps(cfg))
    from vllm.engine.arg_utils import EngineArgs

    from vllm_blockattn.core.config import get_block_config

    vllm_config = EngineArgs(model=str(path), attention_backend="blockattn", max_model_len=256).create_engine_config()
    with pytest.raises(ValueError, match="not a special token"):
        get_block_config(vllm_config)
    assert parse_block_prompt([1, 2], BlockSettings(num_sinks=0, boundary_token_id=ordinary)).num_tokens == 2


def test_offline_preload_of_documents_is_hit_by_later_requests(llm, hf):
    from vllm_blockattn import block_cache_stats, preload_documents

    llm.reset_prefix_cache()
    preload_documents(llm, [DOCS[1], DOCS[3]])
    before = block_cache_stats(llm)["block_hits"]
    ids = ids_of(hf, [DOCS[3], DOCS[1]])
    out = run(llm, ids)
    assert block_cache_stats(llm)["block_hits"] - before == 2 and out.num_cached_tokens > 0
    assert_matches(out, reference(hf, ids))


def test_add_boundary_prepares_a_checkpoint_trained_without_sinks(tiny_qwen3, tmp_path):
    """`python -m vllm_blockattn.distill.sinks add-boundary` makes a Block-FT-style checkpoint (no
    block_attention entry, no boundary token) servable: special token added, config.json written."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from vllm_blockattn.core.config import check_boundary_token
    from vllm_blockattn.distill.sinks import main

    src = tmp_path / "block-ft"
    shutil.copytree(tiny_qwen3, src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["block_attention"]
    (src / "config.json").write_text(json.dumps(cfg))
    main(["add-boundary", str(src), "--out", str(tmp_path / "served")])
    settings = BlockSettings.from_pretrained(tmp_path / "served")
    tok = AutoTokenizer.from_pretrained(tmp_path / "served")
    assert settings.sink_free and tok.convert_ids_to_tokens(settings.boundary_token_id) == "<|block_boundary|>"
    check_boundary_token(tok, settings.boundary_token_id)
    assert BlockSettings.from_pretrained(src) is None  # the source is left as it was
    ids = tok.encode("<|block_boundary|>a b<|block_boundary|>c", add_special_tokens=False)
    assert len(parse_block_prompt(ids, settings).blocks) == 2


def test_additional_config_selects_the_sink_free_layout(tiny_sinkfree, tiny_qwen3, tmp_path):
    """`additional_config {"num_sinks": 0, "boundary_token": ...}` serves a checkpoint without a
    block_attention entry in the sink-free layout; a tokenizer without that token is refused."""
    import json
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    from vllm_blockattn.core.config import get_block_config

    override = {"blockattn": {"num_sinks": 0, "boundary_token": "<|block_boundary|>"}}
    path = tmp_path / "no-entry"
    shutil.copytree(tiny_sinkfree, path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["block_attention"]
    (path / "config.json").write_text(json.dumps(cfg))
    settings = get_block_config(EngineArgs(model=str(path), attention_backend="blockattn", max_model_len=256,
                                           additional_config=override).create_engine_config()).settings
    assert settings == BlockSettings.from_pretrained(tiny_sinkfree)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        get_block_config(EngineArgs(model=tiny_qwen3, attention_backend="blockattn", max_model_len=256,
                                    additional_config=override).create_engine_config())
