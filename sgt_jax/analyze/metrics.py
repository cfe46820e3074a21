"""Numbers that need no picture: feature separability (linear probe, silhouette) and the 2-D
embedding of the paper's Fig. 7 / Fig. 11 (PCA to 50, then t-SNE, perplexity 30), all with
scikit-learn; and the per-category aggregation of prompt-token attention (Fig. 8b / Fig. 12)."""
from __future__ import annotations

import warnings

import numpy as np
from threadpoolctl import threadpool_limits

PROBE_MAX_ITER = 300      # L-BFGS iterations of the probe (tol 1e-3); more change the accuracy by < 1%


def _standardize(x):
    x = np.asarray(x, np.float64)
    mu, sd = x.mean(0), x.std(0)
    return (x - mu) / np.where(sd > 0, sd, 1.0)


def separability(features, labels, *, folds: int = 5, seed: int = 0) -> dict:
    """``linear_probe_accuracy``: mean accuracy of an L2 logistic regression (standardised
    features) over a stratified ``folds``-fold cross-validation (folds reduced to the smallest
    class size, at least 2); ``silhouette``: the silhouette score of the labels in the
    standardised feature space (Euclidean; 1 = tight separate clusters, 0 = overlapping, < 0
    mixed); ``chance``: the majority-class rate."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x = _standardize(features)
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"separability needs >= 2 classes, got {len(classes)}")
    k = int(min(folds, counts.min()))
    if k < 2:
        raise ValueError(f"every class needs >= 2 samples for cross-validation (counts {dict(zip(classes, counts))})")
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with threadpool_limits(1), warnings.catch_warnings():        # small problems: threads only contend
        warnings.simplefilter("ignore", ConvergenceWarning)
        acc = cross_val_score(LogisticRegression(max_iter=PROBE_MAX_ITER, tol=1e-3), x, y, cv=cv)
        sil = silhouette_score(x, y)
    return {"linear_probe_accuracy": float(acc.mean()), "linear_probe_std": float(acc.std()),
            "folds": k, "silhouette": float(sil),
            "chance": float(counts.max() / counts.sum()), "num_samples": int(len(y)),
            "num_classes": int(len(classes)), "dim": int(x.shape[1])}


def embed_2d(features, *, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, 2): PCA to min(50, N, D) dimensions, then t-SNE (perplexity 30, or N/4 for small N)
    as the paper's Fig. 11; ``method="pca"``: the first two principal components."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = _standardize(features)
    n, d = x.shape
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method != "tsne":
        raise ValueError(f"method={method!r}: 'tsne' or 'pca'")
    with threadpool_limits(1):
        x = PCA(n_components=min(50, n, d), random_state=seed).fit_transform(x)
        perplexity = float(min(30.0, max(2.0, (n - 1) / 4)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def category_shares(token_mass, token_categories, categories) -> dict:
    """Per category: its share (%) of the total attention mass over the given tokens
    (``token_mass`` (T,) mass per prompt token, ``token_categories`` (T,) names)."""
    m = np.asarray(token_mass, np.float64)
    tot = m.sum()
    cats = np.asarray(token_categories)
    return {c: float(100.0 * m[cats == c].sum() / tot) if tot > 0 else 0.0 for c in categories}
