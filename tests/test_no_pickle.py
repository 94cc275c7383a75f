"""Activation files and resume snapshots hold no pickle: a planted one is refused and never run."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES, make_model
from slicegpt.errors import SliceGPTError

SRC = Path(__file__).resolve().parents[1] / "src" / "slicegpt"


class _Payload:
    """Unpickling this opens `marker` for writing: the file appears only if someone unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> None:
    """A torch.save file at `path` that creates `marker` when loaded with weights_only=False."""
    torch.save({"x": _Payload(marker)}, path)


def test_the_planted_payload_really_runs_when_unpickled(tmp_path):
    """The other tests mean something: this file does run code under a full unpickler."""
    plant(tmp_path / "evil.pt", tmp_path / "ran")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


def test_no_torch_load_or_pickle_in_the_package():
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"torch\.load\(|\bimport pickle\b|pickle\.loads?\(|weights_only=False", line)]
    assert offenders == []


def test_a_planted_activation_file_is_refused_in_one_line(tmp_path):
    from slicegpt.core.cache import ActivationCache

    with ActivationCache("disk", tmp_path) as cache:
        cache.append(torch.randn(2, 3, dtype=torch.bfloat16))
        assert cache.get(0, "cpu").dtype == torch.bfloat16
        plant(cache.entries[0], tmp_path / "ran")
        with pytest.raises(SliceGPTError, match=r"not an activation file of slicegpt") as e:
            cache.get(0, "cpu")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_arguments_on_disk_equal_those_in_memory(family, tmp_path):
    """Every family's masks, rotary tables, position ids and flags survive the safetensors files."""
    from slicegpt.adapters import get_adapter
    from slicegpt.core.cache import ActivationCache, LayerArguments
    from slicegpt.core.onload import ResidentModel
    from slicegpt.core.streams import capture

    model = make_model(family)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: a real attention mask tensor
    got = {}
    for offload in ("cpu", "disk"):
        with ActivationCache(offload, tmp_path) as cache:
            arguments = LayerArguments(cache)
            capture(ResidentModel(model), get_adapter(model.config), [(ids, mask)], cache, arguments)
            if offload == "disk":
                assert all(isinstance(e, Path) for e in [*cache.entries, *arguments.per_batch])
            got[offload] = (cache.get(0, "cpu"), [arguments.get(li, 0, "cpu") for li in range(len(arguments.which[0]))])
    _assert_same(got["cpu"], got["disk"])


def _assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_a_planted_snapshot_is_refused_and_never_unpickled(tmp_path, tokenizer):
    from test_cli import assert_one_line_error
    from test_streaming import ARGS, _interrupted, run_cli

    source, out, run_dir = _interrupted(tmp_path, tokenizer, "--activations-dir", tmp_path / "acts")
    snapshot = next(run_dir.glob("activations-*"))
    first = sorted(snapshot.glob("x-*.safetensors"))[0]
    first.unlink()  # a hard link to the cache's file: replace it, do not write through it
    plant(first, tmp_path / "ran")
    plant(snapshot / "x-sliced-000000.pt", tmp_path / "ran-old-name")  # the old format's name
    again = run_cli("slice", source, *ARGS, "--no-eval", "--activations-dir", tmp_path / "acts", "--out", out)
    assert_one_line_error(again, r"activation snapshot .* is damaged.*--restart")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "ran-old-name").exists()


def test_a_run_directory_of_the_pickle_format_is_refused_naming_restart(tmp_path, tokenizer):
    from test_cli import assert_one_line_error
    from test_streaming import ARGS, _interrupted, run_cli

    from slicegpt.core.resume import PROGRESS_NAME, RECORD_VERSION

    source, out, run_dir = _interrupted(tmp_path, tokenizer)
    record = json.loads((run_dir / PROGRESS_NAME).read_text())
    assert record["version"] == RECORD_VERSION == 3
    record["version"] = 2  # the record of the .pt snapshots, with a valid checksum
    body = {k: v for k, v in record.items() if k != "checksum"}
    record["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (run_dir / PROGRESS_NAME).write_text(json.dumps(record))
    assert_one_line_error(run_cli("slice", source, *ARGS, "--no-eval", "--out", out),
                          r"another slicegpt version.*--restart")


def test_a_failed_activation_write_is_one_line_and_leaves_no_file(tmp_path):
    """safetensors reports a failed write as SafetensorError, not OSError: it still ends in the disk error line."""
    import subprocess
    import sys

    script = (
        "import resource, torch\n"
        "from slicegpt.core.cache import ActivationCache\n"
        "from slicegpt.errors import SliceGPTError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))  # files over 64 KiB fail (EFBIG)\n"
        f"cache = ActivationCache('disk', {str(tmp_path)!r})\n"
        "try:\n"
        "    cache.append(torch.zeros(1 << 16))\n"
        "except SliceGPTError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"cannot write .*x-000000\.safetensors: file too large.*run the same command again to resume\n", result.stdout)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
