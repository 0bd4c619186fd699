"""Temperature scaling (Guo et al., 2017), fitted on validation when a run is trained with
``--calibrate``; evaluation.stats re-exports it."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import optimize, special

from medtl.errors import MedtlError


def logits_from_proba(proba: Any) -> np.ndarray:
    """Log-probabilities, usable as logits: softmax ignores a constant added to a row."""
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-12, 1.0))


class TemperatureScaler:
    """Temperature scaling (Guo et al., 2017): ``softmax(logits / T)`` with T fitted by NLL.

    One parameter, so it keeps the arg-max (and accuracy) and needs little held-out data.
    """

    # log T is searched in this range; T outside [0.01, 100] means something else is wrong.
    log_bounds = (np.log(1e-2), np.log(1e2))

    def __init__(self) -> None:
        self.temperature_: float | None = None

    def fit(self, logits: Any, y: Any) -> TemperatureScaler:
        """Learn ``temperature_`` minimising the negative log-likelihood of ``y``."""
        z, labels = self._check(logits, y)

        def nll(log_t: float) -> float:
            logp = special.log_softmax(z / np.exp(log_t), axis=1)
            return float(-np.mean(logp[np.arange(len(labels)), labels]))

        res = optimize.minimize_scalar(
            nll, bounds=self.log_bounds, method="bounded", options={"xatol": 1e-6}
        )
        self.temperature_ = float(np.exp(res.x))
        return self

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature_)``."""
        if self.temperature_ is None:
            raise MedtlError("TemperatureScaler is not fitted; call fit first")
        z, _ = self._check(logits, None)
        return special.softmax(z / self.temperature_, axis=1)

    @staticmethod
    def _check(logits: Any, y: Any) -> tuple[np.ndarray, np.ndarray | None]:
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] < 2:
            raise MedtlError("logits must be 2-D (n_images, n_classes) with at least two classes")
        if not np.all(np.isfinite(z)):
            raise MedtlError("logits contain NaN or infinite values")
        if y is None:
            return z, None
        labels = np.asarray(y)
        if labels.ndim != 1 or len(labels) != len(z):
            raise MedtlError(f"{len(labels)} labels for {len(z)} rows of logits")
        return z, labels.astype(np.int64)
