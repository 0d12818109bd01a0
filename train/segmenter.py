"""Train the segmenter on SemanticSeg-format jsonl (format: docs/segmenter.md).

Commands::

    # head only, on the offline MiniLM backbone (CPU, minutes)
    python train/segmenter.py --train-file train.jsonl --eval-file eval.jsonl --output-dir seg-ckpt

    # backbone + head, any Hugging Face backbone, several GPUs
    accelerate launch train/segmenter.py --train-file train.jsonl --eval-file eval.jsonl \
        --backbone Qwen/Qwen3-4B-Instruct-2507 --freeze-backbone false --output-dir seg-ckpt

Prints boundary precision/recall/F1 and Pk/WindowDiff per category of the eval file and writes them
to ``OUTPUT_DIR/eval_results.json``.
"""

from vllm_blockattn.segmenter.training import config_from_args, train_segmenter


def main(argv=None):
    cfg = config_from_args(argv)
    _seg, metrics = train_segmenter(cfg)
    for cat, m in sorted(metrics.items()):
        print(f"{cat:>12}  P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  "
              f"Pk {m['pk']:.3f}  WD {m['windowdiff']:.3f}  n {m['n']}")


if __name__ == "__main__":
    main()
