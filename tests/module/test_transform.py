from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcvi_ops.module import CropTransform


@pytest.fixture
def controls(rng):
    """Raw crops of 200 control cells, 2 channels, with a dim and a bright channel."""
    crops = rng.gamma(2.0, 1.0, (200, 2, 16, 16)) * np.array([300.0, 3000.0]).reshape(1, 2, 1, 1)
    return crops.astype(np.float32)


def _fitted(crops):
    transform = CropTransform(crops.shape[1])
    excluded = transform.fit(crops)
    return transform, excluded


def test_fit_maps_controls_to_unit_range(controls):
    transform, excluded = _fitted(controls)
    assert not excluded.any()
    y = transform(torch.as_tensor(controls)).numpy()
    assert y.min() == -1 and y.max() == 1
    # percentiles, not extremes: only ~0.5% of the pixels are clipped at each end
    assert 0.002 < (y == 1).mean() < 0.01
    back = transform.inverse(transform(torch.as_tensor(controls[:3])))
    inside = (y[:3] > -1) & (y[:3] < 1)
    np.testing.assert_allclose(back.numpy()[inside], controls[:3][inside], rtol=1e-3)


@pytest.mark.parametrize("value", [1e30, np.inf, np.nan, -1e30])
def test_fit_ignores_extreme_cells_and_nonfinite_pixels(controls, value):
    clean, _ = _fitted(controls)
    corrupt = controls.copy()
    corrupt[:10] = value  # 5% of the controls: whole crops
    corrupt[10:20, :, :2, :2] = value  # and a few pixels of another 5%
    robust, excluded = _fitted(corrupt)
    torch.testing.assert_close(robust.low, clean.low, rtol=0.02, atol=0.02)
    torch.testing.assert_close(robust.high, clean.high, rtol=0.02, atol=0.02)
    if np.isfinite(value):
        assert excluded[:10].all() and not excluded[20:].any()
    # the cells keep their contrast instead of collapsing to one end of [-1, 1]
    y = robust(torch.as_tensor(controls[20:])).numpy()
    assert y.std() > 0.3


def test_fit_keeps_bright_but_real_cells(controls):
    brighter = controls.copy()
    brighter[:20] *= 5  # mitotic cells can be several times brighter: not artefacts
    _, excluded = _fitted(brighter)
    assert not excluded.any()


def test_fit_errors(controls):
    transform = CropTransform(2)
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        transform.fit(controls[0])
    empty = controls.copy()
    empty[:, 1] = np.nan
    with pytest.raises(ValueError, match="Channel 1 .* no finite pixel"):
        transform.fit(empty)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scale=st.floats(1e-3, 1e6),
    fraction=st.floats(0.0, 0.05),
    extreme=st.sampled_from([1e30, 1e12, np.inf, np.nan]),
)
def test_scale_is_robust_and_equivariant(scale, fraction, extreme):
    """Statistics follow the data's scale and ignore up to 5% corrupt cells."""
    rng = np.random.default_rng(1)
    crops = (rng.gamma(2.0, 1.0, (100, 1, 8, 8)) * 1000 * scale).astype(np.float32)
    clean, _ = _fitted(crops)
    corrupt = crops.copy()
    corrupt[: int(fraction * len(crops))] = extreme
    robust, _ = _fitted(corrupt)
    assert np.isfinite(robust.low.numpy()).all() and np.isfinite(robust.high.numpy()).all()
    assert (robust.high > robust.low).all()
    torch.testing.assert_close(robust.high, clean.high, rtol=0.05, atol=0.05)
