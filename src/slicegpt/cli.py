"""`slicegpt` command line: a thin layer over the public API.

Progress bars go to stderr; results to stdout, and with --json the last stdout line is one
JSON object. Bad input ends with a one-line `slicegpt: error: ...` and exit status 1 (2 for
malformed arguments), never a traceback.

`slice` and `eval` also run as a distributed job under `torchrun` (`core.distributed`): every
rank takes its share of the windows, rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import torch

from slicegpt.adapters import get_adapter, supported_model_types
from slicegpt.atomic import refuse_existing, refuse_overlap
from slicegpt.core.compensation import DENSE_SHARE, MIXED_RIDGE, RIDGE
from slicegpt.recipes import (ALLOCATIONS, COMPENSATIONS, DEFAULT_RECIPE, HEADS, POOLINGS, RECIPES, ROTATIONS,
                              WIDTH_RULES)
from slicegpt.version import __version__

FINETUNE_RECORD = "finetune.json"  # finetune.RECORD_NAME: marks a dense fine-tuned output (module imported lazily)
REPORT_PAGE = "index.html"  # what marks a report directory `--force` may replace
from slicegpt.core import distributed
from slicegpt.data import (DEFAULT_DATA, HUB_DATASETS, bos_token, check_window_length, evaluation_windows,
                           load_text, tokenize)
from slicegpt.errors import SliceGPTError, SliceGPTWarning
from slicegpt.formats.gguf import DTYPES as GGUF_DTYPES
from slicegpt.formats.loading import DEFAULT_MODEL, load_model
from slicegpt.evaluation.measure import measure
from slicegpt.evaluation.report import BENCH_KIND
from slicegpt.modeling.runtime import MANIFEST_NAME, CheckpointError
from slicegpt.evaluation.zero_shot import PAPER_TASKS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"slicegpt: error: {message} (see `{self.prog} --help`)\n")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _emit(args, rows: list[tuple[str, str]], figures: dict) -> None:
    if not getattr(args, "ranks", distributed.Ranks()).writer:  # rank 0 speaks for a distributed job
        return
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.json:
        print(json.dumps(figures))


def _device(name: str | None) -> str:
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise SliceGPTError("--device cuda was asked for but no CUDA device is available")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _eval_windows(tokenizer, text: str, args) -> object:
    return evaluation_windows(tokenize(tokenizer, text), args.eval_seqlen or args.seqlen, args.eval_samples,
                              bos=bos_token(tokenizer))


LEVER_FLAGS = ("rotation", "compensate", "ridge", "dense_share", "neurons", "allocation", "heads", "widths", "head",
               "pooling", "accept_deviation", "round_to")


def _settings(args):
    """The run's settings from the command line; levers not given stay None (the recipe's)."""
    from slicegpt.plan import SliceSettings

    levers = {name: getattr(args, name) for name in LEVER_FLAGS}
    levers["accept_deviation"] = True if args.accept_deviation else None
    return SliceSettings(recipe=args.recipe, size=args.size, slicing=args.slicing, **levers,
                         calibration=args.calibration, samples=args.samples, seqlen=args.seqlen, seed=args.seed,
                         text_field=args.text_field, batch_size=args.batch_size)


def _print_plan(args, plan) -> None:
    if args.ranks.writer:
        rows = plan.rows()
        width = max(len(k) for k, _ in rows)
        print("plan" + (" (dry run: nothing is read beyond the config, nothing written)" if args.dry_run else ""))
        for key, value in rows:
            print(f"  {key:<{width}}  {value}")
        sys.stdout.flush()


def _check_slice_arguments(args) -> None:
    """What argparse cannot say: counts, option pairs, the report directory (before any slow work)."""
    for name in ("samples", "seqlen", "batch_size", "eval_samples", "eval_batch_size", "checkpoint_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SliceGPTError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.eval_seqlen is not None and args.eval_seqlen < 1:
        raise SliceGPTError(f"--eval-seqlen must be a positive integer, got {args.eval_seqlen}")
    if args.report_bench and args.report is None:
        raise SliceGPTError("--report-bench applies to --report only")
    if args.no_eval and (args.eval_data or args.eval_seqlen):
        raise SliceGPTError("--eval-data and --eval-seqlen set the evaluation that --no-eval skips")


def cmd_slice(args) -> None:
    from slicegpt.api import plan_slice
    from slicegpt.evaluation.report import load_run, write_report
    from slicegpt.pipeline import slice_and_save

    _check_slice_arguments(args)
    settings = _settings(args)
    if args.dry_run:
        plan = plan_slice(args.model, settings)
        _print_plan(args, plan)
        if args.json:
            print(json.dumps({"plan": plan.to_dict()}))
        return
    if not args.out:
        raise SliceGPTError("an output directory is needed: --out DIR (or --dry-run to see the plan only)")
    out = Path(args.out)
    report_dir = Path(args.report) if args.report else None
    if report_dir is not None:
        a, b = out.resolve(), report_dir.resolve()
        if a == b or a in b.parents or b in a.parents:  # --force would let one replace the other
            raise SliceGPTError(f"--report {report_dir} and --out {out} must be separate directories")
        refuse_existing(report_dir, args.force, "report directory", ours=REPORT_PAGE)
    run = slice_and_save(
        args.model, out, settings, evaluate=not args.no_eval, eval_data=args.eval_data,
        eval_samples=args.eval_samples, eval_seqlen=args.eval_seqlen, eval_batch_size=args.eval_batch_size,
        dtype=args.dtype, device=_device(args.device), preload=args.preload, activations_dir=args.activations_dir,
        restart=args.restart, force=args.force, checkpoint_every=args.checkpoint_every,
        speed=bool(report_dir and args.report_bench), on_plan=lambda plan: _print_plan(args, plan))
    figures = run.figures
    if report_dir is not None and args.ranks.writer:  # from what was just saved, as `slicegpt report` reads it
        figures["report"] = str(write_report([load_run(out)], [], report_dir, force=args.force))
    _emit(args, _slice_summary(run), figures)


def _slice_summary(run) -> list[tuple[str, str]]:
    figures, config, plan = run.figures, run.config, run.plan
    rows = [("parameters", f"{config.parameters_dense:,} -> {config.parameters_sliced:,} "
                           f"({figures['parameter_ratio']:.1%} of the dense model)")]
    if plan.neurons is not None:
        counts = config.mlp_neurons_per_layer
        rows.append(("MLP neurons", f"{config.mlp_neurons_dense} -> {config.mlp_neurons} per layer"
                     + (f" on average ({min(counts)}..{max(counts)}, by measured loss)" if counts else "")))
    if plan.heads is not None:
        (groups, per_group), (kept, kept_per_group) = config.attention_heads_dense, config.attention_heads
        rows.append(("attention heads", f"{groups * per_group} ({groups} key/value x {per_group} query) -> "
                                        f"{kept * kept_per_group} ({kept} x {kept_per_group}) per layer"
                                        + (" (weighed against MLP neurons by measured loss)" if plan.head_costs
                                           else "")))
    if not plan.identity:
        rows.append(("hidden size", f"{config.hidden_size} -> {config.sliced_hidden_size}"
                                    + (" (mean over boundaries)" if plan.layout == "per-layer" else "")))
    rows.append(("output", plan.output))
    if "perplexity_sliced" in figures:
        rows.append(("perplexity", f"{figures['perplexity_dense']:.3f} -> {figures['perplexity_sliced']:.3f} "
                                   f"({figures['eval_tokens']:,} tokens of {figures['eval_data']})"))
    if config.deviations:
        exact = f"; exact sliced model {figures['perplexity_exact']:.3f}" if "perplexity_exact" in figures else ""
        deviation = figures.get("max_logit_deviation")
        rows.append(("deviation", (f"max |logit difference| {deviation:.3g}{exact} " if deviation is not None else "")
                     + f"({'; '.join(config.deviations)})"))
    if run.resumed_from_layer is not None:
        rows.append(("resumed", f"after layer {run.resumed_from_layer} of an interrupted run"))
    rows += [("slicing time", f"{figures['slicing_seconds']:.1f} s"), ("peak memory", _gib(figures["peak_memory_bytes"])),
             ("saved to", str(run.out))]
    if "report" in figures:
        rows.append(("report", figures["report"]))
    return rows


def cmd_eval(args) -> None:
    from slicegpt.evaluation.perplexity import count_parameters, perplexity

    ranks = args.ranks
    from slicegpt.plan import check_counts

    check_counts(samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size)  # before the model loads
    ranks.agree({k: v for k, v in vars(args).items() if k not in ("func", "ranks")})
    device = distributed.local_device(_device(args.device), ranks)
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    check_window_length(loaded.model.config, args.seqlen)
    windows = evaluation_windows(tokenize(loaded.tokenizer, load_text(args.data, "evaluation", args.text_field)),
                                 args.seqlen, args.samples, bos=bos_token(loaded.tokenizer))
    with measure(device) as m:
        ppl = perplexity(loaded.model, windows, args.batch_size, ranks=ranks)  # each rank its share of the windows
    figures = {"model": str(args.model), "sliced": loaded.sliced is not None, "perplexity": ppl,
               "parameters": count_parameters(loaded.model), "tokens": windows.tokens,
               "seconds": m.seconds, "peak_memory_bytes": m.peak_bytes, "world_size": ranks.world_size}
    _emit(args, [("model", figures["model"] + (" (sliced)" if figures["sliced"] else "")),
                 ("perplexity", f"{ppl:.3f} ({windows.tokens:,} tokens of {args.data})"),
                 ("parameters", f"{figures['parameters']:,}"), ("time", f"{m.seconds:.1f} s"),
                 ("peak memory", _gib(m.peak_bytes))], figures)


def cmd_generate(args) -> None:
    from slicegpt.api import generate

    loaded = load_model(args.model, dtype=args.dtype, device=_device(args.device))
    text = generate(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens, chat=args.chat,
                    sample=args.sample, seed=args.seed)
    if args.json:
        print(json.dumps({"model": str(args.model), "prompt": args.prompt, "text": text}))
    else:
        print(args.prompt + text)


def _source_gguf(source: str) -> Path | None:
    """The GGUF file a model came from (its tokenizer is copied field for field), if it is one."""
    from slicegpt.formats.loading import EMBEDDED_MODELS

    try:
        path = EMBEDDED_MODELS[source]() if source in EMBEDDED_MODELS else Path(source)
    except SliceGPTError:
        return None
    return path if path.suffix == ".gguf" and path.is_file() else None


def _export_source(spec: str):
    """(the loaded model, the GGUF it came from): a slicegpt output, or a dense model to compare with."""
    from slicegpt.formats.loading import load

    directory = Path(spec)
    if not (directory / MANIFEST_NAME).is_file():  # dense: a directory, a .gguf file, default, a hub id
        loaded = load_model(spec, dtype="float32")
        return loaded, _source_gguf(loaded.source)  # the embedded models' source is their GGUF file
    loaded = load(directory, dtype="float32")
    slicing = loaded.sliced.get("slicing", {})
    if not slicing.get("standard") and not slicing.get("mlp_neurons_per_layer"):
        raise SliceGPTError(f"{directory} was sliced with per-layer rotations (a matrix on every skip connection), "
                            "which GGUF cannot hold; slice it again with --rotation uniform, or with the default recipe at a "
                            "--size that MLP neurons alone meet (a stock model)")
    return loaded, _source_gguf(slicing.get("source_model", ""))


def cmd_export(args) -> None:
    from slicegpt.core.weights import layer_mlp_neurons
    from slicegpt.formats.gguf import (check_pad_neurons, embedding_length, export_gguf, feed_forward_length,
                                       tensor_types)

    check_pad_neurons(args.pad_neurons)  # before loading anything
    check_pad_neurons(args.pad_stream, "--pad-stream")
    out = Path(args.out)
    refuse_existing(out, args.force, ours=b"GGUF")  # before loading anything; --force replaces only a GGUF file
    if Path(str(args.model)).exists():
        refuse_overlap(out, Path(str(args.model)))
    loaded, source_gguf = _export_source(str(args.model))
    name = Path(str(args.model)).name or str(args.model)
    path = export_gguf(loaded.model, loaded.tokenizer, out, dtype=args.dtype, source_gguf=source_gguf,
                       force=args.force, pad_neurons=args.pad_neurons, pad_stream_to=args.pad_stream,
                       name=f"{name} ({'slicegpt' if loaded.sliced else 'dense'})")
    types = tensor_types(path)
    neurons = layer_mlp_neurons(loaded.model, get_adapter(loaded.model.config)) if loaded.sliced else None
    neurons = neurons[0] if neurons and len(set(neurons)) == 1 else neurons
    neurons = neurons or getattr(loaded.model.config, "intermediate_size", None)
    written = feed_forward_length(path)
    width, width_written = loaded.model.config.hidden_size, embedding_length(path)
    figures = {"model": str(args.model), "out": str(path), "format": args.format, "dtype": args.dtype,
               "bytes": path.stat().st_size, "tensor_types": types, "sliced": bool(loaded.sliced),
               "mlp_neurons": neurons, "mlp_neurons_written": written, "pad_neurons": args.pad_neurons,
               "hidden_size": width, "hidden_size_written": width_written, "pad_stream": args.pad_stream,
               "tokenizer": "copied from " + str(source_gguf) if source_gguf else "built from tokenizer.json"}
    _emit(args, [("model", f"{args.model} ({'sliced' if loaded.sliced else 'dense'})"),
                 ("written", f"{path} ({figures['bytes'] / 2**20:.1f} MiB, {args.dtype})"),
                 ("tensors", ", ".join(f"{n} {kind}" for kind, n in types.items())),
                 *([("mlp neurons", f"{written} ({written - neurons} zero neurons pad {neurons} to a multiple of "
                                   f"{args.pad_neurons})")] if isinstance(neurons, int) and isinstance(written, int)
                   and written != neurons else []),
                 *([("mlp neurons", f"{min(written)}..{max(written)} per layer (each layer its own, padded to a "
                                   f"multiple of {args.pad_neurons})")] if isinstance(written, list) else []),
                 *([("mlp neurons", f"{written} in every layer: this llama.cpp architecture has one MLP width, so "
                                   f"zero neurons pad the layers' {min(neurons)}..{max(neurons)} (exact; slice with "
                                   "--allocation equal for a smaller file)")]
                   if isinstance(neurons, list) and isinstance(written, int) else []),
                 *([("stream width", f"{width_written} ({width_written - width} zero dimensions pad {width} to a "
                                    f"multiple of {args.pad_stream})")] if width_written and width_written != width
                   else []),
                 ("tokenizer", figures["tokenizer"])], figures)


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: a number of documents or a fraction < 1") from None
    return int(value) if value >= 1 and value.is_integer() else value


def cmd_lm_eval(args) -> None:
    import logging

    from slicegpt.evaluation.zero_shot import load_tasks, zero_shot

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on pre-built models would bury ours
    tasks = load_tasks(args.tasks, args.include_path)  # unknown or unreachable tasks fail before the model loads
    device = _device(args.device)
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    with measure(device) as m:
        result = zero_shot(loaded.model, loaded.tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                           num_fewshot=args.num_fewshot)
    sliced = loaded.sliced is not None
    figures = {"model": str(args.model), "sliced": sliced, **result.to_dict(), "batch_size": args.batch_size,
               "seconds": m.seconds}
    shots = "few-shot: task default" if args.num_fewshot is None else f"{args.num_fewshot}-shot"
    print(f"model {args.model}{' (sliced)' if sliced else ''}; {shots}; "
          f"{'first ' + str(args.limit) + ' documents per task; ' if args.limit else ''}{m.seconds:.1f} s")
    print("| task | metric | value | stderr |")
    print("|---|---|---|---|")
    for s in result.scores:
        for metric in ("acc", "acc_norm"):
            value, stderr = getattr(s, metric), getattr(s, f"{metric}_stderr")
            if value is not None:
                mark = " *" if metric == s.metric else ""
                print(f"| {s.task} | {metric}{mark} | {value:.4f} | {'-' if stderr is None else f'{stderr:.4f}'} |")
    n = len(result.scores)
    print(f"| average | * ({n} task{'s' if n > 1 else ''}) | {result.average:.4f} | |")
    print("* the metric each task adds to the average: acc_norm where the task reports it, else acc (as in the "
          "SliceGPT paper)")
    if args.json:
        print(json.dumps(figures))


def _student_tokenizer(model: str, dtype, device: str):
    """The student's tokenizer before its weights load: read from its directory, else from the whole model."""
    path = Path(model)
    if path.is_dir() and any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    return load_model(model, dtype=dtype, device=device).tokenizer  # a dense student (GGUF, hub): rare


def _finetune_settings(args) -> dict:
    return dict(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, steps=args.steps,
                lr=args.lr, batch_size=args.batch_size, seqlen=args.seqlen, eval_samples=args.eval_samples,
                eval_seqlen=args.eval_seqlen, eval_batch_size=args.eval_batch_size, seed=args.seed,
                text_field=args.text_field, evaluate=not args.no_eval, train=args.train)


def _distilled(args, device: str):
    """The teacher's pass first (its logits to a temporary folder, the teacher freed), then the student's training:
    one model in memory at a time."""
    from slicegpt.distill import resolve_teacher, teacher_logits
    from slicegpt.finetune import finetune, training_batches, training_windows

    teacher = resolve_teacher(args.model, args.teacher)
    tokenizer = _student_tokenizer(args.model, args.dtype, device)
    windows = training_windows(tokenizer, args.data, args.eval_data, args.seqlen, args.seed, args.text_field)
    batches = training_batches(windows, args.batch_size, args.steps, args.seed)
    with teacher_logits(teacher, batches, steps=args.steps, tokenizer=tokenizer, top_k=args.top_k,
                        temperature=args.temperature, dtype=args.dtype, device=device) as logits:
        loaded = load_model(args.model, dtype=args.dtype, device=device)
        result = finetune(loaded.model, loaded.tokenizer, args.data, args.eval_data, teacher=logits,
                          ce_weight=args.ce_weight, **_finetune_settings(args))
    return loaded, result


def cmd_finetune(args) -> None:
    from slicegpt.distill import check_distill_settings
    from slicegpt.finetune import check_settings, finetune, save_finetuned
    from slicegpt.plan import check_counts

    check_settings(args.lora_r, args.lora_alpha, args.lora_dropout, args.steps, args.lr, args.batch_size,
                   args.seqlen, args.train)  # before any slow work
    check_counts(eval_samples=args.eval_samples, eval_seqlen=args.eval_seqlen, eval_batch_size=args.eval_batch_size)
    distill = args.loss == "distill"
    if distill:
        check_distill_settings(args.top_k, args.temperature, args.ce_weight)
    elif args.teacher:
        raise SliceGPTError("--teacher names the model to distill from; add --loss distill")
    out = Path(args.out) if args.out else None
    if args.adapters_only and out is None:
        raise SliceGPTError("--adapters-only says how to save; pass --out DIR too")
    if args.adapters_only and args.train == "full":
        raise SliceGPTError("--adapters-only saves LoRA adapters; --train full changes the weights themselves")
    if out is not None:
        refuse_existing(out, args.force, "output directory", ours=(MANIFEST_NAME, FINETUNE_RECORD))
        if Path(args.model).exists():
            refuse_overlap(out, Path(args.model))
    device = _device(args.device)
    if distill:
        loaded, result = _distilled(args, device)
    else:
        loaded = load_model(args.model, dtype=args.dtype, device=device)
        result = finetune(loaded.model, loaded.tokenizer, args.data, args.eval_data, **_finetune_settings(args))
    kind = ("dense" if loaded.sliced is None else
            "standard sliced" if loaded.sliced.get("slicing", {}).get("standard") else "per-layer sliced")
    figures = {"model": str(args.model), "kind": kind, **result.record()}
    if out is not None:
        save_finetuned(result, loaded.tokenizer, out, loaded.sliced, adapters_only=args.adapters_only,
                       force=args.force, source=str(loaded.source))
        figures["out"] = str(out)
    loss_start, loss_end = result.loss_summary()
    what = (f"LoRA parameters ({result.trainable_parameters / result.parameters:.2%} of {result.parameters:,}; "
            f"r={args.lora_r}" if args.train == "lora" else
            f"weights ({result.trainable_parameters / result.parameters:.2%} of {result.parameters:,}; full")
    rows = [("model", f"{args.model} ({kind})"),
            ("trainable", f"{result.trainable_parameters:,} {what} on {', '.join(figures['target_modules'])})"),
            ("training", f"{args.steps} steps x {args.batch_size} x {args.seqlen} tokens of {args.data}; "
                         f"loss {loss_start:.3f} -> {loss_end:.3f} (means over the first and last tenth)")]
    if distill:
        k = max(1, len(result.kl) // 10)
        rows.append(("distillation", f"KL to {figures['teacher']} {sum(result.kl[:k]) / k:.4f} -> "
                                     f"{sum(result.kl[-k:]) / k:.4f} nats/token (T={args.temperature:g}, top-{args.top_k} "
                                     f"+ rest, next-token weight {args.ce_weight:g}; teacher logits "
                                     f"{figures['teacher_logits_bytes'] / 2**20:.1f} MiB, removed)"))
    if result.perplexity_before is not None:
        rows.append(("perplexity", f"{result.perplexity_before:.3f} -> {result.perplexity_after:.3f} "
                                   f"({result.eval_tokens:,} held-out tokens of {figures['eval_data']})"))
    rows += [("time", f"{result.seconds:.1f} s training"), ("peak memory", _gib(result.peak_memory_bytes))]
    if out is not None:
        how = "adapter in lora/, weights unchanged" if args.adapters_only else "merged"
        rows.append(("saved to", f"{out} ({how})"))
    _emit(args, rows, figures)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SliceGPTError(f"{what} must be comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SliceGPTError(f"{what} must be comma-separated positive integers, got {text!r}")
    return values


def _bench_save_path(args) -> Path | None:
    """--save checked before anything is measured."""
    save_path = Path(args.save) if args.save else None
    if save_path is not None and save_path.is_dir():
        raise SliceGPTError(f"--save {save_path} is a directory; give a file name")
    if save_path is not None:
        refuse_existing(save_path, args.force, ours=b"{")  # --force replaces only a JSON record
    return save_path


def _bench_record(args, record: dict, save_path: Path | None) -> None:
    if save_path is not None:  # a record `slicegpt report` reads; written whole or not at all
        from slicegpt.atomic import atomic_file

        with atomic_file(save_path, force=True) as tmp:  # existence checked before measuring
            tmp.write_text(json.dumps(record, indent=1))
        print(f"saved {save_path}")
    if args.json:
        print(json.dumps(record))


def _bench_engine(args) -> str:
    """llama.cpp for a .gguf file given by path (where GGUF files run), else PyTorch."""
    if args.engine != "auto":
        return args.engine
    return "llama.cpp" if str(args.model).lower().endswith(".gguf") else "torch"


def cmd_bench(args) -> None:
    from slicegpt.evaluation.speed import speed_report

    if (args.threads is not None and args.threads < 1) or args.repeats < 1 or args.decode_tokens < 1:
        raise SliceGPTError("--threads, --repeats and --decode-tokens must be positive")
    if _bench_engine(args) == "llama.cpp":
        return _bench_gguf(args)
    batch_sizes = _int_list(args.batch_sizes or "1,4", "--batch-sizes")
    seqlens = _int_list(args.seqlens or "128,512", "--seqlens")
    save_path = _bench_save_path(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    compare = args.compare
    if compare is None and loaded.sliced is not None:  # a slicegpt output: its dense source, if at hand
        compare = loaded.sliced.get("slicing", {}).get("source_model") or None
    models = []
    if compare:
        dense = load_model(compare, dtype=args.dtype, device=device)
        models.append((f"dense {Path(compare).name if Path(compare).exists() else compare}", dense.model))
    models.append((str(args.model) + (" (sliced)" if loaded.sliced is not None else ""), loaded.model))
    rows = speed_report(models, batch_sizes, seqlens, args.decode_tokens, args.repeats)
    base = {(r.phase, r.batch, r.seqlen): r for r in rows if compare and r.model == models[0][0]}
    mib = 2**20
    print(f"device {device}; torch threads {torch.get_num_threads()}; prefill = whole prompt, logits for the last "
          f"position; decode = {args.decode_tokens} tokens with the KV cache after the prompt; median of {args.repeats}")
    print("| model | batch | prompt | prefill tok/s | prefill speedup | decode ms/token | decode speedup "
          "| peak working MiB (prefill/decode) | weights MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    figures = []
    for index, (name, _) in enumerate(models):
        role = "dense" if compare and index == 0 else "sliced" if loaded.sliced is not None else "model"
        for batch in batch_sizes:
            for seqlen in seqlens:
                pre = next(r for r in rows if (r.model, r.phase, r.batch, r.seqlen) == (name, "prefill", batch, seqlen))
                dec = next(r for r in rows if (r.model, r.phase, r.batch, r.seqlen) == (name, "decode", batch, seqlen))
                ref_pre, ref_dec = base.get(("prefill", batch, seqlen)), base.get(("decode", batch, seqlen))
                up_pre = pre.tokens_per_second / ref_pre.tokens_per_second if ref_pre else None
                up_dec = ref_dec.ms_per_token / dec.ms_per_token if ref_dec else None
                print(f"| {name} | {batch} | {seqlen} | {pre.tokens_per_second:,.0f} | "
                      f"{f'{up_pre:.2f}x' if up_pre else '-'} | {dec.ms_per_token:.2f} | "
                      f"{f'{up_dec:.2f}x' if up_dec else '-'} | {pre.peak_bytes / mib:.0f}/{dec.peak_bytes / mib:.0f} | "
                      f"{pre.weight_bytes / mib:.0f} |")
                figures += [dict(pre.to_dict(), speedup=up_pre, role=role),
                            dict(dec.to_dict(), speedup=up_dec, role=role)]
    record = {"kind": BENCH_KIND, "engine": "torch", "model": str(args.model), "compare": compare, "device": device,
              "torch_threads": torch.get_num_threads(), "decode_tokens": args.decode_tokens,
              "repeats": args.repeats, "rows": figures}
    _bench_record(args, record, save_path)


def _bench_gguf(args) -> None:
    """`bench FILE.gguf [--compare DENSE.gguf]`: both files in llama.cpp, in turns (evaluation.speed.gguf_bench)."""
    from slicegpt.evaluation.speed import GGUF_SEQLENS, gguf_bench

    if args.batch_sizes and _int_list(args.batch_sizes, "--batch-sizes") != [1]:
        raise SliceGPTError("llama.cpp is measured at batch 1 only; leave out --batch-sizes")
    if args.dtype or (args.device and args.device != "cpu"):
        raise SliceGPTError("a GGUF file runs in llama.cpp's CPU build with its own tensor types; "
                            "leave out --dtype and --device")
    seqlens = _int_list(args.seqlens, "--seqlens") if args.seqlens else list(GGUF_SEQLENS)
    save_path = _bench_save_path(args)
    result = gguf_bench(args.model, args.compare, seqlens, args.decode_tokens, args.repeats, args.threads)
    compared = bool(result.limits)
    print(f"llama.cpp {result.llama_cpp} (node-llama-cpp {result.node_llama_cpp}, CPU build); threads "
          f"{result.threads}; batch 1; pp = a prompt of random token ids in one batch; tg = {args.decode_tokens} "
          f"tokens generated greedily after it; median of {args.repeats} turn(s)"
          + (", the files alternating" if compared else ""))
    if compared:
        print("limits in brackets: pp by the weights' multiply-adds per token, tg by the file sizes (bytes read "
              "per token)")
    print("| model | prompt | pp tok/s | pp speedup | tg tok/s | tg ms/token | tg speedup | file MiB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {(r.model, r.phase, r.seqlen): r for r in result.rows}
    for model in dict.fromkeys(r.model for r in result.rows):
        for seqlen in seqlens:
            pre, dec = rows[(model, "prefill", seqlen)], rows[(model, "decode", seqlen)]
            up = {r.phase: f"{r.speedup:.2f}x ({r.limit:.2f}x)" if r.speedup else "-" for r in (pre, dec)}
            print(f"| {pre.role} {Path(model).name} | {seqlen} | {pre.tokens_per_second:,.0f} | {up['prefill']} | "
                  f"{dec.tokens_per_second:,.1f} | {dec.ms_per_token:.2f} | {up['decode']} | "
                  f"{pre.file_bytes / 2**20:.1f} |")
    record = {"kind": BENCH_KIND, "engine": "llama.cpp", "model": str(args.model), "compare": args.compare,
              "device": "cpu (llama.cpp)", "llama_cpp": result.llama_cpp, "node_llama_cpp": result.node_llama_cpp,
              "threads": result.threads, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
              "limits": result.limits, "rows": [r.to_dict() for r in result.rows]}
    _bench_record(args, record, save_path)


def cmd_report(args) -> None:
    from slicegpt.evaluation.report import Frontier, gather, write_report

    out = Path(args.out)
    for path in args.paths:
        refuse_overlap(out, Path(path), "the run")  # --force would replace an input
    refuse_existing(out, args.force, "report directory", ours=REPORT_PAGE)  # before reading anything
    runs, records = gather(args.paths)
    page = write_report(runs, records, out, force=args.force)
    files = sorted(p.name for p in out.iterdir())
    frontiers = sum(isinstance(r, Frontier) for r in records)
    figures = {"out": str(out), "page": str(page), "runs": [r.path for r in runs],
               "bench_records": len(records) - frontiers, "frontier_records": frontiers, "files": files}
    missing = [r.name for r in runs if r.spectra is None]
    rows = [("runs", ", ".join(r.name for r in runs) or "-"), ("bench records", str(len(records) - frontiers)),
            *([("frontier records", str(frontiers))] if frontiers else []),
            ("figures", ", ".join(f for f in files if f.endswith(".png")) or "-")]
    if missing:
        rows.append(("spectra", f"unavailable for {', '.join(missing)} (saved before slicegpt recorded them)"))
    rows.append(("report", str(page)))
    _emit(args, rows, figures)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or float64 (default: float32; a "
                   "slicegpt output: the dtype it was saved in)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl data")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")


def _distributed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others at a collective or at the start "
                        f"before the job ends with an error (default {distributed.TIMEOUT_S:.0f}, or "
                        f"${distributed.TIMEOUT_ENV})")


def build_parser() -> argparse.ArgumentParser:
    data_help = f"'{DEFAULT_DATA}' (offline default), {', '.join(HUB_DATASETS)} (hub), or a .txt/.jsonl path"
    model_help = (f"'{DEFAULT_MODEL}' (embedded SmolLM2-135M-Instruct), 'gemma3-270m', a hub id, a model directory or a .gguf "
                  f"file; supported model types: {', '.join(supported_model_types())}")
    parser = _Parser(prog="slicegpt", description="Make causal language models smaller by deleting rows and "
                     "columns of their weights (SliceGPT), refitting what remains and pruning MLP neurons.")
    parser.add_argument("--version", action="version", version=f"slicegpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("slice", help="compress a model: a recipe plus a size; prints the plan, perplexity and "
                                     "parameters, saves the result",
                       description="Compress a model. A run is a recipe plus a size: --size 0.8 keeps 80% of the "
                                   "dense model's parameters (every parameter counted). The plan is printed first; "
                                   "--dry-run prints only the plan, reading nothing but the model's config.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--size", type=float, metavar="FRACTION",
                      help="the share of the dense model's parameters to keep, e.g. 0.8 (every parameter counted)")
    size.add_argument("--slicing", type=float, metavar="FRACTION",
                      help="the paper's measure instead: the share of the hidden width to remove, e.g. 0.25 "
                           "(for runs that prune no MLP neurons: --recipe paper, or --neurons off)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULT_RECIPE,
                   help="default: MLP neurons pruned first with every step refitted against the dense model, "
                        "the stream sliced only for the rest (the measured best); max: the default's levers with "
                        "the dense model on every window and 128 calibration windows (better, about five times "
                        "slower); paper: the paper's algorithm, whose own size is --slicing (default: "
                        f"{DEFAULT_RECIPE}; docs/how-it-works.md)")
    p.add_argument("--out", default=None, help="output directory (written atomically; needed unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (widths, neurons, head, predicted "
                   "parameters, output class) and stop; reads only the model's config")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")

    g = p.add_argument_group("calibration")
    g.add_argument("--calibration", default=DEFAULT_DATA, help=data_help)
    g.add_argument("--samples", type=int, default=None,
                   help="calibration windows (default: the recipe's, 32; the max recipe's 128)")
    g.add_argument("--seqlen", type=int, default=1024, help="tokens per calibration window (default 1024)")
    g.add_argument("--seed", type=int, default=0, help="seed for choosing the calibration windows")
    g.add_argument("--text-field", default="text", help="field holding the text in .jsonl data")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data", default=None, help="perplexity data (default: the calibration source's "
                   "evaluation part; a local file is split 90/10 between the two)")
    g.add_argument("--eval-samples", type=int, default=16, help="evaluation windows (default 16)")
    g.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window length (default: --seqlen)")
    g.add_argument("--eval-batch-size", type=int, default=2, help="evaluation windows per forward pass (default 2)")
    g.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    g.add_argument("--report", default=None, metavar="DIR",
                   help="also write an HTML report of this run (spectra, perplexity) to DIR")
    g.add_argument("--report-bench", action="store_true",
                   help="add a quick speed check to --report (batch 1, 128-token prompt; dense then sliced, "
                        "not in turns: `slicegpt bench --save` is the careful measurement; loads both models whole)")

    g = p.add_argument_group("expert levers", "each overrides the recipe; an option the recipe, the size or the "
                                              "model would ignore is refused")
    g.add_argument("--rotation", choices=ROTATIONS, default=None,
                   help="per-layer: a basis per block boundary and a matrix on each skip connection (slicegpt "
                        "format); uniform: one basis, saved as the family's stock model (GGUF-exportable)")
    g.add_argument("--compensate", choices=COMPENSATIONS, default=None,
                   help="refit each step's output weights (writers) or its input weights too (all) against the "
                        "dense model, or not (off)")
    g.add_argument("--ridge", type=float, default=None,
                   help=f"compensation's regulariser, relative to the mean input energy (default {RIDGE}; "
                        f"{MIXED_RIDGE} where MLP neurons are pruned beside a sliced stream)")
    g.add_argument("--dense-share", type=float, default=None, metavar="FRACTION",
                   help="compensation: the share of the calibration windows the dense model also runs on "
                        f"(default {DENSE_SHARE}; 1 = all, the most exact and slowest)")
    g.add_argument("--neurons", default=None, metavar="auto|off|FRACTION",
                   help="MLP neurons kept per layer, pruned in compensation's refit: auto (the default recipe's: "
                        "the size is met by pruning neurons first, at least 40%% kept), off, or a fraction to keep")
    g.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="how pruned MLP neurons are shared among layers: measured (the default recipe's: each "
                        "layer's count by its measured loss, the same total; the output keeps the family's layers, "
                        "each MLP its own width: slicegpt.load, GGUF) or equal (one count everywhere: a stock "
                        "transformers class)")
    g.add_argument("--heads", default=None, metavar="auto|off|FRACTION|GxR",
                   help="attention heads kept per layer, pruned in compensation's refit of the output projection "
                        "(OBS on whole heads): auto (the default recipe's: while the stream stays whole, each head "
                        "layout that keeps it so is weighed against the MLP neurons its parameters would keep, by "
                        "the probe's measured loss (--allocation measured); Gemma 2/3 past the MLP neuron floor "
                        "prune heads instead of slicing the stream; elsewhere every head stays), off, a fraction "
                        "of the query heads, or GxR: G "
                        "key/value heads with R query heads each (e.g. 2x3 of SmolLM2's 3x3: one whole group); "
                        "with --size the neurons fill the rest of the budget. Llama-like families (llama, mistral, "
                        "qwen2, qwen3, gemma, gemma2, gemma3_text)")
    g.add_argument("--widths", choices=WIDTH_RULES, default=None,
                   help="per-layer: one width everywhere (equal), each boundary its own within the size "
                        "(adaptive; helped SmolLM2, hurt Gemma 3), or auto (the default recipe's: adaptive where "
                        "MLP neurons are pruned beside the sliced stream, else equal)")
    g.add_argument("--head", choices=HEADS, default=None,
                   help="a head tied to the embeddings: auto (kept tied where that is exact), untied (slice the "
                        "embeddings, untie the head: the paper's way), sliced (also slice the head's input), fit "
                        "(uniform: keep it tied with a fitted final-norm gain)")
    g.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="uniform: weigh every block boundary equally (unit-trace, default) or by its raw energy "
                        "(tokens; Gemma 3 needs it) when pooling their covariances")
    g.add_argument("--accept-deviation", action="store_true",
                   help="uniform: write a stock model even where the stock class only approximates the sliced "
                        "one (Gemma 2/3 branch-output norms, Qwen3 q/k-norm epsilon); the cost is reported")
    g.add_argument("--round-to", type=int, default=None,
                   help="widths and neuron counts are multiples of this (default 8)")

    g = p.add_argument_group("resources")
    g.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or float64 to slice in (default: "
                   "the checkpoint's own dtype, the one its config.json names: bfloat16 for most hub models; "
                   "float32 for a .gguf file or a config that names none); statistics are float64 either way")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward pass (default 4)")
    g.add_argument("--preload", action="store_true",
                   help="load the dense model into CPU memory first (a GPU run of a model that fits in RAM); "
                        "by default its weights are read from its files one layer at a time")
    g.add_argument("--activations-dir", default=None, metavar="DIR",
                   help="keep the calibration activations on disk under DIR instead of in CPU memory (memory "
                        "then stays flat however many samples)")
    g.add_argument("--restart", action="store_true",
                   help="discard the progress of an interrupted run with the same --out and start over "
                        "(by default the same command continues where it stopped)")
    g.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                   help="save the calibration activations for resuming every N layers (default 1; a crash "
                        "redoes at most N-1 layers)")
    _distributed_options(g)
    p.set_defaults(func=cmd_slice)

    p = sub.add_parser("eval", help="perplexity of a dense or sliced model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help + ", or a sliced model directory")
    p.add_argument("--data", default=DEFAULT_DATA, help=data_help + " (its evaluation part)")
    p.add_argument("--samples", type=int, default=16, help="evaluation windows (default 16; fewer if the text is short)")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    _common(p)
    _distributed_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt with a dense or sliced model")
    p.add_argument("model", help=model_help + ", or a sliced model directory")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_generate)

    from slicegpt.distill import TOP_K
    from slicegpt.finetune import DISTILL_CE_WEIGHT, TRAINS

    p = sub.add_parser("finetune", help="recover a sliced model's quality with LoRA adapters or full weights, on "
                                        "next-token loss or by distillation from the dense model; report perplexity")
    p.add_argument("model", help=model_help + ", or a sliced model directory")
    p.add_argument("--data", default=DEFAULT_DATA, help=data_help + " (training text: its calibration part)")
    p.add_argument("--eval-data", default=None, help="held-out perplexity data (default: --data's evaluation "
                   "part; a local file is split 90/10 between training and evaluation)")
    p.add_argument("--lora-r", type=int, default=8, help="rank of the LoRA adapters (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator: updates are "
                   "scaled by alpha/r (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter inputs (default 0: "
                   "a few hundred steps see each window once at most)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--train", choices=TRAINS, default="lora", help="lora: adapters on the attention and MLP "
                   "linears (default); full: those linears' own weights (skip matrices, norms and embeddings stay)")
    p.add_argument("--loss", choices=("next-token", "distill"), default="next-token", help="next-token "
                   "(default), or distill: KL to the dense teacher's next-token distributions")
    p.add_argument("--teacher", default=None, help="--loss distill: the dense model (default: the source model "
                   "recorded in the sliced directory's slicegpt.json); it needs the student's vocabulary")
    p.add_argument("--temperature", type=float, default=1.0, help="--loss distill: softmax temperature of both "
                   "distributions (default 1; the loss is scaled by T^2)")
    p.add_argument("--top-k", type=int, default=TOP_K, help=f"--loss distill: teacher tokens kept per position, "
                   f"the rest as one bucket (default {TOP_K})")
    p.add_argument("--ce-weight", type=float, default=DISTILL_CE_WEIGHT, help="--loss distill: share of "
                   f"next-token loss mixed in (default {DISTILL_CE_WEIGHT:g}; 0 for the KL alone)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, AdamW (default 1e-3 for lora, "
                   "1e-4 for full)")
    p.add_argument("--batch-size", type=int, default=4, help="training windows per step (default 4)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per training window (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for the adapters' init, dropout and window order")
    p.add_argument("--eval-samples", type=int, default=16, help="evaluation windows (default 16, as eval)")
    p.add_argument("--eval-seqlen", type=int, default=1024, help="evaluation window length (default 1024, as eval)")
    p.add_argument("--eval-batch-size", type=int, default=2)
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    p.add_argument("--out", default=None, help="output directory (written atomically; default: save nothing)")
    p.add_argument("--adapters-only", action="store_true", help="keep the weights unchanged and save the LoRA "
                   "adapter in OUT/lora (slicegpt merges it on load) instead of merging it")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    _common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("bench", help="prefill throughput, decode latency and memory, dense and sliced side by "
                       "side; a .gguf file in real llama.cpp")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help + ", or a sliced model directory; "
                   "a .gguf path is measured in llama.cpp (scripts/llama_cpp_setup.sh installs it)")
    p.add_argument("--compare", default=None, help="the dense model to compare with (default: a sliced "
                   "directory's source model); in llama.cpp a .gguf file, measured in turns with MODEL")
    p.add_argument("--engine", choices=["auto", "torch", "llama.cpp"], default="auto",
                   help="where to measure (default auto: llama.cpp for a .gguf path, else PyTorch; torch "
                        "dequantizes a GGUF file)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4; llama.cpp: 1 only)")
    p.add_argument("--seqlens", default=None, help="prompt lengths, comma-separated (default 128,512)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per decode measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per setting (the median is shown)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (llama.cpp default: all cores, "
                   "os.cpu_count(); PyTorch: its own default unless given)")
    p.add_argument("--save", default=None, metavar="FILE",
                   help="write the figures as a JSON record that `slicegpt report` reads")
    p.add_argument("--force", action="store_true", help="replace an existing --save file")
    _common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="an HTML page with plots (spectra, perplexity vs sparsity, throughput, "
                                      "GGUF size/quality frontier) over saved runs and records")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_RECORD_JSON",
                   help="slicegpt output directories, `bench --save` files and bench/gguf_quant.py records")
    p.add_argument("--out", required=True, help="report directory: index.html and PNGs (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing report directory")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("lm-eval", help="zero-shot accuracy with lm-evaluation-harness (piqa, hellaswag, ... or "
                       "local tasks)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help + ", or a sliced model directory")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS),
                   help=f"comma-separated lm-eval task names (default: the paper's {','.join(PAPER_TASKS)}, which "
                        "need the Hugging Face hub or its cache); offline: shakespeare_next_line (shipped)")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="a directory of your own lm-eval task YAML files (lm-eval's --include_path)")
    p.add_argument("--limit", type=_limit, default=None, metavar="N",
                   help="only the first N documents of each task (or a fraction < 1); for quick checks")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (right-padded; default 8)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own; "
                   "0 for the paper's tasks)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or float64 (default: float32; a "
                   "slicegpt output: the dtype it was saved in)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("export", help="write a stock model (uniformly sliced, or dense) as a GGUF file for llama.cpp")
    p.add_argument("model", help="a slicegpt output sliced to a stock model (--rotation uniform, or the default "
                   "recipe meeting --size with MLP neurons), or a dense model to compare with: default, a .gguf "
                   "file, a directory or a hub id")
    p.add_argument("--format", choices=("gguf",), default="gguf")
    p.add_argument("--dtype", choices=GGUF_DTYPES, default="f16",
                   help="type of the matrices (default f16): f32, f16, bf16 and q8_0 are written directly; q4_0, "
                   "q4_k_m, q5_k_m and q6_k by llama.cpp's own quantizer (scripts/llama_cpp_setup.sh installs it). "
                   "Norms and other 1-D tensors stay f32; matrices whose rows are not whole quantization blocks "
                   "fall back to f16 (the summary line counts each type)")
    p.add_argument("--pad-neurons", type=int, default=32, metavar="N",
                   help="pad each MLP with zero neurons to a multiple of N (default 32, a quantization block; 0: "
                   "off). Exact: a zero neuron adds nothing; the down projections quantize and run faster kernels")
    p.add_argument("--pad-stream", type=int, default=32, metavar="N",
                   help="pad a sliced residual stream with zero dimensions to a multiple of N (default 32; 0: off; "
                   "not MoE models). Exact: the stream is scaled so that each norm's mean over the longer width "
                   "is the dense one, and the gains undo the scale; every matrix reading the stream quantizes")
    p.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    p.set_defaults(func=cmd_export)
    return parser


DISTRIBUTED_COMMANDS = ("slice", "eval")


def _stopped(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # once: a second signal (or one at exit) just ends the process
    raise SliceGPTError(f"stopped by signal {signum} (under torchrun: another rank failed and the launcher "
                        "ended the job); nothing was published, run the same command again to resume")


def _start_ranks(args) -> distributed.Ranks:
    """Join the torchrun job this process belongs to, if any (slice and eval only)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and args.command not in DISTRIBUTED_COMMANDS and "TORCHELASTIC_RUN_ID" in os.environ:
        raise SliceGPTError(f"`slicegpt {args.command}` runs in one process; only "
                            f"{' and '.join(DISTRIBUTED_COMMANDS)} run under torchrun (WORLD_SIZE is {world})")
    if world <= 1 or args.command not in DISTRIBUTED_COMMANDS:  # WORLD_SIZE of a cluster, not torchrun's
        return distributed.Ranks()
    signal.signal(signal.SIGTERM, _stopped)  # the launcher stops the survivors of a failed rank
    return distributed.init(_device(args.device), args.dist_timeout)


def _show_warning(message, category, filename, lineno, file=None, line=None, *, default=warnings.showwarning) -> None:
    """slicegpt's own warnings as one line, like its errors; other libraries' as they print them."""
    if issubclass(category, SliceGPTWarning):
        print(f"slicegpt: warning: {message}", file=sys.stderr)
    else:
        default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # third-party warnings would bury our one-line messages
    args.ranks = distributed.Ranks()
    try:
        args.ranks = _start_ranks(args)
        args.func(args)
        distributed.finish()  # not after a failure: a dead peer could hold up the goodbye
    except (SliceGPTError, CheckpointError) as e:
        if args.ranks.distributed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's stop, from here on, ends us quietly
        ranks = args.ranks
        if ranks.writer or not getattr(e, "shared", False):  # an error every rank raised is shown once
            message = str(e)
            if ranks.distributed and not message.startswith("rank "):
                message = f"rank {ranks.rank}: {message}"
            print(f"slicegpt: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slicegpt: interrupted", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        print("slicegpt: error: out of memory; use a smaller --batch-size or --samples, or --activations-dir DIR "
              "(an interrupted slice resumes when run again)", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a vanished file: the system's words, without a traceback
        full = " (the disk is full; free space and run the same command again to resume)" if e.errno == 28 else ""
        where = f": {e.filename}" if e.filename else ""
        print(f"slicegpt: error: {e.strerror or e}{where}{full}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
