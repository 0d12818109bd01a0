"""Command line: cut a text file into blocks.

Usage::

    python -m vllm_blockattn.segment FILE [--model PATH] [--threshold 0.3 [0.5 ...]] [--depth N]
                                          [--format jsonl|prompt] [--question TEXT] [--output PATH]
                                          [--sink-token TEXT] [--num-sinks K]

``FILE`` is a path or ``-`` for stdin. ``--format jsonl`` (default) prints one JSON object per block:
``{"index", "start", "end", "text"}`` (char offsets; the texts concatenate to the input).
``--format prompt`` writes the text form of a block prompt (sink groups before every block, see
``vllm_blockattn.core.layout.build_block_text``), with ``--question`` as the final block when given;
``--num-sinks 0`` writes the sink-free layout (one ``<|block_boundary|>`` per block) for a checkpoint
trained without sinks.
Empty input prints nothing; binary input (NUL bytes or invalid UTF-8) is an error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys

from .core.layout import BOUNDARY_TOKEN, DEFAULT_NUM_SINKS, SINK_TOKEN
from .segmenter.api import segment_text, thresholds_for, to_block_prompt
from .segmenter.candidates import SegmenterInputError, as_text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_blockattn.segment", description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="text file to segment, or - for stdin")
    ap.add_argument("--model", default=None, help="segmenter checkpoint (default: the packaged one)")
    ap.add_argument("--threshold", type=float, nargs="+", default=None,
                    help="cut threshold, one for every level or one per level (default: the model's)")
    ap.add_argument("--depth", type=int, default=None, help="recursion depth (levels)")
    ap.add_argument("--format", choices=("jsonl", "prompt"), default="jsonl")
    ap.add_argument("--question", default=None, help="final block of the prompt (--format prompt)")
    ap.add_argument("--output", default="-", help="output file (default: stdout)")
    ap.add_argument("--num-sinks", type=int, default=DEFAULT_NUM_SINKS,
                    help="sinks before every block (--format prompt); 0: the sink-free layout, one boundary token")
    ap.add_argument("--sink-token", default=None,
                    help=f"the marker's text (default {SINK_TOKEN}, or {BOUNDARY_TOKEN} with --num-sinks 0)")
    args = ap.parse_args(argv)
    if args.num_sinks < 0:
        ap.error(f"--num-sinks must be >= 0, got {args.num_sinks}")
    marker = {"sink_token": args.sink_token or (BOUNDARY_TOKEN if args.num_sinks == 0 else SINK_TOKEN),
              "num_sinks": args.num_sinks}

    try:
        data = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
    except OSError as e:
        print(f"error: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        text = as_text(data, "stdin" if args.file == "-" else args.file)
        threshold = None
        if args.threshold is not None:
            threshold = args.threshold[0] if len(args.threshold) == 1 else args.threshold
            thresholds_for(threshold, args.depth)
        blocks = segment_text(text, model=args.model, threshold=threshold, depth=args.depth)
        if args.format == "prompt":
            if not blocks:
                raise SegmenterInputError("nothing to segment: the input is empty")
            out = (to_block_prompt(blocks, args.question, as_text=True, **marker) if args.question
                   else to_block_prompt(blocks[:-1], blocks[-1], as_text=True, **marker))
        else:
            lines, pos = [], 0
            for i, b in enumerate(blocks):
                lines.append(json.dumps({"index": i, "start": pos, "end": pos + len(b), "text": b}, ensure_ascii=False))
                pos += len(b)
            out = "".join(line + "\n" for line in lines)
    except (SegmenterInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(out)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
