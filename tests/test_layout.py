"""The package's dependency rules (CONTRIBUTING.md, "Layout"), checked on the source so they cannot drift.

Every `from slicegpt... import ...` in src/slicegpt is read with `ast` (imports inside functions
count too). The rules:

- each layer imports only from the layers below it (LAYERS, lowest first);
- `slicegpt.modeling.runtime` imports nothing from slicegpt (it is copied beside per-layer outputs
  and must run without the package);
- no module imports a private name (`_x`) from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slicegpt"

# Lowest first. A module may import from its own layer and from any layer before it.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "atomic", "modeling", "version"),  # no slicegpt dependencies beyond each other
    ("adapters", "shards", "config"),  # where weights live; shard files; the run record
    ("core",),  # the algorithm
    ("formats", "data", "evaluation"),  # outputs, text, measurements
    ("recipes", "plan"),  # named presets of the levers; every decision of a run, made once
    ("api", "pipeline", "finetune", "distill"),  # the public calls
    ("cli", "__init__", "__main__", "testing"),  # the thin layers on top; test material
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """The top-level unit of `slicegpt.x.y` (x), or `__init__` for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports():
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == "slicegpt":
                yield module, path, node


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert units - set(RANK) == set(), "a new top-level module or package: give it a layer in LAYERS"


def test_layers_import_downwards():
    wrong = []
    for module, path, node in _imports():
        source, target = _unit(module), _unit(node.module)
        if RANK[target] > RANK[source]:
            wrong.append(f"{path.relative_to(SRC.parent)}:{node.lineno} {module} imports {node.module} "
                         f"({source} is below {target})")
    assert not wrong, "\n".join(wrong)


def test_the_runtime_stands_alone():
    runtime = SRC / "modeling" / "runtime.py"
    tree = ast.parse(runtime.read_text())
    own = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
           and any((getattr(n, "module", None) or "").startswith("slicegpt") or a.name.startswith("slicegpt")
                   for a in n.names)]
    assert not own, f"modeling/runtime.py imports slicegpt at lines {own}; it must run without the package"


def test_no_private_names_cross_modules():
    crossing = [f"{path.relative_to(SRC.parent)}:{node.lineno} imports {alias.name} from {node.module}"
                for _, path, node in _imports() for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("rule", ["core", "formats"])
def test_rule_is_not_vacuous(rule):
    """The walk finds real imports (a broken walk would pass every rule above)."""
    assert any(_unit(module) == rule for module, _, _ in _imports())
