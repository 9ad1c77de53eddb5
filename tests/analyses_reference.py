"""Slow, literal reference implementations that the fast paths are tested against."""
import torch


def masked_mean_cosine(x, y, mask):
    x, y = x[mask].double(), y[mask].double()
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
    return float(cos.mean())


def cka_feature_space(x, y):
    """Linear CKA in feature space: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred columns."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))
