"""Fixtures of the plot tests: a non-interactive backend, and a record of saves and shows."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")


def drawn_state(fig) -> list[tuple[int, bool]]:
    """Per axes of ``fig``: how many artists it holds and whether it has a legend."""
    return [
        (
            len(ax.collections) + len(ax.patches) + len(ax.lines) + len(ax.images) + len(ax.texts),
            ax.get_legend() is not None,
        )
        for ax in fig.axes
    ]


@pytest.fixture
def state():
    """The function :func:`drawn_state`."""
    return drawn_state


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


@pytest.fixture
def saves(monkeypatch) -> list[dict]:
    """Every ``Figure.savefig`` call, with the figure's drawn state at that moment."""
    from matplotlib.figure import Figure

    calls: list[dict] = []
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        calls.append({"figure": self, "path": fname, "state": drawn_state(self)})
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return calls


@pytest.fixture
def shows(monkeypatch) -> list[int]:
    """Every ``plt.show`` call (made a no-op), with the number of open figures."""
    import matplotlib.pyplot as plt

    calls: list[int] = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append(len(plt.get_fignums())))
    return calls
