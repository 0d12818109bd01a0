"""The block layout protocol: building, parsing, padding and every rejected input."""

import pytest

from vllm_blockattn.core.layout import (
    SINK_TOKEN,
    Block,
    BlockLayoutError,
    BlockSettings,
    build_block_prompt,
    build_block_text,
    parse_block_prompt,
)
from vllm_blockattn.tiny import build_tokenizer

S = BlockSettings(sink_token_id=3, num_sinks=4)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_build_from_ids_places_sink_groups():
    ids = build_block_prompt([[10, 11], [12], [13, 14, 15]], S)
    assert ids == [3, 3, 3, 3, 10, 11, 3, 3, 3, 3, 12, 3, 3, 3, 3, 13, 14, 15]


def test_parse_round_trip_spans_positions_offsets():
    ids = build_block_prompt([[10, 11], [12], [13, 14, 15]], S, prefix=[7, 8])
    layout = parse_block_prompt(ids, S)
    assert layout.blocks == (
        Block(0, 0, 2, 2, False),  # the prefix is a block of its own
        Block(2, 6, 8, 8, False),
        Block(8, 12, 13, 13, False),
        Block(13, 17, 20, 20, True),
    )
    assert layout.is_block_prompt
    assert layout.offsets() == [0, 2, 8, 13]
    assert layout.positions() == list(range(20))
    assert layout.block_index() == [0] * 2 + [1] * 6 + [2] * 5 + [3] * 7


def test_no_sink_group_is_an_ordinary_prompt():
    layout = parse_block_prompt([5, 6, 7], S)
    assert not layout.is_block_prompt
    assert layout.blocks == (Block(0, 0, 3, 3, True),)


def test_single_block_is_final_and_ordinary():
    layout = parse_block_prompt(build_block_prompt([[5, 6]], S), S)
    assert not layout.is_block_prompt and layout.final.content_start == 4


def test_padding_to_pages_and_parse_back():
    ids = build_block_prompt([[10, 11], [12] * 5, [13]], S, prefix=[7], page_size=8, pad_id=0)
    # prefix 1 + 7 pads | 4 sinks + 2 + 2 pads | 4 sinks + 5 -> 9 + 7 pads | final: 4 sinks + 1
    assert len(ids) == 8 + 8 + 16 + 5
    assert ids[:8] == [7] + [0] * 7
    layout = parse_block_prompt(ids, S, pad_id=0, page_size=8)
    assert [b.num_pads for b in layout.blocks] == [7, 2, 7, 0]
    assert [(b.start, b.end) for b in layout.blocks] == [(0, 1), (8, 14), (16, 25), (32, 37)]
    assert all(b.padded_end % 8 == 0 for b in layout.context_blocks)
    pos = layout.positions()
    real = layout.real_token_indices()
    assert [pos[i] for i in real] == list(range(len(real)))
    assert layout.block_index()[1:8] == [-1] * 7


def test_text_blocks_with_tokenizer(tok):
    ids = build_block_prompt(["Alice moved to Paris.", "Where does Alice live?"], tokenizer=tok)
    sink = tok.convert_tokens_to_ids(SINK_TOKEN)
    assert ids[:4] == [sink] * 4
    layout = parse_block_prompt(ids, BlockSettings.from_tokenizer(tok))
    assert len(layout.blocks) == 2
    assert tok.decode(ids[layout.final.content_start:]) == "Where does Alice live?"


def test_text_form_tokenizes_to_the_id_form(tok):
    blocks = ["Alice moved to Paris.", "Bob collects stamps.", "Where does Alice live?"]
    text = build_block_text(blocks)
    assert tok.encode(text, add_special_tokens=False) == build_block_prompt(blocks, tokenizer=tok)


@pytest.mark.parametrize(
    "blocks, kwargs, message",
    [
        ([], {}, "empty block list"),
        ([[1], []], {}, r"block 1 \(final\) is empty"),
        ([[1, 3, 2], [4]], {}, "block 0 contains the sink token id 3"),
        ([[1], [2]], {"page_size": 8}, "needs both"),
        ([[1], [2]], {"page_size": 8, "pad_id": 3}, "pad_id must differ"),
    ],
)
def test_build_rejects_bad_input(blocks, kwargs, message):
    with pytest.raises(BlockLayoutError, match=message):
        build_block_prompt(blocks, S, **kwargs)


def test_build_text_needs_tokenizer_and_rejects_sink_text(tok):
    with pytest.raises(BlockLayoutError, match="pass a tokenizer"):
        build_block_prompt(["text"], S)
    with pytest.raises(BlockLayoutError, match="contains the sink token"):
        build_block_prompt([f"a {SINK_TOKEN} b", "q"], tokenizer=tok)
    with pytest.raises(BlockLayoutError, match="contains the sink token"):
        build_block_text([f"a {SINK_TOKEN}", "q"])


def test_sink_token_absent_from_tokenizer():
    class NoSink:
        def get_vocab(self):
            return {"a": 0, "b": 1}

    with pytest.raises(BlockLayoutError, match="not in the tokenizer's vocabulary"):
        BlockSettings.from_tokenizer(NoSink())
    with pytest.raises(BlockLayoutError, match="needs `settings` or a `tokenizer`"):
        build_block_prompt([[1]])


@pytest.mark.parametrize("run", [1, 3, 5, 8])
def test_parse_rejects_sink_run_of_wrong_length(run):
    with pytest.raises(BlockLayoutError, match=f"sink run of length {run} at token 2"):
        parse_block_prompt([9, 9] + [3] * run + [10, 11], S)


def test_parse_rejects_trailing_sink_group_and_empty_prompt():
    with pytest.raises(BlockLayoutError, match="ends the prompt"):
        parse_block_prompt([9, 3, 3, 3, 3], S)
    with pytest.raises(BlockLayoutError, match="empty prompt"):
        parse_block_prompt([], S)


def test_settings_from_config_and_validation(tiny_qwen3):
    s = BlockSettings.from_pretrained(tiny_qwen3)
    assert s == BlockSettings(sink_token_id=3, num_sinks=4)
    assert BlockSettings.from_dict({"sink_token_id": 5}).num_sinks == 4
    with pytest.raises(BlockLayoutError, match="unknown block_attention settings"):
        BlockSettings.from_dict({"sink_token_id": 5, "sinks": 2})
    with pytest.raises(BlockLayoutError, match="num_sinks=0 is the sink-free layout: give boundary_token_id"):
        BlockSettings(sink_token_id=1, num_sinks=0)
    with pytest.raises(BlockLayoutError, match="num_sinks must be a non-negative int"):
        BlockSettings(sink_token_id=1, num_sinks=-1)
    with pytest.raises(BlockLayoutError, match="boundary_token_id belongs to the sink-free layout"):
        BlockSettings(sink_token_id=1, boundary_token_id=2)
    with pytest.raises(BlockLayoutError, match="needs 'boundary_token_id'"):
        BlockSettings.from_dict({"num_sinks": 0})
    free = BlockSettings.from_dict({"num_sinks": 0, "boundary_token_id": 7})
    assert free.sink_free and free.group == [7] and free.sinks == [] and BlockSettings.from_dict(free.to_dict()) == free


def test_pad_and_order_puts_cached_blocks_first_then_the_partly_cached_one():
    from vllm_blockattn.core.paged import pad_and_order

    ids = build_block_prompt([[10] * 5, [11] * 6, [12] * 7, [13] * 2], S, prefix=[7, 8])
    layout = parse_block_prompt(ids, S)  # context blocks: head, 10s, 11s, 12s
    out, paged = pad_and_order(ids, layout, 8, 0, lambda b: b == 2, next_block=3)
    offsets = layout.offsets()
    assert paged.offsets == (offsets[2], offsets[3], offsets[0], offsets[1])  # cached, partial, rest in order
    paged.validate(len(out), 8)
    assert out[: paged.ends[0]] == ids[layout.blocks[2].start : layout.blocks[2].end]
    assert out[paged.starts[1] : paged.ends[1]] == ids[layout.blocks[3].start : layout.blocks[3].end]
    same, _ = pad_and_order(ids, layout, 8, 0, lambda b: b == 2)
    assert pad_and_order(ids, layout, 8, 0, lambda b: b == 2, next_block=2)[0] == same  # a cached block stays


# -- the sink-free layout (num_sinks=0): one boundary token per block, removed before attention ---------

FREE = BlockSettings(num_sinks=0, boundary_token_id=9)


def test_sink_free_layout_drops_boundaries_from_every_block():
    ids = build_block_prompt([[1, 2, 3], [4, 5], [6, 7]], FREE, prefix=[8])
    assert ids == [8, 9, 1, 2, 3, 9, 4, 5, 9, 6, 7]
    layout = parse_block_prompt(ids, FREE)
    assert [(b.start, b.end) for b in layout.blocks] == [(0, 1), (2, 5), (6, 8), (9, 11)]
    assert layout.block_index() == [0, -1, 1, 1, 1, -1, 2, 2, -1, 3, 3]  # no query sees a boundary
    # positions and offsets count content only: the model was trained without the boundaries
    assert [layout.positions()[i] for i in layout.real_token_indices()] == list(range(8))
    assert layout.offsets() == [0, 1, 4, 6]
    assert layout.has_markers_removed and layout.is_block_prompt
    assert not parse_block_prompt([1, 2, 3], FREE).has_markers_removed


def test_sink_free_question_alone_is_an_ordinary_prompt_without_its_boundary():
    layout = parse_block_prompt([9, 6, 7], FREE)
    assert not layout.is_block_prompt and layout.has_markers_removed
    assert layout.real_token_indices() == [1, 2]


@pytest.mark.parametrize("ids, msg", [([9, 9, 1], "boundary token run of length 2 at token 0"),
                                      ([1, 2, 9], "boundary token at token 2 ends the prompt"),
                                      ([1, 9, 2, 9, 9, 3], "two in a row make an empty block")])
def test_sink_free_rejects_empty_blocks(ids, msg):
    with pytest.raises(BlockLayoutError, match=msg):
        parse_block_prompt(ids, FREE)


def test_sink_free_builders_refuse_stray_boundaries_and_pad_content_only():
    with pytest.raises(BlockLayoutError, match="contains the boundary token id 9"):
        build_block_prompt([[1, 9, 2], [3]], FREE)
    ids = build_block_prompt([[1, 2, 3], [4, 5], [6]], FREE, page_size=4, pad_id=0)
    assert ids == [9, 1, 2, 3, 0, 9, 4, 5, 0, 0, 9, 6]
    layout = parse_block_prompt(ids, FREE, pad_id=0, page_size=4)
    assert [(b.start, b.end, b.padded_end) for b in layout.blocks] == [(1, 4, 5), (6, 8, 10), (11, 12, 12)]
    assert build_block_text(["a", "b"], "<B>", 0) == "<B>a<B>b"
    with pytest.raises(BlockLayoutError, match="contains the boundary token"):
        build_block_text(["a<B>", "b"], "<B>", 0)


def test_sink_free_pad_and_order_never_copies_a_boundary():
    from vllm_blockattn.core.paged import pad_and_order

    ids = build_block_prompt([[10] * 5, [11] * 6, [13] * 2], FREE, prefix=[7, 8])
    layout = parse_block_prompt(ids, FREE)
    out, paged = pad_and_order(ids, layout, 4, 0, lambda b: b == 2)
    paged.validate(len(out), 4)
    assert 9 not in out
    assert out == [11] * 6 + [0, 0] + [7, 8, 0, 0] + [10] * 5 + [0, 0, 0] + [13] * 2
    assert paged.offsets == (7, 0, 2) and paged.final_offset == 13
