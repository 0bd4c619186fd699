"""An out-of-distribution guard: how far an image's pooled features lie from the training data.

A classifier answers for any input, a CT slice given to a chest X-ray model included; a served
model meets such inputs daily. ``MahalanobisDetector`` (Lee et al. 2018, on one pooled feature
layer, one Gaussian for all classes) scores each image by the Mahalanobis distance of its
backbone features to the training features, and flags the images farther than a threshold: a
high percentile of the validation images' distances (validation chooses, never test). The
covariance is Ledoit-Wolf shrunk, since the feature dimension (1280 for MobileNetV2) can exceed
the number of training images.

A DICOM carries what it shows in its tags: an image whose Modality or BodyPartExamined is not
among the training DICOMs' is flagged as well (``dicom_kind``, ``tag_mismatch``). Only those
two tags are read and kept; nothing that could identify a patient.

The fitted detector is ``ood.npz`` in the model folder, read back as untrusted input.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import DataReadError, MedtlError

OOD_FILE = "ood.npz"
MAX_DIM = 1 << 14          # feature dimensions a detector may hold (the whitener is dim x dim)
MAX_TAGS = 64              # distinct Modality / BodyPartExamined values recorded
MAX_TAG_LEN = 64           # characters of one (DICOM CS values are at most 16)
MAX_FIT_TRAIN = 5_000      # training images whose features fit the detector (seeded subsample)
FITTED_ON = ("val", "train")
_KEYS = {"location", "whitener", "threshold", "percentile", "n_fit", "n_threshold",
         "fitted_on", "modalities", "body_parts"}


def check_is_fitted(detector: MahalanobisDetector, attribute: str) -> None:
    """scikit-learn's NotFittedError when ``attribute`` is not learned yet (scikit-learn is
    imported only then: a bundle loads this module without it)."""
    if not hasattr(detector, attribute):
        from sklearn.exceptions import NotFittedError

        raise NotFittedError(f"This {type(detector).__name__} instance is not fitted yet; "
                             "call 'fit' first")


class MahalanobisDetector:
    """Mahalanobis distance of features to the training features, thresholded on validation.

    Parameters: ``percentile`` of the validation distances that becomes the threshold.
    Learned: ``location_`` (dim,), ``whitener_`` (dim, dim) with ``||(f - location_) @
    whitener_||`` the Mahalanobis distance, ``threshold_``, ``n_fit_`` (training images),
    ``n_threshold_`` (images the threshold is the percentile of), ``fitted_on_`` ("val", or
    "train" when no validation features were given), ``modalities_`` and ``body_parts_`` (the
    training DICOMs' tags; empty when training saw no DICOM).
    """

    def __init__(self, percentile: float = 99.0) -> None:
        self.percentile = percentile

    # scikit-learn's parameter protocol, without importing scikit-learn where a bundle loads
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"percentile": self.percentile}

    def set_params(self, **params: Any) -> MahalanobisDetector:
        for name, value in params.items():
            if name not in self.get_params():
                raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(percentile={self.percentile!r})"

    def fit(self, train_features: np.ndarray, val_features: np.ndarray | None = None, *,
            modalities: Iterable[str] = (), body_parts: Iterable[str] = ()
            ) -> MahalanobisDetector:
        from scipy.linalg import solve_triangular
        from sklearn.covariance import LedoitWolf

        if not 0 < float(self.percentile) <= 100:
            raise MedtlError(f"ood percentile {self.percentile!r}: not in (0, 100]")
        train = _finite_rows(train_features, "training")
        if len(train) < 2:
            raise MedtlError("the OOD detector needs at least 2 training images with features")
        cov = LedoitWolf().fit(train)
        self.location_ = cov.location_.astype(np.float32)
        # covariance = C C^T (C lower) -> (f - mu) @ inv(C)^T has the identity covariance.
        chol = np.linalg.cholesky(cov.covariance_ + 1e-10 * np.eye(train.shape[1]))
        self.whitener_ = solve_triangular(chol, np.eye(len(chol)), lower=True).T.astype(
            np.float32)
        val = None if val_features is None else _finite_rows(val_features, "validation")
        chosen = val if val is not None and len(val) else train
        self.fitted_on_ = "val" if chosen is val else "train"
        self.threshold_ = float(np.percentile(self.score(chosen), float(self.percentile)))
        self.n_fit_, self.n_threshold_ = len(train), len(chosen)
        self.modalities_ = _tag_set(modalities)
        self.body_parts_ = _tag_set(body_parts)
        return self

    @property
    def dim(self) -> int:
        check_is_fitted(self, "whitener_")
        return int(self.whitener_.shape[0])

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distances (N,) of feature rows; NaN for a row that is not finite (an
        image skipped as unreadable)."""
        check_is_fitted(self, "whitener_")
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise MedtlError(f"OOD scoring: features of shape {x.shape}, not (N, {self.dim})")
        out = np.full(len(x), np.nan)
        ok = np.isfinite(x).all(axis=1)
        z = (x[ok] - self.location_) @ self.whitener_.astype(np.float64)
        out[ok] = np.sqrt(np.einsum("ij,ij->i", z, z))
        return out

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """Whether each distance is beyond the threshold (False for NaN: no image to judge)."""
        check_is_fitted(self, "threshold_")
        s = np.asarray(scores, dtype=np.float64)
        return np.isfinite(s) & (s > self.threshold_)

    def record(self) -> dict[str, Any]:
        """What a deployment shows of the detector (preprocessing.json's ``ood``)."""
        check_is_fitted(self, "threshold_")
        return {"method": "mahalanobis", "threshold": self.threshold_,
                "percentile": float(self.percentile), "fitted_on": self.fitted_on_,
                "n_threshold": self.n_threshold_, "modalities": list(self.modalities_),
                "body_parts": list(self.body_parts_)}

    # ---------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike[str]) -> Path:
        from medtl.files import atomic_path

        check_is_fitted(self, "whitener_")
        path = Path(directory) / OOD_FILE
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, location=self.location_, whitener=self.whitener_,
                     threshold=np.float64(self.threshold_),
                     percentile=np.float64(self.percentile), n_fit=np.int64(self.n_fit_),
                     n_threshold=np.int64(self.n_threshold_),
                     fitted_on=np.str_(self.fitted_on_),
                     modalities=np.asarray(self.modalities_, dtype=f"<U{MAX_TAG_LEN}"),
                     body_parts=np.asarray(self.body_parts_, dtype=f"<U{MAX_TAG_LEN}"))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str], dim: int) -> MahalanobisDetector | None:
        """The detector of a model folder, or None when it has none (a run saved before the
        guard existed). ``ood.npz`` is untrusted: its members, shapes (``dim`` features),
        sizes and values are checked before use; any problem is one MedtlError naming it."""
        path = Path(directory) / OOD_FILE
        if not path.exists() and not path.is_symlink():
            return None
        try:
            return cls._read(path, dim)
        except MedtlError as exc:
            raise MedtlError(f"{path}: {exc}; refused") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise MedtlError(f"{path}: not a medtl OOD detector ({type(exc).__name__}); "
                             "refused") from None

    @classmethod
    def _read(cls, path: Path, dim: int) -> MahalanobisDetector:
        if path.is_symlink() or not path.is_file():
            raise MedtlError("not a regular file")
        if not 1 <= dim <= MAX_DIM:
            raise MedtlError(f"a detector of {dim} features is not supported")
        # Each member's size is bounded before it is read: no member larger than the arrays
        # a detector of ``dim`` features holds (a crafted file cannot make numpy allocate more).
        limit = 4 * dim * dim + 4096 + MAX_TAGS * MAX_TAG_LEN * 4
        with zipfile.ZipFile(path) as zf:
            members = {Path(i.filename).stem: i.file_size for i in zf.infolist()}
        if set(members) != _KEYS or max(members.values()) > limit:
            raise MedtlError("members or sizes are not those of a detector")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _KEYS}
        det = cls(percentile=_number(arrays["percentile"], "percentile", 0, 100))
        det.location_ = _matrix(arrays["location"], (dim,), "location")
        det.whitener_ = _matrix(arrays["whitener"], (dim, dim), "whitener")
        det.threshold_ = _number(arrays["threshold"], "threshold", 0, 1e12)
        det.n_fit_ = int(_number(arrays["n_fit"], "n_fit", 2, 1e9))
        det.n_threshold_ = int(_number(arrays["n_threshold"], "n_threshold", 1, 1e9))
        fitted_on = arrays["fitted_on"]
        if fitted_on.shape != () or str(fitted_on) not in FITTED_ON:
            raise MedtlError("fitted_on is not 'val' or 'train'")
        det.fitted_on_ = str(fitted_on)
        det.modalities_ = _stored_tags(arrays["modalities"], "modalities")
        det.body_parts_ = _stored_tags(arrays["body_parts"], "body_parts")
        return det


def _finite_rows(features: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or not 1 <= x.shape[1] <= MAX_DIM:
        raise MedtlError(f"{what} features of shape {x.shape}: not (N, dim <= {MAX_DIM})")
    return x[np.isfinite(x).all(axis=1)]


def _number(a: np.ndarray, what: str, lo: float, hi: float) -> float:
    if a.shape != () or a.dtype.kind not in "fiu" or not np.isfinite(a) or not lo <= a <= hi:
        raise MedtlError(f"{what} is not a number in [{lo}, {hi}]")
    return float(a)


def _matrix(a: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    if a.shape != shape or a.dtype != np.float32 or not np.isfinite(a).all():
        raise MedtlError(f"{what} is not finite float32 of shape {shape}")
    return a


def _stored_tags(a: np.ndarray, what: str) -> list[str]:
    if a.ndim != 1 or a.dtype.kind != "U" or len(a) > MAX_TAGS:
        raise MedtlError(f"{what} is not a list of at most {MAX_TAGS} strings")
    return _tag_set(a.tolist(), what)


def _tag_set(values: Iterable[str], what: str = "DICOM tag") -> list[str]:
    """Sorted distinct tag values, each a short printable line (as DICOM CS values are)."""
    out = sorted({str(v).strip().upper() for v in values if v is not None and str(v).strip()})
    if len(out) > MAX_TAGS or any(len(v) > MAX_TAG_LEN or not v.isprintable() for v in out):
        raise MedtlError(f"{what}: more than {MAX_TAGS} values or a value that is not a short "
                         "printable line")
    return out


# ------------------------------------------------------------------------------ DICOM tags
def dicom_kind(path: str | os.PathLike[str]) -> tuple[str | None, str | None] | None:
    """(Modality, BodyPartExamined) of a DICOM file, or of a DICOM series folder's first file;
    None for anything else or a file whose tags cannot be read. Only these two tags are kept:
    nothing identifying leaves this function."""
    from medtl.data.dicom import dicom_tags
    from medtl.data.readers import DICOM_EXTENSIONS

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in DICOM_EXTENSIONS)
        if not files:
            return None
        p = files[0]
    elif p.suffix.lower() not in DICOM_EXTENSIONS:
        return None
    try:
        tags = dicom_tags(p)
    except (DataReadError, OSError):
        return None
    norm = [str(t).strip().upper() if t else None for t in (tags["modality"],
                                                             tags["body_part"])]
    return norm[0], norm[1]


def training_dicom_tags(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """The distinct Modality and BodyPartExamined values of the DICOMs among ``paths`` (each
    distinct file or series read once); two empty lists when none is a DICOM."""
    modalities: set[str] = set()
    body_parts: set[str] = set()
    for path in dict.fromkeys(paths):
        kind = dicom_kind(path)
        if kind is None:
            continue
        modalities.update([kind[0]] if kind[0] else [])
        body_parts.update([kind[1]] if kind[1] else [])
    return _tag_set(modalities, "Modality"), _tag_set(body_parts, "BodyPartExamined")


def tag_mismatch(kind: tuple[str | None, str | None] | None, modalities: Sequence[str],
                 body_parts: Sequence[str]) -> str | None:
    """Why an image's DICOM tags put it outside the training data, or None. A non-DICOM image,
    training without DICOM, or a tag the training DICOMs did not record is not judged."""
    if kind is None:
        return None
    modality, body_part = kind
    if modalities and modality and modality not in modalities:
        return f"DICOM Modality {modality} not among training's {', '.join(modalities)}"
    if body_parts and body_part and body_part not in body_parts:
        return (f"DICOM BodyPartExamined {body_part} not among training's "
                f"{', '.join(body_parts)}")
    return None


def ood_columns(scores: np.ndarray | None, threshold: float | None, paths: Sequence[str],
                modalities: Sequence[str] = (), body_parts: Sequence[str] = ()
                ) -> list[dict[str, Any]]:
    """The ``ood_score``, ``ood`` and ``ood_reason`` columns of prediction rows, one per path:
    flagged when the distance passes the threshold or a DICOM's tags differ from training's.
    ``scores`` None: no detector (a run saved before the guard), only the tags can flag."""
    kinds: dict[str, Any] = {}  # the slices of one series share its file
    out = []
    for i, path in enumerate(paths):
        s = None if scores is None or not np.isfinite(scores[i]) else float(scores[i])
        reasons = []
        if s is not None and threshold is not None and s > threshold:
            reasons.append(f"feature distance {s:.1f} > {threshold:.1f}")
        if path not in kinds:
            kinds[path] = dicom_kind(path)
        if why := tag_mismatch(kinds[path], modalities, body_parts):
            reasons.append(why)
        # Neither a distance nor a tag to judge by (no detector, unreadable image): unknown.
        flag = True if reasons else (None if s is None else False)
        out.append({"ood_score": s, "ood": flag, "ood_reason": "; ".join(reasons)})
    return out


__all__ = ["MahalanobisDetector", "OOD_FILE", "dicom_kind", "ood_columns", "tag_mismatch",
           "training_dicom_tags"]
