"""Tests of the latent activity measures behind `MCVAE.get_latent_activity`."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcvi_ops.model._health import latent_activity, warn_if_collapsed


def test_alive_salient_latent():
    rng = np.random.default_rng(0)
    activity = latent_activity(rng.normal(0, 0.5, (500, 8)), rng.normal(0, 1.0, (500, 16)))
    assert list(activity.index) == ["salient", "background"]
    assert activity.loc["salient", "active_dims"] == 8
    assert activity.loc["salient", "variance_ratio"] == pytest.approx(0.25, rel=0.2)
    assert activity.loc["background", "variance_ratio"] == pytest.approx(1.0)
    assert not activity["collapsed"].any()


def test_collapsed_salient_latent_warns(caplog):
    rng = np.random.default_rng(0)
    activity = latent_activity(rng.normal(0, 0.003, (500, 8)), rng.normal(0, 1.5, (500, 16)))
    assert activity.loc["salient", "active_dims"] == 0
    assert bool(activity.loc["salient", "collapsed"])
    with caplog.at_level(logging.WARNING):
        warn_if_collapsed(activity, hint="Lower `wasserstein_penalty`.")
    assert "salient latent has collapsed" in caplog.text
    assert "Lower `wasserstein_penalty`." in caplog.text


def test_a_few_active_dimensions_with_small_share_count_as_collapsed():
    rng = np.random.default_rng(1)
    salient = np.zeros((400, 8))
    salient[:, 0] = rng.normal(0, 0.2, 400)  # one barely active dimension
    activity = latent_activity(salient, rng.normal(0, 2.0, (400, 8)))
    assert activity.loc["salient", "active_dims"] == 1
    assert bool(activity.loc["salient", "collapsed"])  # ratio ~ 0.04 / 8 / 4 << 0.05


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0.1, 10.0), n=st.integers(20, 200))
def test_ratio_is_invariant_to_a_common_scale(scale, n):
    rng = np.random.default_rng(n)
    s, z = rng.normal(size=(n, 4)), rng.normal(size=(n, 6)) * 2
    base = latent_activity(s, z).loc["salient", "variance_ratio"]
    scaled = latent_activity(s * scale, z * scale).loc["salient", "variance_ratio"]
    assert scaled == pytest.approx(base, rel=1e-6)
