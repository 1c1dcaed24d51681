"""Doctests of the package's docstrings (``make test`` runs them, see ``pyproject.toml``).

Every example runs in its own temporary folder (files it writes, and the checkpoints of
training, go there) with a non-interactive matplotlib backend; ``mcvi_ops`` is imported for the
examples that use it without importing it. Examples that need the user's own data or a long
training run are marked ``# doctest: +SKIP``.
"""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture(autouse=True)
def _doctest_folder(request, tmp_path, monkeypatch):
    """Run each example in a temporary folder, with mcvi_ops and the Agg backend at hand."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace = request.getfixturevalue("doctest_namespace")
    namespace["mcvi_ops"] = importlib.import_module("mcvi_ops")
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
