"""Benchmark: how the uniform rotation pools the block-boundary covariances.

Unit trace per boundary (the default) against plain pooling (every boundary's tokens with
their raw energy), on the same model, calibration and held-out text in one run. The stream is
sliced (`--slicing`; the default recipe with `--neurons off`, or `--recipe paper`), since pooling
applies to uniform rotation only.

    .venv/bin/python bench/uniform_pooling.py [--model default] [--slicing 0.25] [--recipe default|paper]
"""

from __future__ import annotations

import argparse
import copy
import slicegpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--slicing", type=float, default=0.25)
    p.add_argument("--recipe", choices=("default", "paper"), default="default")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--eval-samples", type=int, default=16)
    args = p.parse_args()

    loaded = slicegpt.load_model(args.model)
    tokenizer = loaded.tokenizer
    held_out = slicegpt.evaluation_windows(slicegpt.tokenize(tokenizer, slicegpt.load_text("shakespeare", "evaluation")),
                                           args.seqlen, args.eval_samples, bos=slicegpt.bos_token(tokenizer))
    calibration = slicegpt.calibration_data(tokenizer, "shakespeare", args.samples, args.seqlen)
    dense = slicegpt.perplexity(loaded.model, held_out, progress=False)
    print(f"model {args.model}, recipe {args.recipe}, slicing {args.slicing:g}, dense perplexity {dense:.2f}")
    print("| pooling | perplexity | ratio to dense |\n|---|---|---|")
    for pooling in ("unit-trace", "tokens"):
        model, _ = slicegpt.slice_model(copy.deepcopy(loaded.model), tokenizer, calibration, recipe=args.recipe,
                                        slicing=args.slicing, neurons="off" if args.recipe == "default" else None,
                                        rotation="uniform", standard=False, pooling=pooling, progress=False)
        ppl = slicegpt.perplexity(model, held_out, progress=False)
        print(f"| {pooling} | {ppl:.2f} | {ppl / dense:.2f} |", flush=True)


if __name__ == "__main__":
    main()
