"""Tests of the latent activity measures behind `MCVAE.get_latent_activity`."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcvi_ops.model._health import (
    label_memorization,
    latent_activity,
    warn_if_collapsed,
    warn_if_memorized,
)


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


def test_memorised_labels_are_flagged_and_warned(caplog):
    rng = np.random.default_rng(0)
    controls = rng.normal(0, 1, (400, 8))
    # training cells of effect-free perturbations pulled apart, held-out cells like controls
    train_labels = np.repeat(np.arange(10), 20)
    pulls = rng.normal(0, 2, (10, 8))
    train = pulls[train_labels] + rng.normal(0, 1, (200, 8))
    heldout_labels = np.repeat(np.arange(10), 20)
    heldout = rng.normal(0, 1, (200, 8))
    result = label_memorization(train, train_labels, heldout, heldout_labels, controls)
    assert result["median_ratio"] > 5
    assert result["n_perturbations"] == 10
    assert bool(result["memorized"])
    with caplog.at_level("WARNING"):
        warn_if_memorized(result)
    assert "memorised labels" in caplog.text and "validation_indices" in caplog.text
    caplog.clear()
    warn_if_memorized(None)
    warn_if_memorized(result.replace({True: False}))
    assert "memorised" not in caplog.text


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), effect=st.floats(0.0, 3.0), n=st.integers(5, 40))
def test_cells_from_one_distribution_are_not_flagged(seed, effect, n):
    # training and held-out cells drawn alike: whatever the effect size, nothing is memorised
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (30, 8)) * effect
    labels = np.repeat(np.arange(30), n)
    train = centres[labels] + rng.normal(0, 1, (len(labels), 8))
    heldout = centres[labels] + rng.normal(0, 1, (len(labels), 8))
    controls = rng.normal(0, 1, (300, 8))
    result = label_memorization(train, labels, heldout, labels, controls)
    assert not bool(result["memorized"]), result.to_dict()
