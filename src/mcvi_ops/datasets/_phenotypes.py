"""Per-cell morphology parameters of the simulated screen: natural variation and gene effects.

Geometry is in normalised crop coordinates: the crop spans ``[-1, 1]`` along both axes, ``x`` is
the column and ``y`` the row, so a shape looks the same at every crop size (as if 100 px crops of
the real screen were resampled to ``crop_size``).
"""

from __future__ import annotations

import numpy as np

CHANNEL_NAMES = ("DAPI", "tubulin", "gH2AX", "phalloidin")

SHIFT_EFFECTS = ("mitotic_arrest", "large_cells", "dna_damage", "elongated", "g2_arrest")
NOVEL_EFFECTS = ("binucleate", "micronuclei", "tubulin_aggregates", "actin_ring")
#: Effect names by integer code; code 0 is "no effect" (controls and genes without effect).
EFFECT_NAMES = ("none", *SHIFT_EFFECTS, *NOVEL_EFFECTS)
EFFECT_CODE = {name: code for code, name in enumerate(EFFECT_NAMES)}
EFFECT_DESCRIPTIONS = {
    "mitotic_arrest": "more cells in mitosis (mitotic cells look like control mitoses)",
    "large_cells": "larger cells and nuclei, within the control size range",
    "dna_damage": "more and brighter gH2AX foci, within the control range",
    "elongated": "more elongated cells, within the control range of aspect ratios",
    "g2_arrest": "more cells late in interphase: larger, brighter nuclei (4N DNA)",
    "binucleate": "two nuclei in one enlarged cell (never seen in controls)",
    "micronuclei": "irregular nucleus with 2-4 micronuclei beside it (never seen in controls)",
    "tubulin_aggregates": "bright tubulin puncta in the cytoplasm (never seen in controls)",
    "actin_ring": "a bright F-actin ring around the nucleus (never seen in controls)",
}

# natural variation
BASE_MITOTIC_FRACTION = 0.06
ANAPHASE_FRACTION = 0.3
CELL_RADIUS = 0.52  # geometric-mean radius of a typical interphase cell
NUC_FRACTION = 0.42  # nucleus radius / cell radius
SIZE_LOG_SD = 0.12
SIZE_LOG_BOUND = 0.36  # log cell size is clipped to +-this, for controls and shift effects alike
MITOTIC_SIZE = 0.78  # rounded mitotic cells are smaller
MAX_NEIGHBOURS = 4
MIN_NEIGHBOUR_DIST = 0.72
MAX_MICRONUCLEI = 4

# technical artefacts tied to metadata
EDGE_TILE_SIZE = 0.82  # linear size of cells in tiles at the well edge
EDGE_TILE_NEIGHBOURS = 2.2  # mean number of neighbours in edge-of-well tiles (1.0 elsewhere)
CENTRE_TILE_NEIGHBOURS = 1.0

# intensities in camera counts, before per-well gains and vignetting
DAPI_LEVEL = 1500.0
TUBULIN_LEVEL = 1100.0
GH2AX_LEVEL = 260.0
FOCI_LEVEL = 6000.0
ACTIN_LEVEL = 700.0
INTENSITY_LOG_SD = 0.12


def _beta(rng: np.random.Generator, a: np.ndarray | float, b: float, n: int) -> np.ndarray:
    return rng.beta(np.broadcast_to(a, (n,)), b)


def sample_cell_params(
    rng: np.random.Generator,
    *,
    mitotic: np.ndarray,
    effect: np.ndarray,
    strength: np.ndarray,
    affected: np.ndarray,
    edge_tile: np.ndarray,
) -> dict[str, np.ndarray]:
    """Draw every morphology parameter of a block of cells.

    .. long function: one sequence of draws from one generator, whose order fixes every seeded screen; kept in one place so it cannot change by accident.

    Parameters
    ----------
    rng
        Random generator of this block of cells.
    mitotic
        Whether each cell is in mitosis.
    effect
        Integer effect code of each cell's gene (:data:`EFFECT_CODE`, 0 for none).
    strength
        Effect strength of each cell's gene in ``[0, 1]``.
    affected
        Whether each cell shows its gene's effect.
    edge_tile
        Whether each cell lies in a tile at the edge of its well (denser, smaller cells).

    Returns
    -------
    Dictionary of float32/int arrays with one row per cell (slot arrays have a second axis).
    """
    n = len(mitotic)
    s = np.asarray(strength, dtype=np.float64)

    def aff(name: str) -> np.ndarray:
        return affected & (effect == EFFECT_CODE[name])

    binuc, micro = aff("binucleate"), aff("micronuclei")
    anaphase = mitotic & (rng.random(n) < ANAPHASE_FRACTION)

    # cell size and shape: shift effects move the distribution inside the control support
    mu = np.where(aff("large_cells"), 0.24 * s, 0.0)
    log_size = np.clip(rng.normal(mu, SIZE_LOG_SD), -SIZE_LOG_BOUND, SIZE_LOG_BOUND)
    size = np.exp(log_size) * np.where(edge_tile, EDGE_TILE_SIZE, 1.0)
    size *= np.where(binuc, 1.18, 1.0)
    ar = np.where(
        aff("elongated"), 1 + 1.1 * _beta(rng, 2 + 3 * s, 1.6, n), 1 + 1.1 * rng.beta(1.5, 4, n)
    )
    ar = np.where(mitotic, 1 + 0.12 * rng.random(n), ar)
    ar = np.where(anaphase, 1.25 + 0.15 * rng.random(n), ar)
    theta = rng.uniform(0, np.pi, n)
    radius = CELL_RADIUS * size * np.where(mitotic, MITOTIC_SIZE, 1.0)
    # semi-axes along theta and across it; mitotic cells stretch along the spindle, which runs
    # across the plate's long axis (theta)
    cell_a = np.where(mitotic, radius / np.sqrt(ar), radius * np.sqrt(ar))
    cell_b = np.where(mitotic, radius * np.sqrt(ar), radius / np.sqrt(ar))
    cy, cx = np.clip(rng.normal(0, 0.03, (2, n)), -0.08, 0.08)
    cos, sin = np.cos(theta), np.sin(theta)

    # interphase progression (DNA content 2N -> 4N) and DNA damage
    phase = np.where(aff("g2_arrest"), _beta(rng, 1 + 4 * s, 1.0, n), rng.random(n))
    damage = np.where(aff("dna_damage"), _beta(rng, 2 + 2.5 * s, 6.0, n), rng.beta(1, 9, n))

    # nucleus (interphase)
    nuc_r = radius * NUC_FRACTION * (1 + 0.22 * phase) * np.where(binuc, 0.8, 1.0)
    nuc_ar = 1 + (ar - 1) * rng.uniform(0.3, 0.7, n)
    nuc_a, nuc_b = nuc_r * np.sqrt(nuc_ar), nuc_r / np.sqrt(nuc_ar)
    nuc_theta = theta + rng.normal(0, 0.15, n)
    nuc_cy = cy + rng.normal(0, 0.035, n)
    nuc_cx = cx + rng.normal(0, 0.035, n)
    # binucleate: two nuclei side by side along the long axis of the cell
    half_gap = np.where(binuc, nuc_a * 1.18, 0.0)
    nuc2_cy, nuc2_cx = nuc_cy - half_gap * sin, nuc_cx - half_gap * cos
    nuc_cy, nuc_cx = nuc_cy + half_gap * sin, nuc_cx + half_gap * cos
    nuc_theta = np.where(binuc, theta, nuc_theta)

    # mitosis: metaphase plate (or two anaphase plates) across the spindle axis
    sep = np.where(anaphase, rng.uniform(0.14, 0.24, n), 0.0) * size
    plate_a = 0.27 * size * np.where(anaphase, 0.85, 1.0)
    plate_b = 0.065 * size

    # intensities
    jit = np.exp(rng.normal(0, INTENSITY_LOG_SD, (n, 4)))
    dna = DAPI_LEVEL * jit[:, 0] * np.where(mitotic, 2.3, 1 + 0.8 * phase)

    # neighbours: partial cells touching the central cell, more and closer in dense tiles
    n_nb = np.minimum(
        rng.poisson(np.where(edge_tile, EDGE_TILE_NEIGHBOURS, CENTRE_TILE_NEIGHBOURS)),
        MAX_NEIGHBOURS,
    )
    slots = np.arange(MAX_NEIGHBOURS)
    phi = (
        rng.uniform(0, 2 * np.pi, n)[:, None]
        + 2 * np.pi * slots[None, :] / np.maximum(n_nb, 1)[:, None]
        + rng.normal(0, 0.25, (n, MAX_NEIGHBOURS))
    )
    # radius of the central ellipse along direction phi
    ia2, ib2 = (1 / cell_a[:, None]) ** 2, (1 / cell_b[:, None]) ** 2
    u = np.cos(phi) * cos[:, None] + np.sin(phi) * sin[:, None]
    v = -np.cos(phi) * sin[:, None] + np.sin(phi) * cos[:, None]
    r_main = 1 / np.sqrt(u**2 * ia2 + v**2 * ib2)
    nb_size = np.exp(np.clip(rng.normal(0, SIZE_LOG_SD, (n, MAX_NEIGHBOURS)), -0.36, 0.36))
    nb_size *= np.where(edge_tile, EDGE_TILE_SIZE, 1.0)[:, None]
    nb_r = CELL_RADIUS * nb_size
    gap = np.where(
        edge_tile[:, None],
        rng.uniform(0.55, 0.85, (n, MAX_NEIGHBOURS)),
        rng.uniform(0.75, 1.05, (n, MAX_NEIGHBOURS)),
    )
    dist = np.maximum(r_main + nb_r * gap, MIN_NEIGHBOUR_DIST)
    nb_ar = 1 + 1.1 * rng.beta(1.5, 4, (n, MAX_NEIGHBOURS))
    nb_nuc = nb_r * NUC_FRACTION * (1 + 0.22 * rng.random((n, MAX_NEIGHBOURS)))
    nb_nuc_ar = 1 + (nb_ar - 1) * 0.5

    # micronuclei around the main nucleus
    n_mn = np.where(micro, rng.integers(2, MAX_MICRONUCLEI + 1, n), 0)
    mn_phi = (
        rng.uniform(0, 2 * np.pi, n)[:, None]
        + np.linspace(0, 2 * np.pi, MAX_MICRONUCLEI, endpoint=False)[None, :]
    )
    mn_phi += rng.normal(0, 0.3, (n, MAX_MICRONUCLEI))
    mn_r = rng.uniform(0.06, 0.085, (n, MAX_MICRONUCLEI)) * np.sqrt(size)[:, None]
    mn_dist = nuc_a[:, None] + mn_r + rng.uniform(0.06, 0.14, (n, MAX_MICRONUCLEI)) * size[:, None]

    f32 = np.float32
    return {
        "mitotic": mitotic.astype(bool),
        "anaphase": anaphase,
        "binucleate": binuc,
        "micronuclei": micro,
        "aggregates": aff("tubulin_aggregates"),
        "actin_ring": aff("actin_ring"),
        "strength": s.astype(f32),
        "theta": theta.astype(f32),
        "cy": cy.astype(f32),
        "cx": cx.astype(f32),
        "cell_a": cell_a.astype(f32),
        "cell_b": cell_b.astype(f32),
        "cell_rough": np.where(mitotic, 0.05, rng.uniform(0.12, 0.3, n)).astype(f32),
        "nuc_cy": nuc_cy.astype(f32),
        "nuc_cx": nuc_cx.astype(f32),
        "nuc2_cy": nuc2_cy.astype(f32),
        "nuc2_cx": nuc2_cx.astype(f32),
        "nuc_a": nuc_a.astype(f32),
        "nuc_b": nuc_b.astype(f32),
        "nuc_theta": nuc_theta.astype(f32),
        "nuc_rough": np.where(micro, 0.3, 0.06).astype(f32),
        "sep": sep.astype(f32),
        "plate_a": plate_a.astype(f32),
        "plate_b": plate_b.astype(f32),
        "size": size.astype(f32),
        "dna": dna.astype(f32),
        "dna_nb": (DAPI_LEVEL * jit[:, 0] * rng.uniform(1.0, 1.8, n)).astype(f32),
        "tubulin": (TUBULIN_LEVEL * jit[:, 1]).astype(f32),
        "gh2ax": (GH2AX_LEVEL * jit[:, 2]).astype(f32),
        "actin": (ACTIN_LEVEL * jit[:, 3]).astype(f32),
        "damage": damage.astype(f32),
        "n_nb": n_nb.astype(np.int64),
        "nb_cy": (cy[:, None] + dist * np.sin(phi)).astype(f32),
        "nb_cx": (cx[:, None] + dist * np.cos(phi)).astype(f32),
        "nb_a": (nb_r * np.sqrt(nb_ar)).astype(f32),
        "nb_b": (nb_r / np.sqrt(nb_ar)).astype(f32),
        "nb_theta": rng.uniform(0, np.pi, (n, MAX_NEIGHBOURS)).astype(f32),
        "nb_nuc_a": (nb_nuc * np.sqrt(nb_nuc_ar)).astype(f32),
        "nb_nuc_b": (nb_nuc / np.sqrt(nb_nuc_ar)).astype(f32),
        "n_mn": n_mn.astype(np.int64),
        "mn_cy": (nuc_cy[:, None] + mn_dist * np.sin(mn_phi)).astype(f32),
        "mn_cx": (nuc_cx[:, None] + mn_dist * np.cos(mn_phi)).astype(f32),
        "mn_r": mn_r.astype(f32),
    }
