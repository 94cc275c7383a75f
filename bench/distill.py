"""Benchmark: recovery by distillation from the dense model against next-token LoRA, same steps and tokens.

One sliced student (a slicegpt output directory), trained from the same start by each row on the
same batches of the calibration part of `--data` (seeded order), then measured on the held-out
windows `slicegpt finetune` reports (its evaluation part, 16 x 1024 tokens by default):

- next-token lora: today's `slicegpt finetune` (rank 8, lr 1e-3);
- kd lora: `--loss distill` with the same adapters (KL to the dense teacher, top-k + rest, mixed half and
  half with next-token loss as `slicegpt finetune --loss distill` does by default; `--ce-weight 0`: KL alone);
- kd full: `--loss distill --train full` (the attention and MLP linears' own weights, lr 1e-4).

The teacher (the student's recorded source model) runs once over the training batches, writes its
logits to a temporary folder and is freed; both distillation rows read those files.

    slicegpt slice default --size 0.8 --out out/s80
    .venv/bin/python bench/distill.py out/s80 --steps 100
    .venv/bin/python bench/distill.py out/s50 --steps 1000 --rows "kd full,next-token lora" --lora-lr 3e-4

The teacher's pass runs only where a distillation row is asked for; its time is reported apart
(`teacher_seconds`), since it is part of what distillation costs.

The raw figures are kept in bench/results/distill-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

ROWS = {"next-token lora": ("next-token", "lora"), "kd lora": ("distill", "lora"), "kd full": ("distill", "full")}


def main() -> None:
    import slicegpt
    from slicegpt.data import bos_token, evaluation_windows, load_text, tokenize
    from slicegpt.distill import TOP_K, resolve_teacher, teacher_logits
    from slicegpt.finetune import DISTILL_CE_WEIGHT, finetune, training_batches, training_windows

    from common import save_results  # bench/common.py

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("student", help="a sliced model directory (its record names the teacher)")
    p.add_argument("--teacher", default=None)
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--top-k", type=int, default=TOP_K)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--lora-lr", type=float, default=None, help="peak lr of the LoRA rows (default finetune's, 1e-3)")
    p.add_argument("--full-lr", type=float, default=None, help="peak lr of the full-weight row (default 1e-4)")
    p.add_argument("--ce-weight", type=float, default=DISTILL_CE_WEIGHT,
                   help=f"share of next-token loss in the distillation rows (default {DISTILL_CE_WEIGHT:g}, "
                        "finetune's)")
    args = p.parse_args()
    rows = [r.strip() for r in args.rows.split(",")]

    student = slicegpt.load(args.student)
    tokenizer = student.tokenizer
    held_out = evaluation_windows(tokenize(tokenizer, load_text(args.data, "evaluation")), args.eval_seqlen,
                                  args.eval_samples, bos=bos_token(tokenizer))
    before = slicegpt.perplexity(student.model, held_out, progress=False)
    del student
    teacher = resolve_teacher(args.student, args.teacher)
    dense = slicegpt.load_model(teacher)
    dense_ppl = slicegpt.perplexity(dense.model, held_out, progress=False)
    del dense
    print(f"dense {dense_ppl:.2f}, sliced {before:.2f} ({held_out.tokens} held-out tokens)")

    windows = training_windows(tokenizer, args.data, None, args.seqlen, 0)
    settings = dict(steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, evaluate=False, progress=True)
    results = []
    distilled = any(ROWS[row][0] == "distill" for row in rows)  # the teacher's pass only where a row reads it
    start = time.perf_counter()
    with (teacher_logits(teacher, training_batches(windows, args.batch_size, args.steps, 0), steps=args.steps,
                         tokenizer=tokenizer, top_k=args.top_k, temperature=args.temperature) if distilled
          else contextlib.nullcontext()) as logits:
        teacher_seconds = time.perf_counter() - start if distilled else 0.0
        for row in rows:
            loss, train = ROWS[row]
            model = slicegpt.load(args.student).model
            kd = loss == "distill"
            result = finetune(model, tokenizer, windows, train=train, teacher=logits if kd else None,
                              lr=args.lora_lr if train == "lora" else args.full_lr,
                              ce_weight=args.ce_weight if kd else 0.0, **settings)
            after = slicegpt.perplexity(result.model, held_out, progress=False)
            recovered = 1 - (math.log(after) - math.log(dense_ppl)) / (math.log(before) - math.log(dense_ppl))
            results.append({"row": row, "perplexity_after": after, "recovered": recovered,
                            "seconds": result.seconds, "seconds_per_step": result.seconds / args.steps,
                            "peak_memory_bytes": result.peak_memory_bytes,
                            "trainable_parameters": result.trainable_parameters,
                            "train_tokens": result.settings["train_tokens"], "lr": result.settings["lr"],
                            "kl": result.kl, "losses": result.losses})
            print(json.dumps({k: v for k, v in results[-1].items() if k not in ("kl", "losses")}))
        logits_bytes = logits.bytes() if distilled else 0

    print(f"\n{args.steps} steps x {args.batch_size} x {args.seqlen} tokens of {args.data}; held-out perplexity "
          f"({held_out.tokens} tokens): dense {dense_ppl:.2f}, sliced {before:.2f}; teacher logits "
          f"{logits_bytes / 2**20:.1f} MiB (top-{args.top_k} + rest), written in {teacher_seconds:.0f} s")
    print("| recovery | perplexity after | excess log-ppl recovered | trainable | s/step (indicative) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['perplexity_after']:.2f} | {r['recovered']:.0%} | {r['trainable_parameters']:,} | "
              f"{r['seconds_per_step']:.2f} |")
    save_results("distill", {"student": args.student, "teacher": teacher, "steps": args.steps,
                             "batch_size": args.batch_size, "seqlen": args.seqlen, "top_k": args.top_k,
                             "temperature": args.temperature, "ce_weight": args.ce_weight,
                             "perplexity_dense": dense_ppl, "perplexity_sliced": before, "eval_tokens": held_out.tokens,
                             "teacher_logits_bytes": logits_bytes, "teacher_seconds": teacher_seconds,
                             "rows": results})


if __name__ == "__main__":
    main()
