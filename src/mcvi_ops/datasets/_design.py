"""The design of a simulated screen: genes, complexes, guides, and each cell's metadata."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._phenotypes import BASE_MITOTIC_FRACTION, EFFECT_CODE, NOVEL_EFFECTS, SHIFT_EFFECTS

TILE_SIZE = 2960
TILE_MARGIN = 50  # cells within 50 px of the tile edge are dropped, as in the paper
EDGE_TILE_DENSITY = 1.6  # relative cell density of tiles at the well edge
COMPLEX_SIZES = (3, 6)
EFFICIENCY_RANGE = (0.4, 1.0)
PENETRANCE_RANGE = (0.75, 0.95)
STRENGTH_RANGE = (0.7, 1.0)
MITOTIC_ARREST_GAIN = 0.4  # extra mitotic probability of affected cells, times strength
_PLATE_FORMATS = ((6, 3), (24, 6), (96, 12), (384, 24))  # (wells, columns)


def _well_names(n_wells: int) -> list[str]:
    cols = next(c for size, c in _PLATE_FORMATS if n_wells <= size)
    letters = "ABCDEFGHIJKLMNOP"
    return [f"{letters[w // cols]}{w % cols + 1}" for w in range(n_wells)]


def _design(
    rng: np.random.Generator,
    n_genes: int,
    guides_per_gene: int,
    n_control_guides: int,
    *,
    no_effect_fraction: float,
    effect_scale: float,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Genes with complexes and effects, and guides with efficiencies."""
    width = max(3, len(str(n_genes)))
    names = [f"GENE{g + 1:0{width}d}" for g in range(n_genes)]
    order = rng.permutation(n_genes)
    n_none = round(n_genes * no_effect_fraction) if n_genes > 1 else 0
    with_effect = order[n_none:]
    sizes = _complex_sizes(rng, len(with_effect))
    # alternate shift and novel effects so that both kinds occur from two complexes on
    shifts, novels = list(rng.permutation(SHIFT_EFFECTS)), list(rng.permutation(NOVEL_EFFECTS))
    effects = []
    for c in range(len(sizes)):
        pool = shifts if c % 2 == 0 else novels
        effects.append(str(pool[(c // 2) % len(pool)]))
    complex_strength = rng.uniform(*STRENGTH_RANGE, len(sizes))

    complex_of = np.full(n_genes, "none", dtype=object)
    effect_of = np.full(n_genes, "none", dtype=object)
    strength = np.zeros(n_genes)
    penetrance = np.zeros(n_genes)
    start = 0
    for c, size in enumerate(sizes):
        members = with_effect[start : start + size]
        start += size
        complex_of[members] = f"CPLX{c + 1:02d}"
        effect_of[members] = effects[c]
        strength[members] = effect_scale * complex_strength[c] * rng.uniform(0.9, 1.0, size)
        penetrance[members] = effect_scale * rng.uniform(*PENETRANCE_RANGE, size)
    kind = np.array(
        [
            "none" if e == "none" else ("novel" if e in NOVEL_EFFECTS else "shift")
            for e in effect_of
        ],
        dtype=object,
    )
    genes = pd.DataFrame(
        {
            "complex": complex_of.astype(str),
            "effect_kind": kind.astype(str),
            "novel": kind == "novel",
            "effect": effect_of.astype(str),
            "strength": strength,
            "penetrance": penetrance,
        },
        index=pd.Index(names, name="gene_symbol"),
    )
    for col in ("complex", "effect_kind", "effect"):
        genes[col] = genes[col].astype(object)

    width_ntc = max(2, len(str(n_control_guides)))
    guide_names = [f"sg{g}_{k + 1}" for g in names for k in range(guides_per_gene)]
    guide_names += [f"sgNTC_{k + 1:0{width_ntc}d}" for k in range(n_control_guides)]
    guides = pd.DataFrame(
        {
            "gene_symbol": np.array(
                [g for g in names for _ in range(guides_per_gene)]
                + ["nontargeting"] * n_control_guides,
                dtype=object,
            ),
            "efficiency": np.r_[
                rng.uniform(*EFFICIENCY_RANGE, n_genes * guides_per_gene),
                np.zeros(n_control_guides),
            ],
        },
        index=pd.Index(guide_names, name="sgRNA"),
    )
    return genes, guides


def _complex_sizes(rng: np.random.Generator, n: int) -> list[int]:
    """Split ``n`` genes into complexes of 3-6 genes, enough to show every effect once if possible."""
    low, high = COMPLEX_SIZES
    if n < low:
        return [n] if n else []
    n_effects = len(SHIFT_EFFECTS) + len(NOVEL_EFFECTS)
    n_complexes = min(n // low, max(n_effects, round(n / ((low + high) / 2))))
    sizes = np.full(n_complexes, low)
    for _ in range(n - low * n_complexes):  # add the rest one by one to complexes below `high`
        open_ = np.flatnonzero(sizes < high)
        sizes[rng.choice(open_) if open_.size else rng.integers(n_complexes)] += 1
    return sizes.tolist()


def _spread(rng: np.random.Generator, n_cells: int, n_groups: int) -> np.ndarray:
    """Group labels with every group at least once and uneven (log-normal) representation."""
    weights = np.exp(rng.normal(0, 0.3, n_groups))
    extra = rng.choice(n_groups, n_cells - n_groups, p=weights / weights.sum())
    return np.r_[np.arange(n_groups), extra]


def _cells(
    rng: np.random.Generator,
    n_cells: int,
    n_ctrl: int,
    genes: pd.DataFrame,
    guides: pd.DataFrame,
    n_well_ids: int,
    rows: int,
    cols: int,
    vignetting: float,
) -> dict[str, np.ndarray]:
    """Per-cell metadata and ground truth, ordered by plate, well and tile as in real tables."""
    n_targeting = len(guides) - int((guides["gene_symbol"] == "nontargeting").sum())
    guide = np.r_[
        _spread(rng, n_cells - n_ctrl, n_targeting),
        n_targeting + _spread(rng, n_ctrl, len(guides) - n_targeting),
    ]
    guide = guide[rng.permutation(n_cells)]

    tiles = np.arange(rows * cols)
    t_row, t_col = np.divmod(tiles, cols)
    edge = (t_row == 0) | (t_row == rows - 1) | (t_col == 0) | (t_col == cols - 1)
    weights = np.where(edge, EDGE_TILE_DENSITY, 1.0)
    well_id = rng.integers(0, n_well_ids, n_cells)
    tile = rng.choice(tiles, n_cells, p=weights / weights.sum())
    cell_i, cell_j = rng.uniform(TILE_MARGIN, TILE_SIZE - TILE_MARGIN, (2, n_cells))
    order = np.lexsort((tile, well_id))
    guide, well_id, tile = guide[order], well_id[order], tile[order]
    cell_i, cell_j = cell_i[order], cell_j[order]

    gene_of_guide = guides["gene_symbol"].to_numpy()
    gene_row = genes.index.get_indexer(gene_of_guide[guide])  # -1 for controls
    control = gene_row < 0
    gene_effect = np.array([EFFECT_CODE[e] for e in genes["effect"]], dtype=np.int64)
    effect = np.where(control, 0, gene_effect[gene_row])
    strength = np.where(control, 0.0, genes["strength"].to_numpy()[gene_row])
    penetrance = np.where(control, 0.0, genes["penetrance"].to_numpy()[gene_row])
    efficiency = guides["efficiency"].to_numpy()[guide]
    drawn = (effect > 0) & (rng.random(n_cells) < efficiency * penetrance)
    arrest = drawn & (effect == EFFECT_CODE["mitotic_arrest"])
    p_mitotic = BASE_MITOTIC_FRACTION + np.where(arrest, MITOTIC_ARREST_GAIN * strength, 0.0)
    mitotic = rng.random(n_cells) < p_mitotic
    # mitotic arrest shows as the extra mitoses; every other effect shows in interphase only
    affected = np.where(arrest, mitotic, drawn & ~mitotic)
    kind = np.where(control, "control", genes["effect_kind"].to_numpy()[gene_row])

    centre = TILE_SIZE / 2
    dist2 = ((cell_i - centre) ** 2 + (cell_j - centre) ** 2) / (2 * centre**2)
    return {
        "guide": guide,
        "well_id": well_id,
        "tile": tile.astype(np.int64),
        "cell_i": cell_i,
        "cell_j": cell_j,
        "edge_tile": edge[tile],
        "effect": effect,
        "strength": strength,
        "affected": affected.astype(bool),
        "mitotic": mitotic,
        "effect_kind": kind.astype(str),
        "illumination": 1 - vignetting * dist2,
    }
