"""The one calibration-KL evaluator every search uses: mean KL(p_dense || q) per token on calibration text.

The dense model runs once per calibration batch (`replay.DenseRun`); each candidate is then scored with the
unchanged prefix replayed, so only the layers it changes are recomputed. A candidate is either a set of removed
units, or the model as it is now changed in place from some layer on (e.g. weights quantised in a context).
Every search scores on all batches (`runs=None`) or on a minibatch (a list of runs), as EvoPress's multi-step
selection does.
"""
from __future__ import annotations

from typing import Sequence

from .capture import batches
from .errors import LensbenchError
from .model import Model
from .replay import DenseRun, change_scores, removal_scores
from .units import Unit


class CalibrationKL:
    """Mean KL per token to the dense model on `texts`; counts the tokens it forwarded (`n_tokens`)."""

    def __init__(self, model: Model, texts: Sequence[str], batch_size: int = 4, seq_len: int = 128):
        if not texts:
            raise LensbenchError("scoring against the dense model needs calibration texts")
        self.model = model
        self.runs = [DenseRun.from_batch(model, b) for b in batches(model, list(texts), batch_size, seq_len)]
        self.n_tokens = 0

    def _mean(self, score, runs) -> float:
        total, n = 0.0, 0
        for run in self.runs if runs is None else runs:
            kl, _ = score(run)
            total += float(kl.sum())
            n += run.n_tokens
        self.n_tokens += n
        return total / n

    def removed(self, units: Sequence[Unit], runs: Sequence[DenseRun] | None = None) -> float:
        """KL with `units` removed (at most one per layer, as `normalise` returns them)."""
        units = list(units)
        return self._mean(lambda run: removal_scores(self.model, run, units), runs)

    def changed(self, first: int, runs: Sequence[DenseRun] | None = None) -> float:
        """KL of the model as it is now, changed in place from layer `first` on."""
        return self._mean(lambda run: change_scores(self.model, run, first), runs)
