"""LogME (You et al., ICML 2021): how well frozen features explain labels, as the per-sample log evidence of a
Bayesian linear model, maximised over its prior and noise precisions by the paper's fixed-point updates."""

from __future__ import annotations

import math

import numpy as np


# ------------------------------------------------------------------------------------------------ LogME
def logme(features: np.ndarray, targets: np.ndarray, regression: bool = False, max_iter: int = 100) -> float:
    """LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021):
    the maximised log evidence per sample of `targets` under y = F w + noise, w ~ N(0, 1/alpha), noise ~
    N(0, 1/beta), on `features` F `(N, D)`. Classification: the mean over the one-hot columns of the class ids
    in `targets` `(N,)`; regression: the mean over the columns of `targets` `(N,)` or `(N, T)`.

    For one column y, with F^T F = V diag(s) V^T and z = V^T F^T y, repeat until alpha and beta settle:
        gamma = sum_i beta s_i / (alpha + beta s_i);   m = V (beta z / (alpha + beta s))
        alpha = gamma / |m|^2;   beta = (N - gamma) / |F m - y|^2
    then  L = N/2 log beta + D/2 log alpha - N/2 log 2 pi - beta/2 |F m - y|^2 - alpha/2 |m|^2
              - 1/2 sum_i log(alpha + beta s_i),  returned as L / N.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    y = np.asarray(targets)
    if regression:
        columns = y.reshape(len(y), -1).astype(np.float64)
    else:
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(f"LogME needs at least two classes in the labels, got {classes.tolist()}")
        columns = (y.reshape(-1, 1) == classes.reshape(1, -1)).astype(np.float64)
    if len(columns) != len(f):
        raise ValueError(f"{len(f)} feature rows but {len(columns)} labels")
    n, d = f.shape
    s, v = np.linalg.eigh(f.T @ f)  # (D,), (D, D)
    s = np.clip(s, 0.0, None)
    evidences = []
    for y_col in columns.T:
        z = v.T @ (f.T @ y_col)  # (D,)
        yy = float(y_col @ y_col)
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            denominator = alpha + beta * s
            gamma = float((beta * s / denominator).sum())
            m = beta * z / denominator  # (D,) in the eigenbasis
            mm = float(m @ m)
            residual = max(yy - 2.0 * float(m @ z) + float((s * m * m).sum()), 1e-12)  # |F m - y|^2
            # floored: features that carry nothing (all zero) would drive alpha, and gamma = n beta, to zero
            new_alpha, new_beta = max(gamma / max(mm, 1e-12), 1e-12), max((n - gamma) / residual, 1e-12)
            settled = abs(new_alpha - alpha) / alpha < 1e-5 and abs(new_beta - beta) / beta < 1e-5
            alpha, beta = new_alpha, new_beta
            if settled:
                break
        denominator = alpha + beta * s
        m = beta * z / denominator
        mm = float(m @ m)
        residual = max(yy - 2.0 * float(m @ z) + float((s * m * m).sum()), 1e-12)
        evidence = (
            n / 2 * math.log(beta)
            + d / 2 * math.log(alpha)
            - n / 2 * math.log(2 * math.pi)
            - beta / 2 * residual
            - alpha / 2 * mm
            - 0.5 * float(np.log(denominator).sum())
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


__all__ = ["logme"]
