"""Simulated optical pooled screens with known perturbation effects and technical artefacts."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from mcvi_ops._constants import UNS
from mcvi_ops.data._link import link_crops
from mcvi_ops.data._store import CropStore
from mcvi_ops.data._writer import CropWriter

from ._complexes import complexes_of, complexes_path, gmt_text, write_complexes
from ._design import (
    _PLATE_FORMATS,
    EDGE_TILE_DENSITY,
    TILE_MARGIN,
    TILE_SIZE,
    _cells,
    _design,
    _well_names,
)
from ._phenotypes import (
    BASE_MITOTIC_FRACTION,
    CHANNEL_NAMES,
    EFFECT_DESCRIPTIONS,
    sample_cell_params,
)
from ._render import TextureBank, render_cells

logger = logging.getLogger(__name__)

PIXEL_SIZE = 0.3036  # micrometres per pixel of the tiles (Funk et al. 2022)
REFERENCE_CROP = 100  # crops are drawn as 100 px crops of the real screen resampled to crop_size
VIGNETTING = 0.45  # relative loss of signal in the tile corners
GAIN_LOG_SD = 0.15  # per-well, per-channel gains are log-normal
NO_EFFECT_FRACTION = 0.3
BLOCK_CELLS = 1024  # cell parameters are drawn per block of this many cells, from its own seed
_LARGE_IN_MEMORY = 4 * 1024**3  # warn above this many bytes of crops held in memory
#: settings of the two difficulty presets (see `synthetic_screen`)
DIFFICULTY = {
    "standard": {
        "no_effect_fraction": NO_EFFECT_FRACTION,
        "effect_scale": 1.0,
        "artefact_scale": 1.0,
    },
    # weaker effects (lower penetrance and strength), half the genes without effect, and
    # technical artefacts three times as strong (well gains; vignetting up to its cap)
    "hard": {"no_effect_fraction": 0.5, "effect_scale": 0.6, "artefact_scale": 3.0},
}
MAX_VIGNETTING = 0.9


def synthetic_screen(
    n_cells: int = 10_000,
    *,
    n_genes: int = 60,
    guides_per_gene: int = 4,
    n_control_guides: int = 20,
    control_fraction: float = 0.25,
    crop_size: int = 64,
    n_plates: int = 1,
    n_wells: int = 4,
    tile_grid: tuple[int, int] = (6, 6),
    difficulty: Literal["standard", "hard"] = "standard",
    seed: int = 0,
    path: str | os.PathLike | None = None,
    chunk_cells: int | None = None,
    batch_size: int = 1024,
    overwrite: bool = False,
) -> AnnData:
    """Simulate an optical pooled screen of four-channel single-cell crops with known ground truth.

    .. long function: documentation and signature; the body is under 80 lines.

    Cells of HeLa-like morphology are drawn in the four channels of Funk et al. (2022): DAPI,
    alpha-tubulin, gamma-H2AX and phalloidin. They vary in size, shape, orientation and cell-cycle
    stage (including mitoses with condensed DNA plates, a tubulin spindle and a rounded, bright
    cortex) and share their crop with partial neighbours. Technical artefacts are tied to the
    metadata as in a real screen: per-well, per-channel gains; vignetting that dims cells far from
    the centre of their 2,960 px tile; and denser, smaller cells in tiles at the well edge.

    Genes are grouped into complexes (3-6 genes) that share one effect, and about 30% of the genes
    have no effect. *Shift* effects move phenotypes that controls already show
    (``mitotic_arrest``, ``large_cells``, ``dna_damage``, ``elongated``, ``g2_arrest``) while
    *novel* effects draw structures controls never show (``binucleate``, ``micronuclei``,
    ``tubulin_aggregates``, ``actin_ring``). Each guide has a knockout efficiency and each gene a
    penetrance: a cell is affected with probability ``efficiency * penetrance``. Effects other than
    ``mitotic_arrest`` show in interphase cells only; for ``mitotic_arrest`` the affected cells are
    the extra mitoses.

    Crops are rendered batch by batch and streamed to a chunked zarr store, so screens of millions
    of cells never hold their crops in memory. The result is identical for a given ``seed``
    whatever ``path``, ``batch_size`` or ``chunk_cells``.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_genes
        Number of targeted genes, named ``GENE001``, ``GENE002``, ...
    guides_per_gene
        sgRNAs per gene, named ``sg<GENE>_<k>``.
    n_control_guides
        Non-targeting control sgRNAs, named ``sgNTC_<k>``.
    control_fraction
        Fraction of cells carrying a control guide, in ``(0, 1)``.
    crop_size
        Side of the square crops in pixels, at least 32. Cells are drawn at the same relative
        size whatever the crop size, as if 100 px crops had been resampled.
    n_plates
        Number of plates, named ``P1``, ``P2``, ...
    n_wells
        Wells per plate, named row-major in the smallest standard plate that holds them
        (6-well: ``A1, A2, A3, B1, ...``).
    tile_grid
        ``(rows, cols)`` of the tiles in each well; tile ``t`` sits at
        ``divmod(t, cols)``, and tiles in the first or last row or column are at the well edge.
    difficulty
        ``"standard"``: 30% of genes without effect, penetrance 0.75-0.95, strength 0.7-1.0,
        per-well gains with a log-normal spread of 0.15 and 45% vignetting. ``"hard"``: half the
        genes without effect, penetrance and strength times 0.6 (0.45-0.57 and 0.42-0.6), and
        stronger artefacts (gain spread 0.45, 90% vignetting): a PCA of the pixels predicts the
        well of control cells with a macro-F1 of about 0.8 while the perturbations are harder
        to see.
    seed
        Seed of everything random.
    path
        Where to write the crops (a local path or an fsspec URL). If `None`, they are written to
        a new in-memory store that lives as long as the Python process. The simulated complexes
        are written beside the store as a GMT file named after it (``screen.zarr`` ->
        ``screen_complexes.gmt``).
    chunk_cells
        Cells per chunk of the crop store; by default about 4 MB per chunk.
    batch_size
        Cells rendered and written per step; bounds the memory used.
    overwrite
        Replace an existing store at ``path`` (and its complexes file).

    Returns
    -------
    AnnData with one row per cell, linked to its crops by :func:`~mcvi_ops.data.link_crops`:

    ``.X``
        Mean intensity of each channel over the crop (``DAPI_mean``, ...), float32.
    ``.obs``
        ``plate``, ``well`` (categorical), ``tile`` (int), ``cell_i``, ``cell_j`` (centroid
        row/column in the 2,960 px tile), ``sgRNA``, ``gene_symbol`` (controls are
        ``"nontargeting"``), ``stage`` (``"interphase"``/``"mitotic"``), the truth columns
        ``effect_kind`` (``"control"``, ``"none"``, ``"shift"`` or ``"novel"``) and ``affected``
        (whether the cell shows its gene's effect), and ``crop_index``.
    ``.uns["synthetic_screen"]``
        The simulation settings as plain data: tile size and grid (``"row-major"`` tile order),
        pixel size, channel names, seed, plates, wells and per-well ``channel_gains``
        (plates x wells x channels), vignetting, effect descriptions, ..., and

        - ``"complexes"``: the simulated complexes, complex name (``"CPLX01"``, ...) -> list of
          member genes, ready for ``relationships=`` of
          :func:`~mcvi_ops.metrics.known_relationships`;
        - ``"complexes_file"`` (only with ``path``): the GMT file written beside the store,
          ``<store name without .zarr>_complexes.gmt``, one line per complex
          (``name<TAB>simulated <effect> (<kind>)<TAB>gene<TAB>...``).
    ``.uns["ground_truth"]``
        DataFrame indexed by ``gene_symbol`` (targeted genes): ``complex`` (``"CPLX01"``, ...;
        ``"none"`` for genes without effect), ``effect_kind`` (``"none"``, ``"shift"`` or
        ``"novel"``), ``novel`` (bool), ``effect`` (effect name or ``"none"``), ``strength``
        (0 for no effect) and ``penetrance``.
    ``.uns["guide_truth"]``
        DataFrame indexed by ``sgRNA``: ``gene_symbol`` and knockout ``efficiency`` (0 for
        controls).
    ``.uns["crops"]``
        The crop store reference written by :func:`~mcvi_ops.data.link_crops`.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.datasets.synthetic_screen(n_cells=500, n_genes=10, seed=0)
    >>> mcvi_ops.data.get_crops(adata, [0, 1]).shape
    (2, 4, 64, 64)
    >>> adata.uns["ground_truth"].columns.tolist()
    ['complex', 'effect_kind', 'novel', 'effect', 'strength', 'penetrance']

    Written to disk, the screen brings its own known relationships:

    >>> adata = mcvi_ops.datasets.synthetic_screen(path="screen.zarr")  # doctest: +SKIP
    >>> adata.uns["synthetic_screen"]["complexes_file"]  # doctest: +SKIP
    'screen_complexes.gmt'
    """
    if difficulty not in DIFFICULTY:
        msg = f"`difficulty` must be one of {sorted(DIFFICULTY)}, got {difficulty!r}."
        raise ValueError(msg)
    design = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "guides_per_gene": guides_per_gene,
        "n_control_guides": n_control_guides,
        "control_fraction": control_fraction,
        "crop_size": crop_size,
        "n_plates": n_plates,
        "n_wells": n_wells,
        "tile_grid": tile_grid,
        "seed": seed,
    }
    n_ctrl = _validate(
        **design, batch_size=batch_size, chunk_cells=chunk_cells, path=path, overwrite=overwrite
    )
    n_cells, crop_size, seed = int(n_cells), int(crop_size), int(seed)
    rows, cols = (int(t) for t in tile_grid)
    design.update(n_cells=n_cells, crop_size=crop_size, seed=seed, tile_grid=[rows, cols])
    design_rng, cell_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))

    preset = DIFFICULTY[difficulty]
    vignetting = min(VIGNETTING * preset["artefact_scale"], MAX_VIGNETTING)
    genes, guides = _design(
        design_rng,
        n_genes,
        guides_per_gene,
        n_control_guides,
        no_effect_fraction=preset["no_effect_fraction"],
        effect_scale=preset["effect_scale"],
    )
    plates = [f"P{p + 1}" for p in range(n_plates)]
    wells = _well_names(n_wells)
    gain_sd = GAIN_LOG_SD * preset["artefact_scale"]
    gains = np.exp(design_rng.normal(0, gain_sd, (n_plates, n_wells, len(CHANNEL_NAMES))))
    cells = _cells(
        cell_rng, n_cells, n_ctrl, genes, guides, n_plates * n_wells, rows, cols, vignetting
    )

    obs = _cell_obs(cells, guides, plates, wells)
    store = _store_location(path, n_cells, crop_size)
    crop_store, means = _stream_crops(
        store,
        cells,
        gains.reshape(-1, len(CHANNEL_NAMES))[cells["well_id"]],
        seed=seed,
        crop_size=crop_size,
        chunk_cells=chunk_cells,
        batch_size=int(batch_size),
        overwrite=overwrite,
    )

    adata = AnnData(
        X=means,
        obs=obs,
        var=pd.DataFrame(index=[f"{c}_mean" for c in CHANNEL_NAMES]),
    )
    adata.uns[UNS.synthetic] = {
        **_recorded_parameters(**design, difficulty=difficulty),
        "plates": plates,
        "wells": wells,
        "channel_gains": gains.tolist(),
        "gain_log_sd": gain_sd,
        "vignetting": vignetting,
        "effects": dict(EFFECT_DESCRIPTIONS),
        "complexes": complexes_of(genes),
    }
    if path is not None:
        target = complexes_path(path)
        write_complexes(target, gmt_text(adata.uns[UNS.synthetic]["complexes"], genes))
        adata.uns[UNS.synthetic]["complexes_file"] = str(target)
    adata.uns[UNS.ground_truth] = genes
    adata.uns[UNS.guide_truth] = guides
    link_crops(adata, crop_store)
    logger.info(
        "Simulated %d cells (%d genes, %d guides) into %s", n_cells, n_genes, len(guides), store
    )
    return adata


def _store_location(path, n_cells: int, crop_size: int) -> str | os.PathLike:
    """``path``, or a new in-memory store (with a warning when it would be large)."""
    if path is not None:
        return path
    n_bytes = n_cells * len(CHANNEL_NAMES) * crop_size**2 * 2
    if n_bytes > _LARGE_IN_MEMORY:
        logger.warning(
            "Holding %.1f GB of crops in memory; pass `path=` to stream them to disk instead.",
            n_bytes / 1e9,
        )
    return f"memory://mcvi-synthetic-{uuid.uuid4().hex}.zarr"


def _cell_obs(
    cells: dict[str, np.ndarray], guides: pd.DataFrame, plates: list[str], wells: list[str]
) -> pd.DataFrame:
    """The obs of the simulated cells: plate, well, tile, position, guide, gene and truth."""
    n_wells = len(wells)
    return pd.DataFrame(
        {
            "plate": pd.Categorical.from_codes(cells["well_id"] // n_wells, plates),
            "well": pd.Categorical.from_codes(cells["well_id"] % n_wells, wells),
            "tile": cells["tile"],
            "cell_i": cells["cell_i"],
            "cell_j": cells["cell_j"],
            "sgRNA": pd.Categorical.from_codes(cells["guide"], guides.index.tolist()),
            "gene_symbol": pd.Categorical(guides["gene_symbol"].to_numpy()[cells["guide"]]),
            "stage": pd.Categorical.from_codes(
                cells["mitotic"].astype(np.int8), ["interphase", "mitotic"]
            ),
            "effect_kind": pd.Categorical(
                cells["effect_kind"], categories=["control", "none", "shift", "novel"]
            ),
            "affected": cells["affected"],
        },
        index=pd.Index([f"cell{i}" for i in range(len(cells["guide"]))]),
    )


def _recorded_parameters(
    *,
    n_cells: int,
    n_genes: int,
    guides_per_gene: int,
    n_control_guides: int,
    control_fraction: float,
    crop_size: int,
    n_plates: int,
    n_wells: int,
    tile_grid: list[int],
    seed: int,
    difficulty: str,
) -> dict:
    """The simulation's parameters and fixed geometry, as recorded in ``.uns``."""
    preset = DIFFICULTY[difficulty]
    return {
        "tile_size": TILE_SIZE,
        "tile_grid": tile_grid,
        "tile_order": "row-major",
        "tile_margin": TILE_MARGIN,
        "pixel_size": PIXEL_SIZE,
        "crop_pixel_size": PIXEL_SIZE * REFERENCE_CROP / crop_size,
        "channel_names": list(CHANNEL_NAMES),
        "seed": seed,
        "n_cells": n_cells,
        "n_genes": int(n_genes),
        "guides_per_gene": int(guides_per_gene),
        "n_control_guides": int(n_control_guides),
        "control_fraction": float(control_fraction),
        "crop_size": crop_size,
        "n_plates": int(n_plates),
        "n_wells": int(n_wells),
        "difficulty": difficulty,
        "no_effect_fraction": preset["no_effect_fraction"],
        "effect_scale": preset["effect_scale"],
        "edge_tile_density": EDGE_TILE_DENSITY,
        "base_mitotic_fraction": BASE_MITOTIC_FRACTION,
    }


def _stream_crops(
    store: str | os.PathLike,
    cells: dict[str, np.ndarray],
    cell_gains: np.ndarray,
    *,
    seed: int,
    crop_size: int,
    chunk_cells: int | None,
    batch_size: int,
    overwrite: bool,
) -> tuple[CropStore, np.ndarray]:
    """Render the crops batch by batch into a new store; return it and per-channel crop means.

    Cell parameters are drawn per block of :data:`BLOCK_CELLS` cells from a seed of their own, so
    the crops do not depend on ``batch_size``.
    """
    n_cells = len(cells["guide"])
    bank = TextureBank(crop_size, seed)
    means = np.empty((n_cells, len(CHANNEL_NAMES)), dtype=np.float32)
    block_cache: dict[int, dict[str, np.ndarray]] = {}

    def block_params(block: int) -> dict[str, np.ndarray]:
        if block not in block_cache:
            block_cache.clear()
            lo, hi = block * BLOCK_CELLS, min((block + 1) * BLOCK_CELLS, n_cells)
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, block)))
            part = slice(lo, hi)
            params = sample_cell_params(
                rng,
                mitotic=cells["mitotic"][part],
                effect=cells["effect"][part],
                strength=cells["strength"][part],
                affected=cells["affected"][part],
                edge_tile=cells["edge_tile"][part],
            )
            params.update(bank.sample(rng, hi - lo, params["theta"]))
            block_cache[block] = params
        return block_cache[block]

    with CropWriter(
        store,
        n_channels=len(CHANNEL_NAMES),
        crop_size=crop_size,
        channel_names=list(CHANNEL_NAMES),
        dtype=np.uint16,
        chunk_cells=chunk_cells,
        pixel_size=PIXEL_SIZE * REFERENCE_CROP / crop_size,
        attrs={"source": "mcvi_ops.datasets.synthetic_screen", "seed": seed},
        overwrite=overwrite,
    ) as writer:
        for start in range(0, n_cells, batch_size):
            stop = min(start + batch_size, n_cells)
            parts = []
            for block in range(start // BLOCK_CELLS, (stop - 1) // BLOCK_CELLS + 1):
                offset = block * BLOCK_CELLS
                sl = slice(max(start, offset) - offset, min(stop, offset + BLOCK_CELLS) - offset)
                parts.append({k: v[sl] for k, v in block_params(block).items()})
            params = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            crops, means[start:stop] = render_cells(
                params,
                bank,
                illumination=cells["illumination"][start:stop],
                gains=cell_gains[start:stop],
            )
            writer.append(crops)
            logger.debug("Rendered cells %d-%d of %d", start, stop, n_cells)
    crop_store = writer.store
    return crop_store, means


def _validate(
    *,
    n_cells,
    n_genes,
    guides_per_gene,
    n_control_guides,
    control_fraction,
    crop_size,
    n_plates,
    n_wells,
    tile_grid,
    seed,
    batch_size,
    chunk_cells,
    path,
    overwrite,
) -> int:
    """Check the arguments of :func:`synthetic_screen`; return the number of control cells.

    .. long function: documentation and signature; the body is under 80 lines.
    """
    for name, value, low in (
        ("n_cells", n_cells, 1),
        ("n_genes", n_genes, 1),
        ("guides_per_gene", guides_per_gene, 1),
        ("n_control_guides", n_control_guides, 1),
        ("n_plates", n_plates, 1),
        ("n_wells", n_wells, 1),
        ("batch_size", batch_size, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            msg = f"`{name}` must be an integer >= {low}, got {value!r}."
            raise ValueError(msg)
    if chunk_cells is not None and (
        not isinstance(chunk_cells, int | np.integer) or chunk_cells < 1
    ):
        msg = f"`chunk_cells` must be a positive integer or None, got {chunk_cells!r}."
        raise ValueError(msg)
    if not isinstance(crop_size, int | np.integer) or crop_size < 32:
        msg = (
            f"`crop_size` must be an integer of at least 32 pixels, got {crop_size!r}; smaller "
            "crops cannot show the nucleus and cytoplasm apart. Use e.g. 64 or 100."
        )
        raise ValueError(msg)
    if n_wells > _PLATE_FORMATS[-1][0]:
        msg = (
            f"`n_wells` must be at most {_PLATE_FORMATS[-1][0]} (a 384-well plate), got {n_wells}."
        )
        raise ValueError(msg)
    if len(tuple(tile_grid)) != 2 or not all(
        isinstance(t, int | np.integer) and t >= 1 for t in tile_grid
    ):
        msg = f"`tile_grid` must be two positive integers (rows, cols), got {tile_grid!r}."
        raise ValueError(msg)
    if not isinstance(control_fraction, float | int | np.floating) or not (
        0 < control_fraction < 1
    ):
        msg = (
            f"`control_fraction` must lie strictly between 0 and 1, got {control_fraction!r}. "
            "A screen needs both control and targeting cells; 0.25 is typical."
        )
        raise ValueError(msg)
    n_ctrl = round(n_cells * control_fraction)
    n_targeting = n_genes * guides_per_gene
    if n_ctrl < n_control_guides or n_cells - n_ctrl < n_targeting:
        msg = (
            f"n_cells={n_cells} with control_fraction={control_fraction} gives {n_ctrl} control "
            f"and {n_cells - n_ctrl} targeting cells, fewer than the {n_control_guides} control "
            f"and {n_targeting} targeting guides ({n_genes} genes x {guides_per_gene}): every "
            "guide needs at least one cell. Increase `n_cells` or reduce `n_genes`, "
            "`guides_per_gene` or `n_control_guides`."
        )
        raise ValueError(msg)
    if path is not None and not overwrite:
        text = os.fspath(path)
        if ("://" not in text or text.startswith("file://")) and Path(
            text.removeprefix("file://")
        ).expanduser().exists():
            msg = (
                f"{text} already exists; pass `overwrite=True` to replace it or choose a new path."
            )
            raise FileExistsError(msg)
        gmt = complexes_path(path)
        if isinstance(gmt, Path) and gmt.exists():
            msg = (
                f"{gmt} already exists (the complexes file of a store at {text}); pass "
                "`overwrite=True` to replace it or choose a new path."
            )
            raise FileExistsError(msg)
    return n_ctrl
