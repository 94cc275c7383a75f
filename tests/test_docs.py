"""The documentation stays true to the code: the generated CLI reference, short README, live links,
and no flag that slicegpt no longer has (outside CHANGELOG.md, which records the renames)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
README = ROOT / "README.md"
CONTRIBUTING = ROOT / "CONTRIBUTING.md"
README_MAX_LINES = 260

# Flags removed in 0.2 (CHANGELOG.md, "Renamed flags"); a match must be the whole flag, so
# e.g. bench/quality.py's --sparsities or --offloaded would not count (--offload covers --offload-dir).
REMOVED_FLAGS = ("--sparsity", "--parameters", "--method", "--mlp-width", "--slice-head", "--untie-head",
                 "--fit-tied-head", "--offload", "--weights")
REMOVED = re.compile(r"(?<![\w-])(" + "|".join(re.escape(f) for f in REMOVED_FLAGS) + r")(?![\w]|-(?!dir\b))")


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_generated_from_the_parser():
    reference = _cli_reference()
    assert reference.OUT.exists(), f"docs/cli.md is missing: generate it with {reference.REGENERATE}"
    assert reference.OUT.read_text() == reference.render(), \
        f"docs/cli.md differs from the parser's help: regenerate with {reference.REGENERATE}"


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code (where `a[i](x)` is code, not a link)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _links(path: Path):
    for match in re.finditer(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", _prose(path.read_text())):
        yield match.group(1)


@pytest.mark.parametrize("path", [README, CONTRIBUTING, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    broken = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same page
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {', '.join(broken)}"


@pytest.mark.parametrize("path", [README, CONTRIBUTING, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_removed_flags(path):
    found = [f"line {i}: {m.group(1)}" for i, line in enumerate(path.read_text().splitlines(), 1)
             for m in REMOVED.finditer(line)]
    assert not found, (f"{path.relative_to(ROOT)} mentions flags removed in 0.2 (see CHANGELOG.md for their "
                       f"replacements): {'; '.join(found)}")


def test_docs_exist():
    names = {p.name for p in DOCS}
    expected = {"cli.md", "python-api.md", "how-it-works.md", "outputs.md", "families.md", "big-models.md",
                "evaluation.md", "benchmarks.md", "limitations.md"}
    assert expected <= names, f"missing under docs/: {', '.join(sorted(expected - names))}"
