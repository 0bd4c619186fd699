"""Feature alignment at training time with unlabelled target images: Deep CORAL.

Sun, B. & Saenko, K. (2016). Deep CORAL: Correlation Alignment for Deep Domain Adaptation.
ECCV 2016 Workshops, LNCS 9915, 443-450. https://arxiv.org/abs/1607.01719

The CORAL loss between a batch of source features ``D_S`` (n_S, d) and target features ``D_T``
(n_T, d) is the squared Frobenius distance between their covariance matrices, scaled by
``1 / (4 d^2)`` (the paper's eq. 1):

    l_CORAL = || C_S - C_T ||_F^2 / (4 d^2),
    C = (D^T D - (1^T D)^T (1^T D) / n) / (n - 1),

computed here on centred features (the same matrix, in fewer rounding steps). It is added to the
classification loss with a weight (``--align-weight``, default 1; the paper chooses it "so that
at the end of training the classification loss and the CORAL loss are roughly the same", which
each run's history.csv shows as ``train_loss`` and ``train_coral``). Written for medtl: no
maintained PyPI package provides it for torch as a plain function.

The training loop (medtl.training.loop, ``Unlabelled``) pairs every training batch with a
batch of target images, passes both through the network as it predicts (eval mode: BatchNorm's
running statistics, no dropout) and adds ``weight * coral_loss(source features, target
features)``; the features are the pooled backbone output that the classifier sees.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from medtl.errors import MedtlError, check_choice
from medtl.training.loop import Unlabelled
from medtl.training.options import ALIGN_CHOICES


def covariance(features: torch.Tensor) -> torch.Tensor:
    """(d, d) unbiased covariance of (n, d) features, n >= 2."""
    centred = features - features.mean(dim=0, keepdim=True)
    return centred.T @ centred / (features.shape[0] - 1)


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sun & Saenko's CORAL loss ``||C_S - C_T||_F^2 / (4 d^2)`` of (n_S, d) and (n_T, d)
    features (float32). Zero, and no gradient, where either batch has fewer than two samples
    (a covariance needs two): a last batch of one image adds nothing."""
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise MedtlError(f"CORAL needs (n, d) features of the same d; got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    if len(source) < 2 or len(target) < 2:
        return source.new_zeros(())
    d = source.shape[1]
    diff = covariance(source.float()) - covariance(target.float())
    return (diff * diff).sum() / (4.0 * d * d)


# --align METHOD (training.options.ALIGN_CHOICES but none) -> the loss term on
# (source features, target features)
ALIGN_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "coral": coral_loss,
}


def unlabelled_term(method: str, x, weight: float) -> Unlabelled:
    """The loop's unlabelled-loss term of ``--align METHOD`` on target samples ``x`` (stored
    like the training samples: decoded uint8 images, or kept frozen-block outputs)."""
    check_choice("--align", method, [m for m in ALIGN_CHOICES if m != "none"])
    return Unlabelled(x=x, term=ALIGN_METHODS[method], weight=float(weight), name=method)
