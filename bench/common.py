"""What the slicing benchmarks share: their data options and the held-out evaluation windows."""

from __future__ import annotations

import argparse


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Model, calibration and held-out evaluation options (the README tables' defaults)."""
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=1024)


def evaluation(tokenizer, args):
    """The held-out windows every row is measured on."""
    import slicegpt

    ids = slicegpt.tokenize(tokenizer, slicegpt.load_text(args.data, "evaluation"))
    return slicegpt.evaluation_windows(ids, args.eval_seqlen, args.eval_samples, bos=slicegpt.bos_token(tokenizer))
