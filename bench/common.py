"""What the slicing benchmarks share: their data options and the held-out evaluation windows."""

from __future__ import annotations

import argparse

import torch


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


@torch.no_grad()
def dense_floor(model, calibration, batch_size: int):
    """The floor: one dense forward through the decoder over the calibration tokens (logits for the
    last position only: slicing never computes the head, and Gemma's 262k-entry vocabulary would
    dominate), after one untimed batch to warm up. Each sliced row times its own, in its process
    just before slicing: this machine's speed drifts by up to 1.7x between runs, so a ratio is
    only meaningful between two timings taken together. Returns a `Measurement`."""
    from slicegpt.evaluation.measure import measure

    batches = list(calibration.batches(batch_size))
    ids, mask = batches[0]
    model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    with measure() as m:
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    return m
