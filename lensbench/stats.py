"""Small statistics shared by analyses and reports."""
from __future__ import annotations

import numpy as np
import pandas as pd


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); NaN pairs are left out, NaN if < 3 remain
    or a side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = ~(np.isnan(a) | np.isnan(b))
    if ok.sum() < 3:
        return float("nan")
    ra, rb = pd.Series(a[ok]).rank().to_numpy(), pd.Series(b[ok]).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


# 97.5% quantiles of Student's t by degrees of freedom; between entries the smaller df is used (wider interval)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    return _T975[max(k for k in _T975 if k <= df)] if df >= 1 else float("nan")


def ci95_halfwidth(values, axis: int = 0):
    """Half-width of the 95% t-interval of the mean along `axis` (0 with fewer than two values)."""
    v = np.asarray(values, dtype=float)
    n = v.shape[axis]
    if n < 2:
        return np.zeros(np.delete(v.shape, axis)) if v.ndim > 1 else 0.0
    return t975(n - 1) * v.std(axis, ddof=1) / np.sqrt(n)
