"""Data flows one way: every import of the package points to a lower layer, never back up.

The layers, lowest first (a subpackage may import its own modules and any lower layer):

- the private helpers at the top of the package (``_constants``, ``_compat``, ...);
- ``data``: the crop store, links, fields, and the image and table readers both ``pp`` and
  ``io`` use;
- ``pp`` and ``datasets``: crops from tiles; simulated screens;
- ``io``: crops from other tools (brieflow, scPortrait, folders), built on ``pp``;
- ``dataloaders``, ``nn``, ``module``, ``train``, ``model``: loading, networks, losses, training,
  the user-facing models;
- ``tl``, ``metrics``, ``pl``: analyses of embeddings, their scores, their plots;
- ``cli``: the command line.

Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "src" / "mcvi_ops"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("_compat", "_constants", "_lazy", "_logging", "_utils"),
    ("data",),
    ("pp", "datasets"),
    ("io",),
    ("dataloaders",),
    ("nn",),
    ("module",),
    ("train",),
    ("model",),
    ("tl",),
    ("metrics",),
    ("pl",),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _part(path: Path) -> str:
    """The subpackage (or private top-level module) a file of the package belongs to."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imported(path: Path) -> set[str]:
    """Subpackages and top-level modules of mcvi_ops that ``path`` imports, anywhere in it."""
    package = ["mcvi_ops", *path.relative_to(PACKAGE).parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from mcvi_ops import pp` names a subpackage in the imported names
            modules = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "mcvi_ops" and len(parts) > 1 and parts[1] in RANK:
                found.add(parts[1])
    return found


def _import_graph() -> dict[str, dict[str, list[str]]]:
    """Importing part -> imported part -> files that import it."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _part(path)
        if source == "__init__":
            continue  # the package's lazy attributes only
        for target in _imported(path) - {source}:
            graph.setdefault(source, {}).setdefault(target, []).append(
                str(path.relative_to(PACKAGE))
            )
    return graph


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert parts <= set(RANK), f"give {sorted(parts - set(RANK))} a layer in LAYERS"


def test_the_scan_sees_the_imports_that_exist():
    """The scan finds the imports it must (so an empty scan cannot pass the test below)."""
    graph = _import_graph()
    assert "pp" in graph["io"]  # io's readers crop tiles with pp.extract_crops
    assert {"data", "dataloaders", "module", "train"} <= set(graph["model"])
    assert "tl" in graph["metrics"]


def test_no_import_points_back_up():
    backwards = [
        f"{source} (layer {RANK[source]}) imports {target} (layer {RANK[target]}) in {files}"
        for source, targets in _import_graph().items()
        for target, files in targets.items()
        if RANK[target] >= RANK[source]
    ]
    assert not backwards, "\n".join(backwards)


def test_no_cycle_between_parts():
    graph = {source: set(targets) for source, targets in _import_graph().items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = [part for part in graph if reaches(part, part, {part})]
    assert not cycles, f"import cycles through {cycles}"


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import mcvi_ops.pp", "mcvi_ops.io"),
        ("import mcvi_ops.data", "mcvi_ops.pp"),
        ("import mcvi_ops.metrics", "mcvi_ops.pp"),
    ],
)
def test_lower_layers_load_without_higher_ones(statement, absent):
    code = f"import sys; {statement}; print({absent!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"`{statement}` loads {absent}"
