"""scvi-tools through public hooks: private imports only in ``mcvi_ops._compat``, and checked."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "src" / "mcvi_ops"


def _private_scvi_imports(path: Path) -> list[str]:
    """``scvi`` modules with a private part (``scvi.model._utils``) that ``path`` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level:
            modules = [node.module or ""]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "scvi" and any(part.startswith("_") for part in parts[1:]):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {module}")
    return found


def test_private_scvi_imports_only_in_compat():
    everywhere = [
        hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _private_scvi_imports(path)
    ]
    compat = [hit for hit in everywhere if hit.startswith("src/mcvi_ops/_compat.py")]
    assert compat, "the scan finds nothing: it would pass whatever the code imports"
    outside = [hit for hit in everywhere if hit not in compat]
    assert not outside, "import these through mcvi_ops._compat:\n" + "\n".join(outside)


def test_compat_names_are_what_the_package_expects():
    from mcvi_ops import _compat

    assert _compat.SETUP_ARGS_KEY == "setup_args"
    assert _compat.MODEL_NAME_KEY == "model_name"
    assert _compat.SAVE_KEYS.MODEL_FNAME == "model.pt"
    assert _compat.SAVE_KEYS.ADATA_FNAME == "adata.h5ad"
    assert {"ATTR_DICT_KEY", "VAR_NAMES_KEY", "MODEL_STATE_DICT_KEY"} <= set(dir(_compat.SAVE_KEYS))
    assert _compat.use_distributed_sampler("ddp") is True
    assert _compat.use_distributed_sampler(None) is False
    _, _, device = _compat.parse_device_args("cpu", "auto", return_device="torch")
    assert str(device) == "cpu"


def test_scvi_tools_is_pinned_to_the_checked_versions():
    """The bound in pyproject.toml, the versions _compat names and the installed one agree."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in project["dependencies"] if d.startswith("scvi-tools")]
    lower, upper = re.fullmatch(
        r"scvi-tools>=([\d.]+),<([\d.]+)", spec.split(";")[0].strip()
    ).groups()
    installed = tuple(int(p) for p in version("scvi-tools").split(".")[:2])
    assert (
        tuple(int(p) for p in lower.split("."))
        <= installed
        < tuple(int(p) for p in upper.split("."))
    )
    checked = (PACKAGE / "_compat.py").read_text()
    assert version("scvi-tools") in checked, "add the installed scvi-tools to the checked versions"
