"""``TransferClassifier``: an ImageNet backbone transferred to a medical task, as a scikit-learn
estimator.

Its parameters are the fields of ``TrainOptions`` (``get_params``, ``set_params``, ``clone`` and
``repr`` come from scikit-learn); ``fit`` looks the strategy up in the registry and keeps what
it learned in attributes ending in ``_``: ``model_`` (the fitted model, ``medtl.transfer.fitted``),
``classes_``, ``history_``, ``stages_``, ``timing_``, ``balanced_``, ``skipped_``,
``align_`` (--align: the target it was aligned to), ``multilabel_`` (trained on multi-label
targets: ``predict_proba`` then gives each label's sigmoid, (n, K), rows not summing to 1).
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from medtl.errors import MedtlError
from medtl.training.options import TrainOptions
from medtl.transfer.fitted import FittedModel
from medtl.transfer.ood import MahalanobisDetector
from medtl.transfer.strategies import FitOutcome, Strategy, get_strategy

log = logging.getLogger("medtl")


class TransferClassifier(ClassifierMixin, BaseEstimator):
    """An ImageNet backbone transferred to a medical classification task.

    >>> clf = TransferClassifier(backbone="mobilenet_v2", strategy="hybrid", head="logreg")
    >>> clf.fit(ds.split("train"), val=ds.split("val")).predict_proba(ds.split("test"))

    Parameters: every field of :class:`medtl.training.options.TrainOptions`.
    """

    def __init__(self, backbone: str = "mobilenet_v2", **params: Any) -> None:
        # Parameters only, stored as given (scikit-learn's contract); checked in fit.
        params["backbone"] = backbone
        unknown = set(params) - set(TrainOptions.names())
        if unknown:
            raise TypeError(f"TransferClassifier got unexpected parameters {sorted(unknown)}")
        defaults = TrainOptions()
        for name in TrainOptions.names():
            setattr(self, name, params.get(name, getattr(defaults, name)))

    @property
    def options(self) -> TrainOptions:
        """The parameters as one typed object."""
        return TrainOptions(**self.get_params(deep=False))

    @classmethod
    def from_options(cls, options: TrainOptions) -> TransferClassifier:
        return cls(**options.to_dict())

    def make_strategy(self) -> Strategy:
        """The registry's strategy object for these parameters, checked (no data read)."""
        options = self.options
        options.check()
        strategy = get_strategy(options.strategy)(options)
        from medtl.models import get_spec

        get_spec(options.backbone)
        strategy.check()
        return strategy

    # ------------------------------------------------------------------------------ fitting
    def fit(self, train, val=None, *, checkpoint_dir: Path | None = None,
            resume: bool = False) -> TransferClassifier:
        """Train on ``train``; ``val`` chooses hyper-parameters and the early-stopping epoch.

        Trainable strategies checkpoint every epoch into ``checkpoint_dir`` when given, and
        ``resume`` continues from the last checkpoint there.
        """
        strategy = self.make_strategy()
        if val is None or len(val) == 0:
            raise MedtlError("a validation split is needed to choose the head; "
                             "load_dataset carves one from train when none exists")
        t0 = time.perf_counter()
        outcome: FitOutcome = strategy.fit(train, val, checkpoint_dir=checkpoint_dir,
                                           resume=resume)
        self.model_: FittedModel = outcome.model
        self.classes_ = list(outcome.model.classes)
        self.multilabel_ = outcome.model.multilabel
        self.history_ = outcome.history
        self.stages_ = outcome.stages
        self.balanced_ = outcome.balanced
        self.skipped_ = outcome.skipped
        self.head_params_ = outcome.head_params
        # The head the model ended with (auto may end with a hybrid head): config.json's.
        self.head_name_ = outcome.head_name
        # --align: what config.json records (and the target's content keys, ``_keys``)
        self.align_ = outcome.align
        self.timing_ = {"train_s": time.perf_counter() - t0 + outcome.resumed_s,
                        "resumed_s": outcome.resumed_s, "feature_s": outcome.feature_s}
        if self.calibrate and self.model_.multilabel:
            log.info("calibration: skipped, temperature scaling rescales one softmax and a "
                     "multi-label model's labels are independent sigmoids")
        elif self.calibrate:
            self._fit_temperature(val)
        self.model_.ood = fit_ood(self.model_, train, val, seed=self.seed)
        return self

    def _fit_temperature(self, val) -> None:
        """Temperature scaling on validation (Guo et al. 2017): fixes over-confidence, keeps
        every arg-max, so accuracy, AUC and the confusion matrix do not move."""
        from medtl.training.calibration import TemperatureScaler, logits_from_proba

        quiet, self.model_.options.quiet = self.model_.options.quiet, True
        proba = self.model_.predict_proba(val, calibrated=False)
        self.model_.options.quiet = quiet
        ok = np.isfinite(proba).all(axis=1)
        self.model_.temperature = TemperatureScaler().fit(logits_from_proba(proba[ok]),
                                                          val.labels[ok]).temperature_
        log.info("calibration: temperature %.3f fitted on %d validation images",
                 self.model_.temperature, int(ok.sum()))

    # ------------------------------------------------------------------------------ predicting
    def predict_proba(self, data, *, calibrated: bool = True) -> np.ndarray:
        """(n, n_classes) probabilities; NaN rows for images skipped as unreadable.

        With ``calibrate=True`` at fit time they are temperature-scaled unless
        ``calibrated=False``.
        """
        check_is_fitted(self, "model_")
        return self.model_.predict_proba(data, calibrated=calibrated)

    def predict(self, data) -> np.ndarray:
        """Class indices (into ``classes_``) of the most probable class. Multi-label: (n, K)
        0/1 at 0.5 per label (the run's per-label thresholds, chosen on validation, are the
        evaluation's); rows of unreadable images are 0."""
        proba = self.predict_proba(data)
        if self.model_.multilabel:
            return (np.nan_to_num(proba, nan=0.0) >= 0.5).astype(np.int64)
        return np.nanargmax(proba, axis=1)

    # ------------------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write the fitted model's directory (``RUN/model/`` in a run): enough to predict.

        ``medtl.save_run(clf, out)`` writes a whole run directory around it.
        """
        check_is_fitted(self, "model_")
        return self.model_.save(directory)

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "auto", quiet: bool = False,
             skip_bad: bool = False, threads: int | None = None) -> TransferClassifier:
        """A fitted classifier from a model directory written by :meth:`save`."""
        model = FittedModel.load(directory, device=device, quiet=quiet, skip_bad=skip_bad,
                                 threads=threads)
        clf = cls.from_options(model.options)
        clf.model_ = model
        clf.classes_ = list(model.classes)
        clf.multilabel_ = model.multilabel
        return clf


def fit_ood(model: FittedModel, train, val=None, *, seed: int = 0,
            max_train: int | None = None) -> MahalanobisDetector | None:
    """The out-of-distribution detector of a fitted model: Mahalanobis distance on its own
    backbone's pooled features of ``train`` (a seeded subsample of at most ``max_train``
    images), thresholded at a percentile of ``val``'s distances (of train's when no val), and
    the training DICOMs' Modality and BodyPartExamined. None, with a warning, when the features
    cannot give one (fewer than two readable training images)."""
    from medtl.transfer.ood import MAX_FIT_TRAIN, MahalanobisDetector, training_dicom_tags

    limit = MAX_FIT_TRAIN if max_train is None else max_train
    if len(train) > limit:
        rng = np.random.default_rng(seed)
        train = train.subset(np.sort(rng.choice(len(train), limit, replace=False)))
    # The detector reads the plain image's features (so does scoring, TTA or not): with TTA
    # off here, the views' forward passes over 5,000 training images are not paid for nothing.
    opts = model.options
    quiet, tta = opts.quiet, getattr(opts, "tta", "none")
    opts.quiet, opts.tta = True, "none"
    try:
        f_train = model.features_and_proba(train, calibrated=False)[0]
        f_val = (model.features_and_proba(val, calibrated=False)[0]
                 if val is not None and len(val) else None)
    finally:
        opts.quiet, opts.tta = quiet, tta
    modalities, body_parts = training_dicom_tags(train.paths)
    try:
        detector = MahalanobisDetector().fit(f_train, f_val, modalities=modalities,
                                             body_parts=body_parts)
    except MedtlError as exc:
        log.warning("no out-of-distribution guard for this model: %s", exc)
        return None
    log.info("out-of-distribution guard: Mahalanobis threshold %.2f (%gth percentile of %d "
             "%s images)", detector.threshold_, detector.percentile, detector.n_threshold_,
             detector.fitted_on_)
    return detector


def _signature() -> inspect.Signature:
    """``__init__``'s signature from TrainOptions, so scikit-learn sees every parameter."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in TrainOptions.__dataclass_fields__.values():
        kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name == "backbone"
                else inspect.Parameter.KEYWORD_ONLY)
        params.append(inspect.Parameter(f.name, kind, default=f.default))
    return inspect.Signature(params)


TransferClassifier.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
