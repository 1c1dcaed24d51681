"""How alive the latents of a contrastive model are: variance of posterior means, active units."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: a latent dimension is *active* when its posterior mean varies across cells by more than this
#: (Burda et al., 2016, "Importance weighted autoencoders": Cov_x(E_q[z | x]) > 0.01)
ACTIVE_VARIANCE = 0.01
#: the salient latent counts as collapsed when its mean variance falls below this share of the
#: background latent's, or no salient dimension is active
COLLAPSE_RATIO = 0.05


def latent_activity(salient: np.ndarray, background: np.ndarray) -> pd.DataFrame:
    """Activity of the salient and background latents from posterior means of perturbed cells.

    Parameters
    ----------
    salient
        Salient posterior means ``s`` of perturbed cells, shape (n_cells, n_salient).
    background
        Background posterior means ``z`` of the same cells, shape (n_cells, n_background).

    Returns
    -------
    DataFrame indexed by ``"salient"`` and ``"background"`` with columns ``n_dims``,
    ``active_dims`` (dimensions whose variance across cells exceeds 0.01),
    ``mean_variance`` (variance across cells, averaged over dimensions),
    ``variance_ratio`` (``mean_variance`` over the background's) and ``collapsed`` (salient
    only: ``variance_ratio < 0.05`` or no active dimension).
    """
    rows = {}
    variances = {
        "salient": np.asarray(salient, dtype=np.float64).var(axis=0),
        "background": np.asarray(background, dtype=np.float64).var(axis=0),
    }
    reference = max(float(variances["background"].mean()), 1e-12)
    for name, var in variances.items():
        ratio = float(var.mean()) / reference
        active = int((var > ACTIVE_VARIANCE).sum())
        rows[name] = {
            "n_dims": len(var),
            "active_dims": active,
            "mean_variance": float(var.mean()),
            "variance_ratio": ratio,
            "collapsed": name == "salient" and (ratio < COLLAPSE_RATIO or active == 0),
        }
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "latent"
    return frame


def warn_if_collapsed(activity: pd.DataFrame, hint: str) -> None:
    """Log a warning naming ``hint`` (the setting to change) when the salient latent collapsed."""
    salient = activity.loc["salient"]
    if not bool(salient["collapsed"]):
        return
    logger.warning(
        "The salient latent has collapsed: the posterior means of perturbed cells vary %.3g times "
        "as much as the background's (%d of %d dimensions active), so it carries almost no "
        "perturbation effect. %s",
        salient["variance_ratio"],
        salient["active_dims"],
        salient["n_dims"],
        hint,
    )
