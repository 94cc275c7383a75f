"""Write slicegpt's own calibration and evaluation windows as a token file a peer's harness reads,
so a published method is measured on exactly the tokens slicegpt calibrates and evaluates on.

The windows are those `slicegpt slice MODEL` uses by default (32 x 1024 calibration tokens drawn
with seed 0 from the Shakespeare calibration works; the first 16 x 1024 tokens of the held-out
plays; BOS first only where the tokenizer adds one), built by slicegpt's data functions. The file
is {'cal': LongTensor [32, 1024], 'eval': LongTensor [16, 1024], 'seqlen': 1024}, the format of
`../shared/peers/peer_flap.py --blocks`; its SHA-256 is printed. With `--perplexity` the dense
model's perplexity on the evaluation windows is printed too, for checking the peer's own dense
figure against slicegpt's.

    .venv/bin/python bench/peer_windows.py --out /tmp/flap/blocks.pt --perplexity
"""

from __future__ import annotations

import argparse
import hashlib

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the model whose tokenizer cuts the text (default: default)")
    p.add_argument("--out", required=True, help="the token file to write")
    p.add_argument("--eval-samples", type=int, default=16, help="evaluation windows (slicegpt's default: 16)")
    p.add_argument("--perplexity", action="store_true", help="also print the dense model's perplexity")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slicegpt.data import bos_token, calibration_windows, evaluation_windows, load_text, tokenize
    from slicegpt.formats.loading import checkpoint_directory
    from slicegpt.plan import SliceSettings

    settings = SliceSettings()  # the defaults `slicegpt slice` calibrates and evaluates with
    directory = checkpoint_directory(args.model)[0]
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    bos = bos_token(tokenizer)
    calibration = calibration_windows(tokenize(tokenizer, load_text(settings.calibration, "calibration")),
                                      settings.samples, settings.seqlen, settings.seed, bos=bos)
    evaluation = evaluation_windows(tokenize(tokenizer, load_text(settings.calibration, "evaluation")),
                                    settings.seqlen, args.eval_samples, bos=bos)
    torch.save({"cal": calibration.input_ids.clone(), "eval": evaluation.input_ids.clone(),
                "seqlen": settings.seqlen}, args.out)
    with open(args.out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"{args.out}: calibration {tuple(calibration.input_ids.shape)}, evaluation "
          f"{tuple(evaluation.input_ids.shape)}, BOS {'first' if bos is not None else 'none'}; sha256 {digest}")
    if args.perplexity:
        from slicegpt.evaluation.perplexity import perplexity

        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
        print(f"dense perplexity (slicegpt): {perplexity(model, evaluation, progress=False):.4f}")


if __name__ == "__main__":
    main()
