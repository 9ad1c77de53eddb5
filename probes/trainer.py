"""Layer-wise logistic-regression probes, all layers at once (Jin et al., 2025, "Exploring Concept Depth", arXiv
2404.07066).

For each seed: a stratified train/test split; features standardised per layer with the training
statistics; L2-regularised logistic regression (sklearn's objective: C * sum of log-losses + ||w||^2/2,
intercept unpenalised) for every layer, every cross-validation fold and every C of the grid in one
batched problem; the C with the best mean validation accuracy per layer (the smallest on ties, as
sklearn's LogisticRegressionCV) refitted on the whole training split; accuracy, F1 and ROC AUC on
the test split. Results are averaged over seeds with a 95% interval (t distribution).

The optimiser is L-BFGS vectorised over problems: every (layer, fold) pair keeps its own history,
step and convergence flag, and all gradients come from two batched matmuls per evaluation. The C
grid runs from strong to weak regularisation with warm starts. `sklearn_reference` is the plain
per-layer loop with scikit-learn, kept as the twin the tests and `benchmarks/probes.py` compare with.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from lensbench.errors import LensbenchError
from lensbench.stats import ci95_halfwidth


@dataclass(frozen=True)
class ProbeConfig:
    Cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    folds: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    test_fraction: float = 0.2
    max_iter: int = 300
    tol: float = 1e-4  # on the max-norm of the gradient of the mean loss


@dataclass
class ProbeCurves:
    """Per-layer test metrics over seeds: `metrics[name]` is [seeds, layers]."""

    metrics: dict[str, np.ndarray]
    best_C: np.ndarray  # [seeds, layers]
    config: dict = field(default_factory=dict)

    def mean(self, metric: str = "accuracy") -> np.ndarray:
        return self.metrics[metric].mean(0)

    def ci95(self, metric: str = "accuracy") -> np.ndarray:
        """Half-width of the 95% t-interval of the mean over seeds (0 with one seed)."""
        return ci95_halfwidth(self.metrics[metric], axis=0)


def check_task_size(labels: np.ndarray, folds: int, test_fraction: float) -> None:
    counts = np.bincount(labels, minlength=2)
    smallest = int(counts.min())
    need = math.ceil(folds / (1 - test_fraction)) + 1
    if len(counts) > 2:
        raise LensbenchError(f"labels take {len(counts)} values; probes are binary (map the task to 0/1)")
    if smallest < need:
        raise LensbenchError(f"the smaller class has {smallest} examples, fewer than the {need} that {folds}-fold "
                             f"cross-validation with a {test_fraction:.0%} test split needs: add examples or lower "
                             f"--folds")


def _stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    test = []
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test += idx[:int(round(test_fraction * len(idx)))].tolist()
    mask = np.zeros(len(labels), bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _stratified_folds(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """fold index per example, classes spread evenly."""
    fold = np.empty(len(labels), np.int64)
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = np.arange(len(idx)) % k
    return fold


class _Problems:
    """Mean log-loss + lam/2 ||w||^2 for [L, P] problems over shared features X [L, n, d] and
    per-problem sample weights M [P, n] (rows of a fold), batched."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, M: torch.Tensor, lam: torch.Tensor):
        self.X, self.y, self.lam = X, y, lam
        self.Mn = M / M.sum(1, keepdim=True)  # [P, n]

    def logits(self, W: torch.Tensor) -> torch.Tensor:  # W [L, P, d+1] -> [L, P, n]
        return torch.bmm(W[..., :-1], self.X.transpose(1, 2)) + W[..., -1:]

    def loss_grad(self, W: torch.Tensor, grad: bool = True):
        z = self.logits(W)
        loss = (torch.nn.functional.softplus(z) - self.y * z) * self.Mn  # log(1+e^z) - y z
        f = loss.sum(-1) + 0.5 * self.lam * (W[..., :-1] ** 2).sum(-1)
        if not grad:
            return f, None
        r = (torch.sigmoid(z) - self.y) * self.Mn  # [L, P, n]
        g = torch.empty_like(W)
        g[..., :-1] = torch.bmm(r, self.X) + self.lam[..., None] * W[..., :-1]
        g[..., -1] = r.sum(-1)
        return f, g


def lbfgs(problems: _Problems, W: torch.Tensor, max_iter: int, tol: float, history: int = 10) -> torch.Tensor:
    """Batched L-BFGS with per-problem Armijo backtracking; converged problems stop moving."""
    f, g = problems.loss_grad(W)
    S, Y, R = [], [], []
    stalled = torch.zeros_like(f, dtype=torch.bool)  # no step decreases the loss (float32 rounding): done
    for _ in range(max_iter):
        active = (g.abs().amax(-1) > tol) & ~stalled  # [L, P]
        if not bool(active.any()):
            break
        q = g.clone()
        alphas = []
        for s, y_, rho in zip(reversed(S), reversed(Y), reversed(R), strict=True):
            a = rho * (s * q).sum(-1)
            alphas.append(a)
            q -= a[..., None] * y_
        if S:
            gamma = (S[-1] * Y[-1]).sum(-1) / (Y[-1] * Y[-1]).sum(-1).clamp_min(1e-20)
            q *= gamma[..., None]
        for (s, y_, rho), a in zip(zip(S, Y, R, strict=True), reversed(alphas), strict=True):
            b = rho * (y_ * q).sum(-1)
            q += (a - b)[..., None] * s
        d = -q * active[..., None]
        slope = (g * d).sum(-1)
        bad = slope >= 0  # not a descent direction: fall back to steepest descent
        if bool(bad.any()):
            d = torch.where(bad[..., None], -g * active[..., None], d)
            slope = (g * d).sum(-1)
        t = torch.ones_like(f)
        if not S:
            t = torch.minimum(t, 1.0 / g.abs().amax(-1).clamp_min(1e-12))
        for _try in range(12):
            f_new, _ = problems.loss_grad(W + t[..., None] * d, grad=False)
            ok = (f_new <= f + 1e-4 * t * slope) | ~active
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t * 0.5)
        stalled |= ~ok
        t = torch.where(ok, t, torch.zeros_like(t))
        W_new = W + t[..., None] * d
        f_new, g_new = problems.loss_grad(W_new)
        s, y_ = W_new - W, g_new - g
        sy = (s * y_).sum(-1)
        keep = sy > 1e-12
        rho = torch.where(keep, 1.0 / sy.clamp_min(1e-12), torch.zeros_like(sy))
        S.append(s * keep[..., None])
        Y.append(y_ * keep[..., None])
        R.append(rho)
        if len(S) > history:
            S.pop(0), Y.pop(0), R.pop(0)
        W, f, g = W_new, f_new, g_new
    return W


def _standardise(X: torch.Tensor, train: np.ndarray) -> torch.Tensor:
    mu = X[:, train].mean(1, keepdim=True)
    sd = X[:, train].std(1, keepdim=True).clamp_min(1e-6)
    return (X - mu) / sd


def _metrics(z: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Accuracy, F1 and ROC AUC per layer; z [L, n] logits, y [n] 0/1."""
    pred = (z > 0).float()
    acc = (pred == y).float().mean(-1)
    tp = (pred * y).sum(-1)
    f1 = 2 * tp / (pred.sum(-1) + y.sum(-1)).clamp_min(1)
    ranks = z.argsort(-1).argsort(-1).float() + 1  # ties are rare with continuous logits
    n_pos, n_neg = y.sum(), (1 - y).sum()
    auc = ((ranks * y).sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {"accuracy": acc.numpy(), "f1": f1.numpy(), "auc": auc.numpy()}


def fit_probes(features: torch.Tensor, labels, cfg: ProbeConfig = ProbeConfig()) -> ProbeCurves:
    """Probe every layer of `features` [L, n, d] for binary `labels` [n] (see the module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    check_task_size(labels, cfg.folds, cfg.test_fraction)
    X_all = features.to(torch.float32)
    L = X_all.shape[0]
    out = {k: [] for k in ("accuracy", "f1", "auc")}
    best_c = []
    for seed in cfg.seeds:
        rng = np.random.default_rng(seed)
        train, test = _stratified_split(labels, cfg.test_fraction, rng)
        X = _standardise(X_all, train)
        ytr = torch.as_tensor(labels[train], dtype=torch.float32)
        fold = _stratified_folds(labels[train], cfg.folds, rng)
        M = torch.as_tensor(np.stack([fold != f for f in range(cfg.folds)]), dtype=torch.float32)  # train rows
        Xtr = X[:, train]
        W = torch.zeros(L, cfg.folds, X.shape[2] + 1)
        cv = np.zeros((len(cfg.Cs), L))
        for ci, C in enumerate(sorted(cfg.Cs)):
            lam = (1.0 / (C * M.sum(1)))[None, :].expand(L, -1)
            W = lbfgs(_Problems(Xtr, ytr, M, lam), W, cfg.max_iter, cfg.tol)
            z = torch.bmm(W[..., :-1], Xtr.transpose(1, 2)) + W[..., -1:]  # [L, F, n]
            correct = ((z > 0).float() == ytr).float()
            val = 1 - M  # [F, n]
            cv[ci] = ((correct * val).sum(-1) / val.sum(-1)).mean(-1).numpy()
        Cs = np.array(sorted(cfg.Cs))
        best = Cs[cv.argmax(0)]  # first max = smallest C on ties
        ones = torch.ones(1, len(train))
        lam = torch.as_tensor(1.0 / (best * len(train)), dtype=torch.float32)[:, None]
        W0 = W.mean(1, keepdim=True)
        Wf = lbfgs(_Problems(Xtr, ytr, ones, lam), W0, cfg.max_iter, cfg.tol)[:, 0]
        z = torch.einsum("lnd,ld->ln", X[:, test], Wf[:, :-1]) + Wf[:, -1:]
        m = _metrics(z, torch.as_tensor(labels[test], dtype=torch.float32))
        for k in out:
            out[k].append(m[k])
        best_c.append(best)
    return ProbeCurves({k: np.stack(v) for k, v in out.items()}, np.stack(best_c), asdict(cfg))


def sklearn_reference(features, labels, cfg: ProbeConfig = ProbeConfig()) -> ProbeCurves:
    """The same protocol as `fit_probes`, one scikit-learn LogisticRegression per layer, fold and C."""
    from sklearn.linear_model import LogisticRegression  # optional: scikit-learn (the dev extra), the reference twin
    from sklearn.metrics import f1_score, roc_auc_score  # optional: scikit-learn (the dev extra), the reference twin

    labels = np.asarray(labels, dtype=np.int64)
    check_task_size(labels, cfg.folds, cfg.test_fraction)
    F = np.asarray(features, dtype=np.float64)
    out = {k: [] for k in ("accuracy", "f1", "auc")}
    best_c = []
    Cs = sorted(cfg.Cs)
    for seed in cfg.seeds:
        rng = np.random.default_rng(seed)
        train, test = _stratified_split(labels, cfg.test_fraction, rng)
        fold = _stratified_folds(labels[train], cfg.folds, rng)
        row = {k: [] for k in out}
        bests = []
        for layer in range(F.shape[0]):
            X = F[layer]
            mu, sd = X[train].mean(0), np.maximum(X[train].std(0, ddof=1), 1e-6)
            X = (X - mu) / sd
            Xtr, ytr = X[train], labels[train]
            scores = []
            for C in Cs:
                acc = []
                for f in range(cfg.folds):
                    m = LogisticRegression(C=C, max_iter=1000).fit(Xtr[fold != f], ytr[fold != f])
                    acc.append(m.score(Xtr[fold == f], ytr[fold == f]))
                scores.append(np.mean(acc))
            C = Cs[int(np.argmax(scores))]
            m = LogisticRegression(C=C, max_iter=1000).fit(Xtr, ytr)
            z = m.decision_function(X[test])
            yt = labels[test]
            row["accuracy"].append(float(((z > 0) == yt).mean()))
            row["f1"].append(float(f1_score(yt, z > 0)))
            row["auc"].append(float(roc_auc_score(yt, z)))
            bests.append(C)
        for k in out:
            out[k].append(np.array(row[k]))
        best_c.append(np.array(bests))
    return ProbeCurves({k: np.stack(v) for k, v in out.items()}, np.stack(best_c), asdict(cfg))
