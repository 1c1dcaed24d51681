"""The README's Python blocks run as written, top to bottom in one session, on a small screen."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
NEEDS_DATA = "# needs your own data"
SMALL_SCREEN = 600  # cells; enough for every guide of the default 60-gene design


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Each ```python block of a Markdown text with the line number of its first code line."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        first_line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((first_line, match.group(1)))
    return blocks


def shrink(code: str) -> tuple[str, int]:
    """The block with a small screen and one training epoch, and the number of rewrites."""
    code, n_screen = re.subn(r"\bn_cells=[\d_]+", f"n_cells={SMALL_SCREEN}", code)
    code, n_train = re.subn(r"\.train\(\)", ".train(max_epochs=1)", code)
    return code, n_screen + n_train


def run_blocks(text: str, filename: str, namespace: dict) -> int:
    """Run the runnable, shrunk blocks of ``text`` in ``namespace``; return the rewrites made."""
    n_rewrites = 0
    for line, code in python_blocks(text):
        if NEEDS_DATA in code:
            continue
        small, n = shrink(code)
        n_rewrites += n
        # pad with blank lines so that a traceback points at the Markdown file's own lines
        exec(compile("\n" * (line - 1) + small, filename, "exec"), namespace)
    return n_rewrites


def test_python_blocks_are_found():
    text = "intro\n```python\na = 1\n```\n\n```bash\nls\n```\n```python\n# x\nb = a\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (10, "# x\nb = a\n")]
    assert shrink("f(n_cells=10_000)\nm.train()\n") == (
        "f(n_cells=600)\nm.train(max_epochs=1)\n",
        2,
    )


def test_readme_runs_top_to_bottom(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    text = README.read_text(encoding="utf-8")
    runnable = [code for _, code in python_blocks(text) if NEEDS_DATA not in code]
    assert len(runnable) >= 2, "expected the Usage and Analysis blocks"
    namespace: dict = {"__name__": "__readme__"}
    n_rewrites = run_blocks(text, str(README), namespace)
    assert n_rewrites == 3, "the README no longer has one `n_cells=` and two `.train()` to shrink"
    adata = namespace["adata"]
    for key in ("X_mcvae_salient", "X_mcvae_background", "X_mcvae"):
        assert key in adata.obsm, f"the README leaves .obsm[{key!r}] unset"
    for key in ("X_fmcvae_salient", "X_fmcvae_background", "X_fmcvae"):
        assert key in namespace["features"].obsm, f"the README leaves .obsm[{key!r}] unset"
    assert (tmp_path / "screen_complexes.gmt").exists()
    scores = adata.uns.get("technical_covariates")
    assert scores is not None and set(scores) == {"X_mcvae_salient", "X_mcvae_background"}


def test_a_failing_block_fails_at_its_markdown_line():
    text = "# t\n```python\nx = 1\n```\n```python\n# needs your own data\nopen('no')\n```\n"
    text += "```python\ny = x + 1\nz = undefined_name\n```\n"
    namespace: dict = {}
    with pytest.raises(NameError, match="undefined_name") as info:
        run_blocks(text, "doc.md", namespace)
    assert namespace["y"] == 2  # earlier blocks ran in the same namespace, the marked one not
    assert info.traceback[-1].lineno + 1 == 11  # pytest counts lines from 0


@pytest.mark.parametrize("marker_missing", [False, True])
def test_blocks_that_need_user_files_are_marked(marker_missing):
    # every block that reads files the README never writes must carry the marker
    user_files = ("tiles/", "CORUM.txt", "cells.csv", "brieflow_output")
    text = README.read_text(encoding="utf-8")
    if marker_missing:
        text = text.replace(NEEDS_DATA, "# (marker removed)")
    unmarked = [
        line
        for line, code in python_blocks(text)
        if NEEDS_DATA not in code and any(name in code for name in user_files)
    ]
    assert bool(unmarked) == marker_missing
