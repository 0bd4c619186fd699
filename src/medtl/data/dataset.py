"""The Dataset: labelled image records with splits and patients, and how to read them."""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtl.data.readers import DICOM_EXTENSIONS, read_image, to_rgb_uint8
from medtl.errors import DataReadError, MedtlError
from medtl.files import atomic_open

SPLIT_ORDER: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class View:
    """How stored pixels become 2-D images: the DICOM/CT window, and for volumes which slices
    and how (``2d``: one slice; ``2.5d``: slices k-1, k, k+1 as channels; ``mip``)."""

    window: str = "auto"
    slices: str = "middle"
    mode: str = "2d"

    def to_dict(self) -> dict[str, str]:
        return {"window": self.window, "slices": self.slices, "mode": self.mode}


@dataclass(frozen=True)
class Record:
    """One labelled image: an image file, an image stored in an .npz, or a view of a volume.

    Attributes:
        path: the absolute path of the file that holds the image: the image file, the .npz
            archive, or the volume (a NIfTI file or a DICOM series folder).
        label: index into the dataset's classes.
        split: ``train``, ``val``, ``test`` (or another name), ``None`` before one is assigned.
        patient_id: the patient, when known; the slices of a volume share one.
        key, index: for an image in an .npz, the array it is stored in (the split it came from
            in the MedMNIST layout, which stays the same when the record is moved to a carved
            ``val``) and its position in that array.
        slice: for a volume shown slice by slice (``2d``, ``2.5d``), the slice shown, counted
            along the volume's third axis as :func:`medtl.data.volumes.read_volume` returns it.
        mip: the record is its volume's maximum intensity projection (``mip`` mode): one image
            per volume, so no slice.
        burned_in: a DICOM file (or a file of a DICOM series) says BurnedInAnnotation YES: its
            pixels may show identifying text, so reports show no image of it.
        targets: multi-label records only: one value per label of the dataset, 1.0 (present),
            0.0 (absent) or NaN (unknown, or uncertain under ``--uncertain ignore``: masked out
            of the loss and the metrics). ``label`` is then 0 and means nothing.
    """

    path: str
    label: int
    split: str | None
    patient_id: str | None = None
    key: str | None = None
    index: int | None = None
    slice: int | None = None
    mip: bool = False
    burned_in: bool = False
    targets: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if (self.key is None) != (self.index is None):
            raise ValueError(f"{self.path}: an array member needs both key and index")
        if self.key is not None and self.is_volume:
            raise ValueError(f"{self.path}: a record is an array member or a volume, not both")
        if self.slice is not None and self.mip:
            raise ValueError(f"{self.path}: a MIP shows the whole volume, not slice {self.slice}")

    @property
    def is_volume(self) -> bool:
        """Whether the record is a slice or the MIP of a volume."""
        return self.slice is not None or self.mip

    @property
    def volume(self) -> str | None:
        """The volume the record shows (slices of one volume share it), ``None`` otherwise."""
        return self.path if self.is_volume else None

    @property
    def uid(self) -> str:
        """One string per record, unique within a dataset and stable across runs: the path, or
        ``<path>::<key>/<index>``, ``<path>::slice/<k>``, ``<path>::mip``.

        This is the string medtl 0.1 kept in ``path``, so keys derived from it stay valid. It is
        an identity to compare and hash, never to parse: the fields above say where the image is.
        """
        if self.key is not None:
            return f"{self.path}::{self.key}/{self.index}"
        if self.slice is not None:
            return f"{self.path}::slice/{self.slice}"
        if self.mip:
            return f"{self.path}::mip"
        return self.path

    def location(self) -> dict[str, str | int]:
        """The fields that place the record inside its file: ``{"slice": k}``,
        ``{"key": ..., "index": i}``, or ``{}`` for an image file or a MIP."""
        if self.key is not None:
            return {"key": self.key, "index": int(self.index)}  # type: ignore[arg-type]
        if self.slice is not None:
            return {"slice": self.slice}
        return {}


class Dataset:
    """Records, the class names their labels index, and the arrays of an .npz source.

    A multi-label dataset (``multilabel``) names its labels in ``classes``; each record holds
    one target per label (:attr:`Record.targets`) and :attr:`labels` is an ``(n, K)`` float
    matrix with NaN where a label is unknown, scikit-learn's indicator layout plus a mask.

    Subsets made by :meth:`split`, :meth:`subset` and :meth:`drop` share the arrays and the
    content-hash cache of the dataset they came from, so nothing is loaded or hashed twice.
    """

    def __init__(
        self,
        records: Iterable[Record],
        classes: Sequence[str],
        source: str = "",
        *,
        skipped: Iterable[tuple[str, str]] = (),
        arrays: dict[tuple[str, str], np.ndarray] | None = None,
        view: View | None = None,
        multilabel: bool | None = None,
        _key_cache: dict[str, str] | None = None,
        _volumes: _VolumeCache | None = None,
    ) -> None:
        self.records: list[Record] = list(records)
        self.classes: list[str] = list(classes)
        self.source: str = str(source)
        self.skipped: list[tuple[str, str]] = list(skipped)
        # The images of an .npz source, keyed by (record.path, record.key).
        self._arrays: dict[tuple[str, str], np.ndarray] = arrays if arrays is not None else {}
        self._key_cache: dict[str, str] = _key_cache if _key_cache is not None else {}
        self.view: View = view or View()
        self._volumes = _volumes if _volumes is not None else _VolumeCache(self.view)
        n_classes = len(self.classes)
        with_targets = sum(r.targets is not None for r in self.records)
        self.multilabel: bool = bool(with_targets) if multilabel is None else multilabel
        if with_targets not in (0, len(self.records)) or (with_targets and not self.multilabel):
            raise ValueError(f"{self.source}: some records have multi-label targets and some "
                             "do not")
        for r in self.records:
            if self.multilabel:
                if r.targets is not None and len(r.targets) != n_classes:
                    raise ValueError(f"{r.uid}: {len(r.targets)} targets for the "
                                     f"{n_classes} labels {self.classes}")
                continue
            if not 0 <= r.label < n_classes:
                raise ValueError(f"{r.uid}: label {r.label} is not an index into {self.classes}")

    # ---- structure ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={n}" for s, n in self._split_sizes().items())
        return f"Dataset({self.source!r}, n={len(self)}, classes={self.classes}, {sizes})"

    def _split_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for name in self.split_names():
            sizes[name] = sum(1 for r in self.records if r.split == name)
        return sizes

    def _derive(self, records: Iterable[Record]) -> Dataset:
        return Dataset(
            records,
            self.classes,
            self.source,
            skipped=self.skipped,
            arrays=self._arrays,
            view=self.view,
            multilabel=self.multilabel,
            _key_cache=self._key_cache,
            _volumes=self._volumes,
        )

    def split(self, name: str) -> Dataset:
        """The records of split ``name``, with the same classes; empty is a :class:`MedtlError`."""
        chosen = [r for r in self.records if r.split == name]
        if not chosen:
            available = ", ".join(self.split_names()) or "none"
            raise MedtlError(
                f"{self.source}: split '{name}' is empty or missing (splits here: {available})"
            )
        return self._derive(chosen)

    def with_splits(self, splits: Sequence[str]) -> Dataset:
        """The same records, each moved to the split given at its position."""
        from dataclasses import replace

        if len(splits) != len(self.records):
            raise ValueError(f"{len(splits)} split names for {len(self.records)} records")
        return self._derive(replace(r, split=s) for r, s in zip(self.records, splits,
                                                                    strict=True))

    def split_names(self) -> list[str]:
        """Splits that have records: train, val, test first, then any other name, sorted."""
        present = {r.split for r in self.records if r.split is not None}
        known = [s for s in SPLIT_ORDER if s in present]
        return known + sorted(present - set(SPLIT_ORDER))

    def subset(self, indices: Iterable[int]) -> Dataset:
        """The records at ``indices``, in that order."""
        return self._derive(self.records[int(i)] for i in indices)

    def drop(self, indices: Iterable[int]) -> Dataset:
        """All records except those at ``indices``."""
        gone = {int(i) for i in indices}
        return self._derive(r for i, r in enumerate(self.records) if i not in gone)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {class: n}}``, every class listed (with 0 where a split lacks it); for a
        multi-label dataset, the images where each label is present."""
        table: dict[str, dict[str, int]] = {
            s: dict.fromkeys(self.classes, 0) for s in self.split_names()
        }
        for r in self.records:
            if r.split is None:
                continue
            if r.targets is not None:
                for name, value in zip(self.classes, r.targets, strict=True):
                    table[r.split][name] += int(value == 1.0)
            else:
                table[r.split][self.classes[r.label]] += 1
        return table

    @property
    def labels(self) -> np.ndarray:
        """Class indices of the records, int64; multi-label: ``(n, K)`` float32 targets, 1, 0
        or NaN (unknown)."""
        if self.multilabel:
            if not self.records:
                return np.zeros((0, len(self.classes)), dtype=np.float32)
            return np.array([r.targets if r.targets is not None else
                             (np.nan,) * len(self.classes) for r in self.records],
                            dtype=np.float32).reshape(len(self), len(self.classes))
        return np.fromiter((r.label for r in self.records), dtype=np.int64, count=len(self))

    @property
    def patients(self) -> list[str | None]:
        return [r.patient_id for r in self.records]

    @property
    def paths(self) -> list[str]:
        """The file of each record (an .npz or a volume is shared by its images)."""
        return [r.path for r in self.records]

    @property
    def uids(self) -> list[str]:
        """:attr:`Record.uid` of each record: one distinct string per image."""
        return [r.uid for r in self.records]

    @property
    def volumes(self) -> list[str | None]:
        """The volume of each record (slices of one volume share it), ``None`` for images."""
        return [r.volume for r in self.records]

    # ---- content -----------------------------------------------------------------------------

    def _array_image(self, record: Record) -> np.ndarray:
        try:
            array = self._arrays[(record.path, record.key)]  # type: ignore[index]
        except KeyError:
            raise DataReadError(record.path, f"no array '{record.key}' loaded for this dataset"
                                ) from None
        return array[record.index]

    def read(self, i: int) -> np.ndarray:
        """Image ``i`` as ``(H, W, 3)`` uint8 RGB; a bad file raises :class:`DataReadError`."""
        record = self.records[i]
        if record.key is not None:
            return to_rgb_uint8(self._array_image(record))
        if record.is_volume:
            return self._volumes.image(record)
        if self.view.window != "auto" and Path(record.path).suffix.lower() in DICOM_EXTENSIONS:
            from medtl.data.dicom import read_dicom

            return read_dicom(record.path, window=self.view.window)
        return read_image(record.path)

    def content_key(self, i: int) -> str:
        """sha256 (hex) of image ``i``'s file bytes, or of an npz image's shape, dtype and bytes.

        Identical images get identical keys whatever their path, which is what feature caches
        and duplicate checks need. Memoised per :attr:`Record.uid`.
        """
        record = self.records[i]
        uid = record.uid
        cached = self._key_cache.get(uid)
        if cached is not None:
            return cached
        path = record.path
        if record.key is not None:
            image = np.ascontiguousarray(self._array_image(record))
            digest = hashlib.sha256(f"{image.shape}|{image.dtype.str}|".encode())
            digest.update(image.tobytes())
            key = digest.hexdigest()
        elif record.is_volume:
            # The same slice of the same volume content, shown the same way, is the same image.
            # The suffix "::slice/<k>" or "::mip" is what medtl 0.1 hashed: cached features
            # keyed by these digests stay valid.
            view = f"|{self.view.window}|{self.view.mode}|{uid[len(path):]}"
            key = hashlib.sha256((_content_hash(path) + view).encode()).hexdigest()
        else:
            key = _content_hash(path)
            if self.view.window != "auto" and Path(path).suffix.lower() in DICOM_EXTENSIONS:
                key = hashlib.sha256(f"{key}|window={self.view.window}".encode()).hexdigest()
        self._key_cache[uid] = key
        return key

    def fingerprint(self) -> str:
        """sha256 (hex) over the sorted (content, class name, split) triples and the class list.

        Independent of paths and record order, so a moved or re-listed copy of the same data has
        the same fingerprint; any changed image, label or split assignment changes it.
        """
        rows = sorted(
            (self.content_key(i), _label_text(self.classes, r), r.split or "")
            for i, r in enumerate(self.records)
        )
        digest = hashlib.sha256()
        digest.update(("classes\t" + "\t".join(self.classes) + "\n").encode())
        for key, label, split in rows:
            digest.update(f"{key}\t{label}\t{split}\n".encode())
        return digest.hexdigest()

    def to_manifest(self, path: str | os.PathLike[str]) -> None:
        """Write a CSV manifest ``path,label,patient_id,split`` that ``load_dataset`` reads back.

        Paths under the manifest's folder are written relative to it (the pair can be moved
        together), others absolute. Labels are class names. A volume is listed once (loading
        the manifest makes its slices again). Images inside an .npz have no file of their own
        and cannot be listed: that is a :class:`MedtlError`.

        A multi-label dataset is written ``path,<label>...,patient_id,split`` with 1, 0 or
        blank (unknown) per label, which loads back to the same targets (a single label needs
        ``labels=`` to load, as a lone 1/0 column is otherwise ambiguous).
        """
        if self._arrays or any(r.key is not None for r in self.records):
            raise MedtlError(
                f"{self.source}: images stored in an .npz cannot be listed in a CSV manifest"
            )
        if self.multilabel:
            taken = [c for c in self.classes
                     if c.strip().lower() in ("path", "label", "patient_id", "split",
                                              "finding labels")]
            if taken:
                raise MedtlError(f"{self.source}: label '{taken[0]}' has the name of a manifest "
                                 "column; rename it to list the data in a manifest")
        out = Path(path)
        base = Path(os.path.abspath(out)).parent
        with atomic_open(out, "w") as fh:
            writer = csv.writer(fh)
            labels = list(self.classes) if self.multilabel else ["label"]
            writer.writerow(["path", *labels, "patient_id", "split"])
            listed: set[str] = set()
            for r in self.records:
                if r.is_volume:
                    if r.path in listed:
                        continue  # its other slices: listed with the first
                    listed.add(r.path)
                p = Path(r.path)
                try:
                    shown = p.relative_to(base).as_posix()
                except ValueError:
                    shown = str(p)
                if self.multilabel:
                    values = [_cell(v) for v in (r.targets or (math.nan,) * len(self.classes))]
                else:
                    values = [self.classes[r.label]]
                writer.writerow([shown, *values, r.patient_id or "", r.split or ""])


def _cell(value: float) -> str:
    """A multi-label target in a manifest: 1, 0, or blank when unknown (NaN)."""
    return "" if value != value else str(int(value))


def _label_text(classes: list[str], record: Record) -> str:
    """The record's label as the fingerprint hashes it: the class name; multi-label, its
    targets (``1,0,nan``; a single-label dataset's fingerprint is as before multi-label)."""
    if record.targets is None:
        return classes[record.label]
    return ",".join("nan" if v != v else str(int(v)) for v in record.targets)


def _content_hash(path: str) -> str:
    """sha256 of a file's bytes; of a folder (a DICOM series), over its files' names and bytes."""
    p = Path(path)
    try:
        if p.is_dir():
            digest = hashlib.sha256()
            for f in sorted(q for q in p.iterdir() if q.is_file()):
                with open(f, "rb") as fh:
                    digest.update(f"{f.name}\0{hashlib.file_digest(fh, 'sha256').hexdigest()}\n"
                                  .encode())
            return digest.hexdigest()
        with open(p, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise DataReadError(path, f"cannot read file ({exc.strerror or exc})") from exc


class _VolumeCache:
    """The 2-D images of the last few volumes read, so that reading slice after slice of one
    volume decodes it once (volumes are listed slice by slice, so a small cache suffices)."""

    def __init__(self, view: View, size: int = 4) -> None:
        from collections import OrderedDict

        self.view = view
        self.size = size
        self._images: OrderedDict[str, list[np.ndarray]] = OrderedDict()

    def image(self, record: Record) -> np.ndarray:
        volume = record.path
        images = self._images.get(volume)
        if images is None:
            from medtl.data.volumes import read_volume, volume_slices

            v = self.view
            data = read_volume(volume)
            images = volume_slices(data, slices="all" if v.mode != "mip" else "middle",
                                   mode=v.mode, window=v.window)
            self._images[volume] = images
            while len(self._images) > self.size:
                self._images.popitem(last=False)
        else:
            self._images.move_to_end(volume)
        if record.mip:
            return images[0]
        k = record.slice
        assert k is not None
        if not 0 <= k < len(images):
            raise DataReadError(volume, f"slice {k} is outside the volume's {len(images)} slices")
        return images[k]
