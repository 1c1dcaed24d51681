"""What the quality benchmark and the calibration study share: baselines, training, scoring.

Every embedding is aggregated the same way (cells -> guides -> genes, minus the control mean),
optionally after per-well normalisation against controls, and scored on the same cells.
"""

from __future__ import annotations

import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scvi
import torch
from _hybrid import HybridMCVAE
from sklearn.decomposition import PCA

import mcvi_ops
from mcvi_ops import MCVAE, VAE, FeatureMCVAE
from mcvi_ops.metrics._synthetic import novelty_auroc
from mcvi_ops.model._health import latent_activity

MODELS = {
    "mcvae": (MCVAE, {"prior": "both"}),
    "mcvae_paper": (MCVAE, {"objective": "paper"}),
    "mcvae_prior_salient": (MCVAE, {"prior": "salient"}),
    "mcvae_prior_background": (MCVAE, {"prior": "background"}),
    "cvae": (MCVAE, {"prior": "none"}),
    "vae": (VAE, {}),
    # the same objective on CellProfiler features of the crops (needs `features=`)
    "fmcvae": (FeatureMCVAE, {}),
    # a calibration candidate: MCVAE that also reconstructs those features (benchmarks/_hybrid.py)
    "hybrid": (HybridMCVAE, {}),
}
#: what a user would run instead (CellProfiler, pixels, intensities) and the controls of training
#: (the model's architecture with random weights, and the model before training)
BASELINES = ("cellprofiler", "pixels_pca", "intensity_stats", "random_encoder", "untrained")
NORMALISATIONS = ("none", "center_scale", "tvn")
GUIDE, GENE, CONTROL = "sgRNA", "gene_symbol", "nontargeting"
SETUP = {"batch_key": "batch", "intensity_factor_key": "intensity_factors"}


# --- screens and protocols ------------------------------------------------------------------
def simulated_screen(path, *, n_cells: int, seed: int, difficulty: str = "standard"):
    """A simulated screen with technical covariates and intensity factors (the recommended set-up)."""
    adata = mcvi_ops.datasets.synthetic_screen(
        n_cells=n_cells, seed=seed, difficulty=difficulty, path=path, overwrite=True
    )
    mcvi_ops.pp.derive_covariates(adata)
    mcvi_ops.pp.estimate_intensity_factors(adata, batch_key="batch", seed=seed)
    return adata


def guide_halves(adata: ad.AnnData, seed: int) -> np.ndarray:
    """Boolean mask of the cells of half A of the guides (of every gene, and of the controls)."""
    rng = np.random.default_rng([seed, 0xCA1])
    guides = adata.obs[[GUIDE, GENE]].drop_duplicates().sort_values(GUIDE)
    half_a = []
    for _, group in guides.groupby(GENE, observed=True):
        names = rng.permutation(group[GUIDE].astype(str).to_numpy())
        half_a += list(names[: max(1, len(names) // 2)])
    return adata.obs[GUIDE].astype(str).isin(half_a).to_numpy()


# --- baselines and controls -----------------------------------------------------------------
def pixels_pca(adata, *, n_comps=64, fit_cells=5_000, seed=0):
    """PCA of arcsinh-transformed pixels, fitted on a sample and applied chunk by chunk."""
    store = mcvi_ops.data.linked_store(adata)
    index = adata.obs[adata.uns["crops"]["index_key"]].to_numpy()
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(adata.n_obs, min(fit_cells, adata.n_obs), replace=False))

    def flat(rows):
        return np.arcsinh(store.take(index[rows]).astype(np.float32)).reshape(len(rows), -1)

    pca = PCA(n_components=n_comps, svd_solver="randomized", random_state=seed)
    pca.fit(flat(sample))
    parts = [
        pca.transform(flat(np.arange(a, min(a + 2048, adata.n_obs))))
        for a in range(0, adata.n_obs, 2048)
    ]
    adata.obsm["pixels_pca"] = np.concatenate(parts).astype(np.float32)


def cellprofiler_table(adata, cache: Path | None = None) -> ad.AnnData:
    """CellProfiler measurements of the crops (``tl.cellprofiler_features``), cached as h5ad."""
    if cache is not None and cache.exists():
        features = ad.read_h5ad(cache)
        features.obs = adata.obs.copy()
        return features
    features = mcvi_ops.tl.cellprofiler_features(adata, progress=False)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        ad.AnnData(features.X.astype(np.float32), var=features.var).write_h5ad(cache)
    return features


def cellprofiler(adata, *, features=None, n_comps=64, seed=0):
    """CellProfiler measurements of the same crops -> PCA (normalisation is applied later)."""
    features = cellprofiler_table(adata) if features is None else features
    x = np.asarray(features.X, dtype=np.float64)
    keep = np.isfinite(x).all(axis=0) & (np.nanstd(x, axis=0) > 0)
    x = x[:, keep]
    bad = ~np.isfinite(x).all(axis=1)
    x[bad] = 0.0
    x = (x - x.mean(0)) / x.std(0)
    n = min(n_comps, x.shape[1], x.shape[0] - 1)
    adata.obsm["cellprofiler"] = PCA(n, random_state=seed).fit_transform(x).astype(np.float32)
    return features.n_vars, int(keep.sum()), int(bad.sum())


def fov_distance(adata, tile_size: float = 2960.0) -> np.ndarray:
    """Distance of each cell from the centre of its field of view, in half tile widths."""
    half = tile_size / 2
    return np.hypot(adata.obs["cell_i"] - half, adata.obs["cell_j"] - half).to_numpy() / half


def _untrained_module(adata, *, seed: int):
    scvi.settings.seed = seed
    MCVAE.setup_anndata(adata, perturbation_key=GENE, control_category=CONTROL, **SETUP)
    return MCVAE(adata).module.eval()


def _model_inputs(adata, module, batch: int = 1024):
    """Every cell's crop as the model sees it (intensity-corrected, transformed), in row order."""
    store = mcvi_ops.data.linked_store(adata)
    index = adata.obs[adata.uns["crops"]["index_key"]].to_numpy()
    factors = np.asarray(adata.obsm["intensity_factors"])
    for start in range(0, adata.n_obs, batch):
        rows = np.arange(start, min(start + batch, adata.n_obs))
        x = torch.as_tensor(store.take(index[rows]).astype(np.float32))
        yield module.transform(module.correct_intensity(x, torch.as_tensor(factors[rows])))


def model_controls(adata, *, seed: int = 0) -> None:
    """``random_encoder``: the model's encoders with random weights, their features before the
    bottleneck reduced by PCA to the latent size; ``untrained``: the model's posterior means
    before training."""
    module = _untrained_module(adata, seed=seed)
    features, posterior = [], []
    encoders = (module.salient_encoder, module.background_encoder)
    with torch.inference_mode():
        for x in _model_inputs(adata, module):
            features.append(torch.cat([e.features(x) for e in encoders], dim=1).numpy())
            posterior.append(torch.cat([e(x).loc for e in encoders], dim=1).numpy())
    n_latent = module.n_salient_latent + module.n_background_latent
    pca = PCA(n_latent, random_state=seed)
    adata.obsm["random_encoder"] = pca.fit_transform(np.concatenate(features)).astype(np.float32)
    adata.obsm["untrained"] = np.concatenate(posterior).astype(np.float32)


def intensity_stats(adata, *, seed: int = 0) -> None:
    """Per channel: mean, standard deviation and fraction of pixels above the controls' 90th
    percentile, of the crops as the model sees them (12 features for 4 channels)."""
    module = _untrained_module(adata, seed=seed)
    control = (adata.obs[GENE] == CONTROL).to_numpy()
    crops = [x.numpy() for x in _model_inputs(adata, module)]
    sample = np.concatenate(crops)[control][:2000]
    threshold = np.percentile(sample.transpose(1, 0, 2, 3).reshape(len(sample[0]), -1), 90, axis=1)
    stats = []
    for x in crops:
        flat = x.reshape(*x.shape[:2], -1)
        above = (flat > threshold[None, :, None]).mean(-1)
        stats.append(np.concatenate([flat.mean(-1), flat.std(-1), above], axis=1))
    adata.obsm["intensity_stats"] = np.concatenate(stats).astype(np.float32)


def compute_baseline(adata, name: str, *, seed: int = 0, features=None) -> None:
    """Write the baseline ``name`` to ``adata.obsm[name]`` (``model_controls`` writes two)."""
    if name == "cellprofiler":
        n_features, n_kept, n_failed = cellprofiler(adata, features=features, seed=seed)
        print(f"cellprofiler: {n_features} features ({n_kept} kept), {n_failed} failed")
    elif name == "pixels_pca":
        pixels_pca(adata, seed=seed)
    elif name == "intensity_stats":
        intensity_stats(adata, seed=seed)
    else:
        model_controls(adata, seed=seed)


# --- models ---------------------------------------------------------------------------------
#: the feature model's recommended set-up: the well as batch, the distance from the centre of
#: the field of view as continuous covariate
FEATURE_SETUP = {"batch_key": "batch", "continuous_covariate_keys": ["fov_distance"]}


def fit_and_embed(
    name, train, embed, *, seed, init=None, train_kwargs=None, corrected=True, setup=None
):
    """Train model ``name`` on the cells of ``train``; embed the cells of ``embed``.

    The feature model takes the CellProfiler tables of the same cells. ``setup`` replaces the
    recommended set-up arguments (``corrected=False``: none).
    """
    cls, defaults = MODELS[name]
    scvi.settings.seed = seed
    if setup is None:
        setup = (FEATURE_SETUP if cls is FeatureMCVAE else SETUP) if corrected else {}
        if cls is HybridMCVAE:
            setup = {**setup, "auxiliary_key": "cellprofiler_features"}
    cls.setup_anndata(train, perturbation_key=GENE, control_category=CONTROL, **setup)
    model = cls(train, **{**defaults, **(init or {})})
    start = time.perf_counter()
    options = {} if cls is FeatureMCVAE else {"save_checkpoints": False}
    model.train(enable_progress_bar=False, **options, **(train_kwargs or {}))
    seconds = time.perf_counter() - start
    if cls is VAE:
        return model.get_latent_representation(embed), seconds, model
    return model.get_latent_representation(embed, kind="both"), seconds, model


def train_model(
    name, adata, *, seed, protocol="insample", init=None, train_kwargs=None, features=None, **kw
):
    """Embed every cell with model ``name``: trained on all cells (``"insample"``) or two-fold by
    guide halves (``"crossfit"``: each half embedded by the model trained on the other).

    Returns the representations written to ``adata.obsm``, seconds of training (summed over
    folds), the last model and its latent activity on perturbed cells.
    """
    source = adata
    if MODELS[name][0] is FeatureMCVAE:
        source = features.copy()
        source.obs = adata.obs.copy()
        source.obs["fov_distance"] = fov_distance(adata)  # = pp.derive_covariates
    if protocol == "insample":
        embedding, seconds, model = fit_and_embed(
            name, source, source, seed=seed, init=init, train_kwargs=train_kwargs, **kw
        )
    else:
        half_a = guide_halves(adata, seed)
        embedding, seconds = None, 0.0
        for fit_on in (half_a, ~half_a):
            part, seconds_part, model = fit_and_embed(
                name,
                source[fit_on].copy(),
                source[~fit_on].copy(),
                seed=seed,
                init=init,
                train_kwargs=train_kwargs,
                **kw,
            )
            if embedding is None:
                embedding = np.empty((adata.n_obs, part.shape[1]), dtype=np.float32)
            embedding[~fit_on] = part
            seconds += seconds_part
    if MODELS[name][0] is VAE:
        adata.obsm[name] = embedding
        return [name], seconds, model, None
    n_salient = model.module.n_salient_latent
    parts = {
        "both": embedding,
        "salient": embedding[:, :n_salient],
        "background": embedding[:, n_salient:],
    }
    for kind, values in parts.items():
        adata.obsm[f"{name}_{kind}"] = values
    perturbed = (adata.obs[GENE] != CONTROL).to_numpy()
    if protocol != "insample":
        perturbed &= ~fit_on  # the cells the last model embedded: one latent space
    activity = latent_activity(parts["salient"][perturbed], parts["background"][perturbed])
    return [f"{name}_{kind}" for kind in parts], seconds, model, activity


# --- scoring --------------------------------------------------------------------------------
def normalised(adata, reps, methods):
    """Add per-well control-normalised copies of each representation; returns the new keys."""
    out = {}
    for rep in reps:
        for method in methods:
            if method == "none":
                out[rep] = (rep, "none")
                continue
            key = f"{rep}__{method}"
            mcvi_ops.tl.normalize_to_controls(
                adata,
                use_rep=rep,
                batch_key="batch",
                perturbation_key=GENE,
                control_category=CONTROL,
                method=method,
                key_added=key,
            )
            out[key] = (rep, method)
    return out


def score(adata, keys, *, novelty_pairs, seed):
    """Every score for every representation, as a tidy table."""
    rows = []
    reps = list(keys)
    complexes = adata.uns["synthetic_screen"]["complexes"]  # shipped with the screen
    genes = mcvi_ops.tl.aggregate(adata, use_rep=reps, by=(GUIDE, GENE), control_category=CONTROL)
    guides = mcvi_ops.tl.aggregate(
        adata,
        use_rep=reps,
        by=(GUIDE, GENE),
        level="guide",
        control_category=CONTROL,
        keep_controls=True,
    )
    known = mcvi_ops.metrics.known_relationships(
        genes, use_rep=reps, relationships={"complexes": complexes}, min_pairs=5
    )
    for _, r in known.iterrows():
        rows.append((r["representation"], r["metric"], float(r["value"])))
    activity = mcvi_ops.metrics.phenotypic_activity(
        guides, use_rep=reps, perturbation_key=GENE, control_category=CONTROL, seed=seed
    )
    consistency = mcvi_ops.metrics.phenotypic_consistency(
        genes, use_rep=reps, relationships={"complexes": complexes}, seed=seed
    )
    for frame, name, flag in (
        (activity, "activity", "active"),
        (consistency, "consistency", "consistent"),
    ):
        summary = frame.groupby("representation").agg(
            mAP=("mean_average_precision", "mean"), active=(flag, "mean")
        )
        for rep, r in summary.iterrows():
            rows.append((rep, f"{name}_mAP", float(r["mAP"])))
            rows.append((rep, f"{name}_fraction_significant", float(r["active"])))
    for controls_only in (True, False):
        leak = mcvi_ops.metrics.technical_covariates(
            adata, use_rep=reps, controls_only=controls_only, seed=seed
        )
        where = "controls" if controls_only else "all"
        for _, r in leak.iterrows():
            metric = "macro_f1" if r["covariate"] == "batch" else "auroc"
            rows.append(
                (r["representation"], f"{r['covariate']}_{metric}_{where}", float(r[metric]))
            )
    for name, (salient, background) in novelty_pairs.items():
        auroc = novelty_auroc(
            adata, salient_rep=salient, background_rep=background, n_permutations=200, seed=seed
        )
        rows.append((name, "novelty_auroc", auroc))
    return pd.DataFrame(rows, columns=["representation", "metric", "value"])


def score_table(adata, reps, *, normalisations, novelty_pairs, seed) -> pd.DataFrame:
    """``score`` of every representation under every normalisation, with a normalisation column."""
    keys = normalised(adata, reps, normalisations)
    scores = score(adata, keys, novelty_pairs=novelty_pairs, seed=seed)
    scores["normalisation"] = scores["representation"].map(lambda k: keys.get(k, (k, "none"))[1])
    scores["representation"] = scores["representation"].map(lambda k: keys.get(k, (k, "none"))[0])
    return scores
