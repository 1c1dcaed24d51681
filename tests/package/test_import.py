"""The top-level import is light and the moved names keep working."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = {"torch", "lightning", "scvi"}


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "statement",
    [
        "import mcvi_ops",
        "import mcvi_ops.io, mcvi_ops.pp, mcvi_ops.data, mcvi_ops.datasets",
        "from mcvi_ops.cli import build_parser; build_parser()",
    ],
)
def test_light_import(statement):
    assert not HEAVY & _modules_after(statement)


def test_model_loads_heavy_stack_on_first_use():
    loaded = _modules_after("import mcvi_ops; mcvi_ops.MCVAE")
    assert {"torch", "scvi"} <= loaded


def test_moved_names_warn_and_resolve():
    import mcvi_ops

    with pytest.warns(FutureWarning, match="mcvi_ops.datasets.synthetic_screen"):
        moved = mcvi_ops.data.synthetic_screen
    assert moved is mcvi_ops.datasets.synthetic_screen
    with pytest.warns(FutureWarning, match="mcvi_ops.pp.extract_crops"):
        assert mcvi_ops.io.extract_crops is mcvi_ops.pp.extract_crops
    with pytest.warns(FutureWarning, match="mcvi_ops.dataloaders.CropDataLoader"):
        assert mcvi_ops.data.CropDataLoader is mcvi_ops.dataloaders.CropDataLoader
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mcvi_ops.data.nope  # noqa: B018
    assert "MCVAE" in dir(mcvi_ops)
