"""Fitting linear probes. Standardise -> optional PCA -> logistic regression, collapsed to
one affine map so scoring at decode time is a dot product. Measuring them (rates, AUROC,
thresholds) is :mod:`rootdefense.stats`."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression


def fit_affine(X: np.ndarray, y: np.ndarray, standardize: bool = True, pca_dims: int | None = None,
               C: float = 0.1, seed: int = 0, sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Return (w, b) with logit = X @ w + b equal to the fitted pipeline's decision function.
    ``sample_weight``: each row's weight in the logistic loss (on top of the class balance)."""
    X = np.asarray(X, dtype=np.float64)
    d = X.shape[1]
    mu = X.mean(0) if standardize else np.zeros(d)
    sigma = X.std(0) + 1e-6 if standardize else np.ones(d)
    Z = (X - mu) / sigma
    proj = np.eye(d)
    center = np.zeros(d)
    if pca_dims:
        pca = PCA(n_components=pca_dims, random_state=seed).fit(Z)
        proj, center = pca.components_.T, pca.mean_
    P = (Z - center) @ proj
    lr = LogisticRegression(C=C, max_iter=3000, class_weight="balanced").fit(P, y, sample_weight=sample_weight)
    coef = lr.coef_[0]
    direction = proj @ coef  # in standardised space
    w = direction / sigma
    b = float(lr.intercept_[0] - center @ direction - (mu / sigma) @ direction)
    return w, b


def scores(X: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.asarray(X, dtype=np.float64) @ w + b)))

