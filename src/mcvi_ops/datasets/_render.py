"""Vectorised rendering of synthetic four-channel cell crops for :func:`synthetic_screen`.

Every cell is a set of soft-edged rotated ellipses (cell, nucleus, neighbours, mitotic plates,
spindle, micronuclei) computed for a whole batch at once from quadratic forms on a shared
coordinate grid, filled with textures cut from a small bank of precomputed noise fields at random
offsets. Rendering is a pure function of the per-cell parameters, so a cell's crop does not depend
on the batch it is rendered in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._phenotypes import FOCI_LEVEL, MAX_MICRONUCLEI, MAX_NEIGHBOURS

N_ORIENTATIONS = 8
BANK_FIELDS = 8
RENDER_CHUNK = 96  # cells per vectorised step; keeps the working set in cache

CAMERA_OFFSET = 100.0
BACKGROUND = np.array([60.0, 90.0, 70.0, 80.0], dtype=np.float32)
NOISE_SCALE = 1.0  # multiples of the Poisson standard deviation
READ_NOISE = 6.0
EDGE_WIDTH_PX = 1.1  # soft-edge half-width of nuclei, in pixels
CELL_EDGE_WIDTH_PX = 1.8  # wider: gives the F-actin cortex its width

_TEXTURES = ("low", "chrom", "fibre_t", "fibre_a", "foci", "agg", "white")


def _fft_filter(noise: np.ndarray, sigma_par: float, sigma_perp: float, angle: float) -> np.ndarray:
    """Periodic anisotropic Gaussian smoothing of white noise (long axis at ``angle``)."""
    size = noise.shape[-1]
    k = 2 * np.pi * np.fft.fftfreq(size)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    k_par = kx * np.cos(angle) + ky * np.sin(angle)
    k_perp = -kx * np.sin(angle) + ky * np.cos(angle)
    kernel = np.exp(-0.5 * (sigma_par**2 * k_par**2 + sigma_perp**2 * k_perp**2))
    return np.fft.ifft2(np.fft.fft2(noise) * kernel).real


def _standardise(field: np.ndarray) -> np.ndarray:
    field = field - field.mean(axis=(-2, -1), keepdims=True)
    return field / field.std(axis=(-2, -1), keepdims=True)


def _spots(
    rng: np.random.Generator, n: int, size: int, density: float, sigma: float, low: float
) -> np.ndarray:
    """Fields of isolated Gaussian spots whose peak heights are uniform in ``[low, 1]``."""
    out = np.zeros((n, size, size))
    for field in out:
        count = rng.poisson(density * size * size)
        rows, cols = rng.integers(0, size, (2, count))
        np.add.at(field, (rows, cols), rng.uniform(low, 1.0, count))
    return _fft_filter(out, sigma, sigma, 0.0) * (2 * np.pi * sigma**2)


class TextureBank:
    """Precomputed noise fields of twice the crop size; cells take windows at random offsets.

    Parameters
    ----------
    crop_size
        Side of the crops in pixels.
    seed
        Seed of the fields.
    """

    def __init__(self, crop_size: int, seed: int) -> None:
        self.crop_size = crop_size
        size = 2 * crop_size
        scale = crop_size / 64
        rng = np.random.default_rng([seed, 0x7E57])
        shape = (BANK_FIELDS, size, size)
        fields = {
            "white": rng.standard_normal(shape),
            "low": _standardise(_fft_filter(rng.standard_normal(shape), 5 * scale, 5 * scale, 0)),
            "chrom": np.clip(
                1 + 0.22 * _standardise(_fft_filter(rng.standard_normal(shape), scale, scale, 0)),
                0.2,
                None,
            ),
            "foci": np.clip(
                _spots(rng, BANK_FIELDS, size, 0.07 / scale**2, 0.9 * scale, 0.02), 0, 1
            ),
            "agg": np.clip(
                _spots(rng, BANK_FIELDS, size, 0.012 / scale**2, 1.3 * scale, 0.6), 0, 1
            ),
        }
        for name in ("fibre_t", "fibre_a"):
            per = []
            for k in range(N_ORIENTATIONS):
                angle = np.pi * k / N_ORIENTATIONS
                raw = rng.standard_normal((2, size, size))
                per.append(_standardise(_fft_filter(raw, 5 * scale, 0.7 * scale, angle)))
            fibre = np.concatenate(per)  # index = orientation * 2 + copy
            fields[name] = np.clip(1 + (0.35 if name == "fibre_t" else 0.5) * fibre, 0.1, None)
        self.n_fields = {name: len(f) for name, f in fields.items()}
        self._fields = {
            name: np.ascontiguousarray(f, dtype=np.float32) for name, f in fields.items()
        }
        self._views = {
            name: sliding_window_view(f, (crop_size, crop_size), axis=(1, 2))
            for name, f in self._fields.items()
        }

    def sample(self, rng: np.random.Generator, n: int, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Draw which window of which field every texture of ``n`` cells uses."""
        out: dict[str, np.ndarray] = {}
        orient = np.round(np.asarray(theta) / np.pi * N_ORIENTATIONS).astype(np.int64)
        orient %= N_ORIENTATIONS
        for name in _TEXTURES:
            count = 4 if name == "white" else 1
            index = rng.integers(0, self.n_fields[name], (n, count))
            if name.startswith("fibre"):
                base = orient if name == "fibre_t" else (orient + N_ORIENTATIONS // 2)
                index = (base % N_ORIENTATIONS)[:, None] * 2 + index % 2
            offset = rng.integers(0, self.crop_size + 1, (n, count, 2))
            out[f"tex_{name}"] = np.concatenate([index[..., None], offset], axis=-1).astype(
                np.int32
            )
        return out

    def take(self, name: str, tex: np.ndarray, slot: int = 0) -> np.ndarray:
        """Windows ``(n, crop_size, crop_size)`` for the ``(field, row, col)`` rows of ``tex``."""
        t = tex[:, slot]
        return self._views[name][t[:, 0], t[:, 1], t[:, 2]]


def _r2(g: np.ndarray, cy, cx, a, b, theta) -> np.ndarray:
    """Squared elliptical radius ``(n, S, S)`` of rotated ellipses on the grid ``g``."""
    c, s = np.cos(theta), np.sin(theta)
    ia2, ib2 = 1 / (a * a), 1 / (b * b)
    qa = (c * c * ia2 + s * s * ib2)[:, None]
    qc = (s * s * ia2 + c * c * ib2)[:, None]
    qb = (2 * c * s * (ia2 - ib2))[:, None]
    dx = g[None, :] - cx[:, None]
    dy = g[None, :] - cy[:, None]
    out = (qb * dx)[:, None, :] * dy[:, :, None]
    out += (qa * dx * dx)[:, None, :]
    out += (qc * dy * dy)[:, :, None]
    return out


def _soft(r2: np.ndarray, radius_px: np.ndarray, width_px: float) -> np.ndarray:
    """Turn squared radii into a mask with a soft edge of about ``width_px`` pixels (in place)."""
    k = (radius_px / (2 * width_px)).astype(np.float32)[:, None, None]
    r2 *= -k
    r2 += k + np.float32(0.5)
    return np.clip(r2, 0, 1, out=r2)


def _ellipse(g, half, cy, cx, a, b, theta, *, width=EDGE_WIDTH_PX, rough=None, field=None):
    r2 = _r2(g, cy, cx, a, b, theta)
    if rough is not None:
        r2 += field * rough[:, None, None]
    return _soft(r2, np.sqrt(a * b) * half, width)


def render_cells(
    params: dict[str, np.ndarray],
    bank: TextureBank,
    *,
    illumination: np.ndarray,
    gains: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the crops of cells described by ``params``.

    Parameters
    ----------
    params
        Output of :func:`~mcvi_ops.datasets._phenotypes.sample_cell_params` merged with
        :meth:`TextureBank.sample`.
    bank
        Texture bank of the screen.
    illumination
        Vignetting factor of each cell (1 at the centre of the field of view).
    gains
        Per-channel gain of each cell's well, shape ``(n, 4)``.

    Returns
    -------
    uint16 crops ``(n, 4, S, S)`` and float32 per-channel mean intensities ``(n, 4)``.
    """
    n = len(params["mitotic"])
    size = bank.crop_size
    crops = np.empty((n, 4, size, size), dtype=np.uint16)
    means = np.empty((n, 4), dtype=np.float32)
    for start in range(0, n, RENDER_CHUNK):
        sl = slice(start, min(start + RENDER_CHUNK, n))
        chunk = {key: value[sl] for key, value in params.items()}
        image = _render_chunk(chunk, bank, illumination[sl], gains[sl])
        means[sl] = image.mean(axis=(2, 3))
        crops[sl] = image
    return crops, means


def _render_chunk(q: dict[str, np.ndarray], bank: TextureBank, illum, gains) -> np.ndarray:
    """Images of a chunk of cells from their parameters ``q``: shapes, four stains, camera."""
    size = bank.crop_size
    half = size / 2
    g = ((np.arange(size, dtype=np.float32) + 0.5) / half - 1).astype(np.float32)
    low = bank.take("low", q["tex_low"])
    shapes = _cell_shapes(q, g, half, low)
    nuc, spindle, poles = _central_nuclei(q, g, half, low)
    chrom = bank.take("chrom", q["tex_chrom"])
    image = np.empty((len(q["mitotic"]), 4, size, size), dtype=np.float32)
    _paint_dapi(image[:, 0], q, nuc, shapes.nb_nuc, chrom)
    _paint_tubulin(image[:, 1], q, bank, shapes, nuc, chrom, spindle, poles)
    _paint_gh2ax(image[:, 2], q, bank, nuc, np.maximum(nuc, shapes.nb_nuc), chrom)
    _paint_actin(image[:, 3], q, bank, shapes, g, half)
    return _camera(image, q, bank, illum, gains)


@dataclass
class _Shapes:
    """Masks of a chunk: the central cell, it with its neighbours, their nuclei, a gradient."""

    main: np.ndarray  # the central cell
    cell: np.ndarray  # the central cell and the neighbours cut by the crop edge
    nb_nuc: np.ndarray  # the neighbours' nuclei
    gradient: np.ndarray  # 1 at the centre of the central cell, 0 at its outline


def _cell_shapes(q: dict[str, np.ndarray], g: np.ndarray, half: float, low: np.ndarray) -> _Shapes:
    """The central cell, with a rough outline, and the neighbours cut by the crop edge."""
    n, size = len(q["mitotic"]), g.size
    r2 = _r2(g, q["cy"], q["cx"], q["cell_a"], q["cell_b"], q["theta"])
    r2 += low * q["cell_rough"][:, None, None]
    gradient = np.clip(1 - r2, 0, 1)
    main = _soft(r2, np.sqrt(q["cell_a"] * q["cell_b"]) * half, CELL_EDGE_WIDTH_PX)
    cell = main.copy()
    nb_nuc = np.zeros((n, size, size), dtype=np.float32)
    flipped = low[:, ::-1, ::-1]
    for k in range(MAX_NEIGHBOURS):
        idx = np.flatnonzero(q["n_nb"] > k)
        if not idx.size:
            break
        cy, cx, th = q["nb_cy"][idx, k], q["nb_cx"][idx, k], q["nb_theta"][idx, k]
        a, b = q["nb_a"][idx, k], q["nb_b"][idx, k]
        m = _ellipse(
            g, half, cy, cx, a, b, th, width=CELL_EDGE_WIDTH_PX,
            rough=np.full(idx.size, 0.2, np.float32), field=flipped[idx],
        )  # fmt: skip
        cell[idx] = np.maximum(cell[idx], m)
        m = _ellipse(g, half, cy, cx, q["nb_nuc_a"][idx, k], q["nb_nuc_b"][idx, k], th)
        nb_nuc[idx] = np.maximum(nb_nuc[idx], m)
    return _Shapes(main=main, cell=cell, nb_nuc=nb_nuc, gradient=gradient)


def _central_nuclei(
    q: dict[str, np.ndarray], g: np.ndarray, half: float, low: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The central cell's nuclei (interphase, binucleate, micronuclei, mitotic plates).

    Also the spindle and its poles of mitotic cells (`None` without mitotic cells).
    """
    n, size = len(q["mitotic"]), g.size
    mit = np.flatnonzero(q["mitotic"])
    inter = np.flatnonzero(~q["mitotic"])
    nuc = np.zeros((n, size, size), dtype=np.float32)
    nq = {k: q[k][inter] for k in ("nuc_cy", "nuc_cx", "nuc_a", "nuc_b", "nuc_theta", "nuc_rough")}
    nuc[inter] = _ellipse(
        g, half, nq["nuc_cy"], nq["nuc_cx"], nq["nuc_a"], nq["nuc_b"], nq["nuc_theta"],
        rough=nq["nuc_rough"], field=low[inter, :, ::-1],
    )  # fmt: skip
    binuc = np.flatnonzero(q["binucleate"])
    if binuc.size:
        second = _ellipse(
            g, half, q["nuc2_cy"][binuc], q["nuc2_cx"][binuc], q["nuc_a"][binuc],
            q["nuc_b"][binuc], q["nuc_theta"][binuc],
        )  # fmt: skip
        nuc[binuc] = np.maximum(nuc[binuc], second)
    for k in range(MAX_MICRONUCLEI):
        idx = np.flatnonzero(q["n_mn"] > k)
        if not idx.size:
            break
        r = q["mn_r"][idx, k]
        m = _ellipse(g, half, q["mn_cy"][idx, k], q["mn_cx"][idx, k], r, r, r * 0, width=0.8)
        nuc[idx] = np.maximum(nuc[idx], 1.5 * m)  # micronuclei are condensed, bright
    if not mit.size:
        return nuc, None, None
    th, sep = q["theta"][mit], q["sep"][mit]
    # the spindle runs across the plate's long axis (theta)
    sy, sx = np.cos(th), -np.sin(th)
    cy, cx, sz = q["cy"][mit], q["cx"][mit], q["size"][mit]
    pa, pb = q["plate_a"][mit], q["plate_b"][mit]
    plates = _ellipse(g, half, cy + sep / 2 * sy, cx + sep / 2 * sx, pa, pb, th)
    other = _ellipse(g, half, cy - sep / 2 * sy, cx - sep / 2 * sx, pa, pb, th)
    nuc[mit] = np.maximum(plates, other)
    spindle = _ellipse(g, half, cy, cx, 0.19 * sz, 0.28 * sz + sep / 2, th, width=2.0)
    pole_r = 0.05 * sz
    reach = 0.26 * sz + sep / 2
    poles = np.maximum(
        _ellipse(g, half, cy + reach * sy, cx + reach * sx, pole_r, pole_r, th),
        _ellipse(g, half, cy - reach * sy, cx - reach * sx, pole_r, pole_r, th),
    )
    return nuc, spindle, poles


def _paint_dapi(dapi, q, nuc, nb_nuc, chrom) -> None:
    """DAPI: the nuclei, textured by chromatin."""
    np.multiply(nuc, q["dna"][:, None, None], out=dapi)
    dapi += nb_nuc * q["dna_nb"][:, None, None]
    dapi *= chrom


def _paint_tubulin(tub, q, bank, shapes: _Shapes, nuc, chrom, spindle, poles) -> None:
    """Tubulin: fibrous cytoplasm, brighter around the nucleus; spindle in mitosis; aggregates."""
    nuclei = np.maximum(nuc, shapes.nb_nuc)
    cyto = np.clip(shapes.cell - 0.8 * nuclei, 0, 1)
    np.multiply(cyto, bank.take("fibre_t", q["tex_fibre_t"]), out=tub)
    gradient = shapes.gradient
    gradient *= 0.6
    gradient += 0.7
    tub *= gradient
    tub *= q["tubulin"][:, None, None]
    mit = np.flatnonzero(q["mitotic"])
    if mit.size:
        level = q["tubulin"][mit][:, None, None]
        tub[mit] = 0.45 * tub[mit] + level * (2.2 * spindle * chrom[mit] + 3.5 * poles)
    agg = np.flatnonzero(q["aggregates"])
    if agg.size:
        amp = (q["tubulin"][agg] * (4.0 + 3.0 * q["strength"][agg]))[:, None, None]
        spots = bank.take("agg", q["tex_agg"][agg])
        tub[agg] += amp * spots * np.clip(shapes.main[agg] - nuc[agg], 0, 1)


def _paint_gh2ax(gh, q, bank, nuc, nuclei, chrom) -> None:
    """gH2AX: dim nuclear stain plus foci; foci appear in order of height as damage grows."""
    np.multiply(chrom, 0.3, out=gh)
    gh += 0.7
    gh *= nuclei
    gh *= q["gh2ax"][:, None, None]
    foci = bank.take("foci", q["tex_foci"])
    foci += (q["damage"] - 1)[:, None, None]
    np.clip(foci, 0, None, out=foci)
    foci *= nuc
    foci *= np.where(q["mitotic"], 0.2 * FOCI_LEVEL, FOCI_LEVEL).astype(np.float32)[:, None, None]
    gh += foci


def _paint_actin(act, q, bank, shapes: _Shapes, g, half: float) -> None:
    """Phalloidin: cortex at the cell outline plus stress fibres; a ring around the nucleus."""
    cell, main = shapes.cell, shapes.main
    np.multiply(bank.take("fibre_a", q["tex_fibre_a"]), 0.35, out=act)
    act += 0.25
    act *= cell
    band = 1 - cell
    band *= cell
    band *= 5.5
    act += band
    mit = np.flatnonzero(q["mitotic"])
    if mit.size:
        act[mit] += 3.0 * band[mit] * main[mit]
    ring = np.flatnonzero(q["actin_ring"])
    if ring.size:
        factor = 1.55
        m = _ellipse(
            g, half, q["nuc_cy"][ring], q["nuc_cx"][ring], q["nuc_a"][ring] * factor,
            q["nuc_b"][ring] * factor, q["nuc_theta"][ring], width=1.6,
        )  # fmt: skip
        m *= 1 - m
        act[ring] += (8.0 + 4.0 * q["strength"][ring])[:, None, None] * m
    act *= q["actin"][:, None, None]


def _camera(image: np.ndarray, q, bank, illum, gains) -> np.ndarray:
    """Optics and camera: background, vignetting, per-well gains, shot and read noise."""
    np.maximum(image, 0, out=image)
    image += BACKGROUND[None, :, None, None]
    image *= (illum[:, None] * gains).astype(np.float32)[:, :, None, None]
    noise = np.sqrt(image + READ_NOISE**2)
    for c in range(4):
        noise[:, c] *= bank.take("white", q["tex_white"], c)
    image += noise
    image += CAMERA_OFFSET
    np.clip(image, 0, 65535, out=image)
    return np.rint(image, out=image)
