"""Health of a trained contrastive model: how alive its latents are, and whether it memorised labels."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import stats

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


#: the embeddings count as memorising the perturbation labels when perturbations sit this many
#: times farther from the controls in their training cells than in held-out cells (median over
#: perturbations, squared distances of equally sized cell means). Measured on FeatureMCVAE, 10k
#: simulated cells: 5.8 with the read-out, 1.7 without; in both, every perturbation without
#: effect looks active on the training cells and none does on held-out cells.
MEMORIZATION_RATIO = 1.5
#: ... and a one-sided sign test (ratios above 1 more often than not) gives a p-value below this
MEMORIZATION_PVALUE = 0.01


def label_memorization(
    train: np.ndarray,
    train_labels: np.ndarray,
    heldout: np.ndarray,
    heldout_labels: np.ndarray,
    controls: np.ndarray,
) -> pd.Series:
    """How much farther perturbations sit from the controls in training cells than in held-out ones.

    Per-perturbation prior means (and a perturbation read-out) reward an encoder that moves each
    *training* cell towards its own perturbation, which a large encoder can do by memorising
    cells. Perturbations without any effect then separate from the controls in the embeddings
    of the training cells, but not in those of cells the model never saw. The test: for each
    perturbation, the squared distance between the mean embedding of its training cells and the
    controls' mean, over the same for as many of its held-out cells (equal numbers, so sampling
    noise inflates both alike). Without memorisation the ratio is about 1.

    Parameters
    ----------
    train, heldout
        Posterior means of perturbed training and held-out cells, shape (n_cells, n_latent).
    train_labels, heldout_labels
        Their perturbation codes (only perturbations with equally many cells on both sides
        are compared; :func:`memorization_check` draws them so).
    controls
        Posterior means of control cells.

    Returns
    -------
    Series with ``median_ratio`` (over perturbations), ``n_perturbations``, ``pvalue`` (one-sided
    sign test that the ratios are above 1 more often than not) and ``memorized`` (``median_ratio``
    above 1.5 and ``pvalue`` below 0.01; fewer than 7 perturbations can never reach it).
    """
    center = np.asarray(controls, dtype=np.float64).mean(axis=0)
    scale = np.asarray(controls, dtype=np.float64).std(axis=0) + 1e-8
    train = (np.asarray(train, dtype=np.float64) - center) / scale
    heldout = (np.asarray(heldout, dtype=np.float64) - center) / scale
    train_labels, heldout_labels = np.asarray(train_labels), np.asarray(heldout_labels)
    ratios = []
    for label in np.intersect1d(train_labels, heldout_labels):
        a, b = train[train_labels == label], heldout[heldout_labels == label]
        n = min(len(a), len(b))
        if n == 0:
            continue
        far = float((a[:n].mean(axis=0) ** 2).sum())
        near = float((b[:n].mean(axis=0) ** 2).sum())
        ratios.append(far / max(near, 1e-12))
    median = float(np.median(ratios)) if ratios else float("nan")
    # one-sided sign test that training cells sit farther than held-out ones: the median of a
    # few dozen noisy ratios alone can exceed 1.5 without any memorisation (8% of draws with 9
    # perturbations and 8 latent dimensions; 0.1% with the sign test as well)
    pvalue = (
        float(
            stats.binomtest(
                int((np.asarray(ratios) > 1).sum()), len(ratios), 0.5, alternative="greater"
            ).pvalue
        )
        if ratios
        else float("nan")
    )
    return pd.Series(
        {
            "median_ratio": median,
            "n_perturbations": len(ratios),
            "pvalue": pvalue,
            "memorized": bool(median > MEMORIZATION_RATIO and pvalue < MEMORIZATION_PVALUE),
        }
    )


#: what to do about memorised labels, named in the warning
HELD_OUT_HINT = (
    "Train with a held-out share (e.g. `train(train_size=0.5)`) and aggregate and score the "
    "cells of `model.validation_indices`, or train on half of each perturbation's guides and "
    "score the other half (docs: 'Score on cells the model did not train on')."
)


def warn_if_memorized(memorization: pd.Series | None, hint: str = HELD_OUT_HINT) -> None:
    """Log a warning when the embeddings of training cells carry their labels by memorisation."""
    if memorization is None or not bool(memorization["memorized"]):
        return
    logger.warning(
        "Perturbations sit %.1f times farther from the controls in the embeddings of the cells "
        "the model trained on than in cells it did not see (median over %d perturbations): it "
        "has memorised labels. Embeddings of the training cells overstate perturbation effects "
        "(perturbations without any effect look active); score perturbations on cells the model "
        "did not train on. %s",
        memorization["median_ratio"],
        memorization["n_perturbations"],
        hint,
    )


def memorization_check(
    model,
    codes: np.ndarray,
    control_code: int,
    *,
    n_perturbations: int = 50,
    n_cells_each: int = 40,
):
    """:func:`label_memorization` of a trained scvi-tools model on its own train/validation split.

    ``codes`` are the perturbation codes of the training AnnData's cells. At most
    ``n_perturbations`` perturbations with cells in both parts are drawn, and at most
    ``n_cells_each`` of their cells on each side. `None` when the model kept no validation cells
    (``train_size=1``) or they hold no perturbed cell.
    """
    validation, train = (
        np.asarray([] if rows is None else rows, dtype=np.int64)
        for rows in (model.validation_indices, model.train_indices)
    )
    codes = np.asarray(codes).reshape(-1)
    train = train[codes[train] != control_code]
    validation = validation[codes[validation] != control_code]
    if len(train) == 0 or len(validation) == 0:
        return None
    rng = np.random.default_rng(0)
    # a sample of perturbations with cells on both sides, equally many cells on each side
    shared = rng.permutation(np.intersect1d(codes[train], codes[validation]))[:n_perturbations]
    picks = [[], []]
    for code in shared:
        sides = [rng.permutation(rows[codes[rows] == code]) for rows in (train, validation)]
        n = min(n_cells_each, *(len(side) for side in sides))
        for pick, side in zip(picks, sides, strict=True):
            pick.append(side[:n])
    controls = np.flatnonzero(codes == control_code)
    controls = np.sort(rng.permutation(controls)[: n_cells_each * 10])
    if not len(shared) or not len(controls):
        return None
    picks = [np.sort(np.concatenate(pick)) for pick in picks] + [controls]
    embedded = [model._embed_for_health(rows) for rows in picks]
    return label_memorization(
        embedded[0], codes[picks[0]], embedded[1], codes[picks[1]], controls=embedded[2]
    )


def record_training_health(model, codes: np.ndarray, *, control_code: int, hint: str) -> None:
    """After ``train()``: latent activity and label memorisation into ``model.history``, warned.

    ``codes`` are the perturbation codes of the training cells; ``hint`` names the settings to
    change when the salient latent has collapsed.
    """
    activity = model.get_latent_activity()
    memorization = memorization_check(model, codes, control_code=control_code)
    if isinstance(model.history_, dict):
        model.history_["latent_activity"] = activity
        if memorization is not None:
            model.history_["label_memorization"] = memorization.to_frame("value").T
    warn_if_memorized(memorization)
    warn_if_collapsed(activity, hint=hint)
