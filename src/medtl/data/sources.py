"""``load_dataset``: turn what a user points at (folder, CSV manifest, .npz) into a Dataset.

Splits after loading:

- ``train``/``val``/``test`` given by the source are kept as they are.
- Images with no split (a plain class folder, manifest rows with an empty ``split``) join
  ``train``.
- When there is no ``val``, one is carved from ``train`` (``val_fraction``), stratified by class
  and grouped by patient when patients are known (manifest ``patient_id`` column, or
  ``patient_regex`` on file names). Multi-label manifests are stratified on their labels by
  iterative stratification over patients (medtl.data.splits).
- A ``test`` split is never invented: ``medtl train`` evaluates on ``test`` only when the source
  has one, and holding data out is the user's decision.

A source with no ``train`` split (say, only ``test/``) loads as is, for evaluating a trained model.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medtl.data.dataset import SPLIT_ORDER, Dataset, Record, View
from medtl.data.privacy import patient_key, pseudonym
from medtl.data.readers import (
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    is_image_file,
    probe_image,
    read_npz,
)
from medtl.data.splits import (
    KERMANY_PATIENT_REGEX,
    carve_validation,
    compile_patient_regex,
    patient_from_name,
)
from medtl.data.volumes import is_volume_path, slice_indices
from medtl.errors import DataReadError, MedtlError, check_choice

__all__ = ["BLANK_CHOICES", "KERMANY_PATIENT_REGEX", "UNCERTAIN_CHOICES", "load_dataset",
           "parse_label_names"]

VOLUME_SUFFIXES = (".nii", ".nii.gz")
MODES = ("2d", "2.5d", "mip")
_EXTENSIONS_TEXT = ", ".join((*IMAGE_EXTENSIONS, *VOLUME_SUFFIXES))
# Folders that zip tools and operating systems leave behind; never classes.
_JUNK_DIRS = frozenset({"__MACOSX", "$RECYCLE.BIN", "System Volume Information"})

_Raw = tuple[list[Record], list[str], dict[tuple[str, str], np.ndarray]]

UNCERTAIN_CHOICES: tuple[str, ...] = ("ignore", "zeros", "ones")
"""What a multi-label manifest's -1 (uncertain, CheXpert) becomes: unknown and masked (NaN),
absent (0) or present (1): CheXpert's U-Ignore, U-Zeros and U-Ones (Irvin et al. 2019)."""
BLANK_CHOICES: tuple[str, ...] = ("unknown", "zeros")
"""What a blank cell of a multi-label manifest becomes: unknown and masked (NaN), or absent (0),
CheXpert's practice of reading an unmentioned observation as negative."""
NO_FINDING = "no finding"
"""ChestX-ray14's 'Finding Labels' value for an image with none of the findings."""
_FINDINGS_COLUMN = "finding labels"
_UNCERTAIN_VALUE = {"ignore": math.nan, "zeros": 0.0, "ones": 1.0}
_BLANK_VALUE = {"unknown": math.nan, "zeros": 0.0}
# Columns a multi-label manifest uses for something else than labels.
_RESERVED = ("path", "patient_id", "split")


def load_dataset(
    source: str | os.PathLike[str],
    *,
    patient_regex: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    skip_bad: bool = False,
    window: str = "auto",
    slices: str = "middle",
    mode: str = "2d",
    labels: Sequence[str] | str | None = None,
    uncertain: str = "ignore",
    blank: str = "unknown",
) -> Dataset:
    """Load DATA: a class-folder tree, a CSV manifest or a MedMNIST-style .npz.

    Volumes (a ``.nii``/``.nii.gz`` file in a class folder or a manifest; a folder of DICOM
    slices named in a manifest) carry one label each and become one record per chosen slice
    (``slices``: ``middle``, ``all``, ``sample:N``; ``mode``: ``2d``, ``2.5d``, ``mip``). The
    slices of one volume always stay in one split (they are grouped as one patient when no
    patient is known), and evaluation aggregates them per volume. DICOM files without a patient
    from the manifest or ``patient_regex`` are grouped by their PatientID tag, which is replaced
    at once by a salted pseudonym (medtl.data.privacy): no identifier reaches a Record.

    Args:
        source: a folder ``DATA/<class>/<image>`` or ``DATA/{train,val,test}/<class>/<image>``
            (any subset of the split folders; images may sit in sub-folders of a class folder);
            a ``.csv`` with columns ``path,label`` and optional ``patient_id,split`` (paths
            relative to the manifest's folder unless absolute); or an ``.npz`` with
            ``train_images``/``train_labels`` (and ``val_*``, ``test_*``).
            A manifest without a ``label`` column is multi-label: ChestX-ray14's ``Finding
            Labels`` column (``Effusion|Cardiomegaly``, ``No Finding``), or one column per label
            holding 1, 0, -1 (uncertain) or blank (also ``1.0``/``0.0``/``-1.0``, as CheXpert
            writes them); its records carry :attr:`Record.targets`.
        patient_regex: pattern whose first group (or whole match) in each file name is the
            patient, e.g. :data:`KERMANY_PATIENT_REGEX`. A manifest's ``patient_id`` wins.
        val_fraction: share of ``train`` carved into ``val`` when the source has no ``val``;
            0 carves none. Grouped splits approximate it by ``1/round(1/val_fraction)``.
        seed: seeds the carved split.
        skip_bad: drop files that fail the cheap load-time check (listed in ``Dataset.skipped``)
            instead of raising :class:`DataReadError`.
        window: DICOM/volume intensity window: ``auto`` (the file's own window, else min-max),
            ``minmax``, or a named CT window (``lung``, ``mediastinum``, ``abdomen``, ``brain``,
            ``bone``).
        slices, mode: how volumes become 2-D images (above).
        labels: multi-label manifests: the labels to use, in this order (names, or one string
            of comma-separated names; case does not matter). Default: every finding of a
            ``Finding Labels`` column (sorted), or every column except path, patient_id and
            split whose values are all 1, 0, -1 or blank (other columns, e.g. CheXpert's Sex
            and Age, are ignored). A single-label source given ``labels`` is an error.
        uncertain: multi-label: what -1 becomes: ``ignore`` (NaN: masked from losses and
            metrics), ``zeros`` or ``ones`` (:data:`UNCERTAIN_CHOICES`).
        blank: multi-label: what a blank cell becomes: ``unknown`` (NaN, masked) or ``zeros``.

    Raises:
        MedtlError: a one-line message naming the file or value at fault.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise MedtlError(f"val_fraction must be in [0, 1), got {val_fraction}")
    path = Path(source).expanduser()
    if not path.exists():
        raise MedtlError(f"{source}: no such file or folder")
    regex = compile_patient_regex(patient_regex) if patient_regex else None
    view = make_view(window, slices, mode)
    wanted = parse_label_names(labels)
    policy = _LabelPolicy(wanted, _UNCERTAIN_VALUE[check_choice("--uncertain", uncertain,
                                                                  UNCERTAIN_CHOICES)],
                          _BLANK_VALUE[check_choice("--blank", blank, BLANK_CHOICES)])
    records, classes, arrays = _read_source(path, source, regex, policy)
    multilabel = any(r.targets is not None for r in records)
    skipped: list[tuple[str, str]] = []
    if not arrays:
        records, skipped = _probe_files(records, skip_bad)
        records = _patients_from_dicom(records)
        records = _expand_volumes(records, view)
    if multilabel:
        _check_label_sizes(records, classes, str(source))
    else:
        _check_class_sizes(records, classes, str(source))
    records = _assign_splits(records, classes, str(source), val_fraction, seed, multilabel)
    return Dataset(records, classes, str(source), skipped=skipped, arrays=arrays, view=view,
                   multilabel=multilabel)


def parse_label_names(labels: Sequence[str] | str | None) -> list[str] | None:
    """``--labels`` as a list: names, or one string of comma-separated names; ``None`` stays
    ``None``. An empty or repeated name (case aside) is a :class:`MedtlError`."""
    if labels is None:
        return None
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    names = [str(item).strip() for item in items]
    if not names or not all(names):
        raise MedtlError(f"--labels {labels!r}: an empty label name; give names separated by "
                         "commas, e.g. --labels effusion,cardiomegaly")
    seen: set[str] = set()
    for name in names:
        if name.lower() in seen:
            raise MedtlError(f"--labels {labels!r}: label '{name}' is named twice")
        seen.add(name.lower())
    return names


@dataclass(frozen=True)
class _LabelPolicy:
    """The multi-label options: the labels asked for (None: all), what -1 and blank become."""

    labels: list[str] | None
    uncertain: float
    blank: float


def _read_source(
    path: Path, source: str | os.PathLike[str], regex: re.Pattern[str] | None,
    policy: _LabelPolicy | None = None,
) -> _Raw:
    """Records, classes and arrays of a folder, a manifest or an .npz, as the source has them
    (no files probed, no volumes expanded, no splits added)."""
    policy = policy or _LabelPolicy(None, math.nan, math.nan)
    if policy.labels is not None and not (
            path.is_file() and path.suffix.lower() in (".csv", ".npz")):
        kind = "a class folder" if path.is_dir() else f"a '{path.suffix}' file"
        raise MedtlError(f"{source}: --labels picks the label columns of a multi-label CSV "
                         f"manifest (or names those of an .npz); this is {kind}, with one "
                         "class per image")
    if path.is_dir():
        return _from_folder(path, regex)
    if path.suffix.lower() == ".csv":
        return _from_manifest(path, regex, policy)
    if path.suffix.lower() == ".npz":
        if regex is not None:
            raise MedtlError(
                f"{source}: a patient regex needs file names; images in an .npz have none"
            )
        return _from_npz(path, policy.labels)
    raise MedtlError(
        f"{source}: not a folder, a .csv manifest or an .npz file (suffix '{path.suffix}')"
    )


def _assign_splits(
    records: list[Record], classes: list[str], source: str, val_fraction: float, seed: int,
    multilabel: bool = False,
) -> list[Record]:
    """Unsplit images join train; a validation split is carved when the source has none."""
    records = [replace(r, split="train") if r.split is None else r for r in records]
    if multilabel:
        _check_positives_in_train(records, classes, source)
    else:
        _check_labels_in_train(records, classes, source)
    splits = {r.split for r in records}
    if "train" in splits and "val" not in splits and val_fraction > 0:
        records = _carve(records, classes, val_fraction, seed, multilabel)
    return records


def make_view(window: str = "auto", slices: str = "middle", mode: str = "2d") -> View:
    """A validated :class:`View`; a bad option is a one-line :class:`MedtlError`."""
    from medtl.data.dicom import WINDOW_CHOICES
    from medtl.errors import check_choice

    check_choice("window", window, WINDOW_CHOICES)
    check_choice("mode", mode, MODES)
    slice_indices(1, slices)  # validates the spelling
    return View(window=window, slices=slices, mode=mode)


# ---- volumes and DICOM patients --------------------------------------------------------------


def _volume_depth(path: str) -> int:
    """Number of slices read_volume will return, from headers only."""
    p = Path(path)
    if p.is_dir():
        return sum(1 for f in p.iterdir() if f.is_file() and f.suffix.lower() in DICOM_EXTENSIONS)
    import nibabel as nib

    try:
        img = nib.load(str(p))
        shape = img.shape
        # read_volume reorients to the closest canonical (RAS) axes and stacks along the third.
        ornt = nib.orientations.io_orientation(img.affine)
        axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
        return int(shape[axis])
    except Exception as exc:  # nibabel raises many types on a bad header
        raise DataReadError(str(p), f"cannot read NIfTI header ({type(exc).__name__}: {exc})"
                            ) from exc


def _expand_volumes(records: list[Record], view: View) -> list[Record]:
    out: list[Record] = []
    for r in records:
        if not is_volume_path(r.path):
            out.append(r)
            continue
        # No patient known: the volume is its own group, so its slices never straddle splits.
        # Its name becomes a pseudonym: PACS exports name series folders after patients.
        patient = r.patient_id or pseudonym(f"volume:{Path(r.path).name}")
        if view.mode == "mip":
            out.append(replace(r, mip=True, patient_id=patient))
            continue
        for k in slice_indices(_volume_depth(r.path), view.slices):
            out.append(replace(r, slice=k, patient_id=patient))
    return out


def _patients_from_dicom(records: list[Record]) -> list[Record]:
    """Group DICOM records with no patient by their PatientID (else PatientName) tag, through
    a salted pseudonym: the identifier itself is never stored. Flag (and warn about, file by
    file) DICOM whose BurnedInAnnotation is YES."""
    out = []
    for r in records:
        p = Path(r.path)
        if p.suffix.lower() in DICOM_EXTENSIONS or p.is_dir():
            identifier, burned = _dicom_header(p, r.patient_id is None)
            if identifier:
                r = replace(r, patient_id=pseudonym(identifier))
            if burned:
                r = replace(r, burned_in=True)
        out.append(r)
    return out


def _dicom_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(f for f in path.iterdir() if f.suffix.lower() in DICOM_EXTENSIONS)
    return [path]


def _dicom_header(path: Path, want_patient: bool) -> tuple[str | None, bool]:
    """(PatientID else PatientName when ``want_patient``, whether any file of ``path`` says
    BurnedInAnnotation YES). A series folder's patient is its first file's."""
    from medtl.data.dicom import burned_in, dicom_tags

    files = _dicom_files(path)
    identifier, known = None, {}
    if want_patient and files:
        try:
            tags = dicom_tags(files[0])
            identifier = tags.get("patient_id") or tags.get("patient_name") or None
            known[files[0]] = bool(tags.get("burned_in"))
        except DataReadError:
            pass  # the pixel read reports the file properly later
    marked = [f for f in files if (known[f] if f in known else burned_in(f))]
    warn_burned_in(path, marked, len(files))
    return identifier, bool(marked)


def warn_burned_in(path: Path, marked: Sequence[Path], n_files: int) -> None:
    """One warning per DICOM file (per series folder, with its count) whose pixels carry
    burned-in text."""
    import logging

    if not marked:
        return
    what = (f"{len(marked)} of its {n_files} DICOM files say" if path.is_dir()
            else "the DICOM file says")
    logging.getLogger("medtl").warning(
        "%s: %s BurnedInAnnotation YES: text in the pixels may identify the patient, which no "
        "pseudonym removes; reports show no image of it", path, what)


# ---- folders ---------------------------------------------------------------------------------


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(
        d
        for d in folder.iterdir()
        if d.is_dir() and not d.name.startswith(".") and d.name not in _JUNK_DIRS
    )


def _images_under(folder: Path) -> list[Path]:
    found = []
    for f in folder.rglob("*"):
        rel = f.relative_to(folder).parts
        if any(part.startswith(".") or part in _JUNK_DIRS for part in rel):
            continue
        if f.is_file() and (is_image_file(f) or f.name.lower().endswith(VOLUME_SUFFIXES)):
            found.append(f)
    return sorted(found)


def _from_folder(root: Path, regex: re.Pattern[str] | None) -> _Raw:
    subdirs = _visible_dirs(root)
    if not subdirs:
        loose = sum(1 for f in root.iterdir() if f.is_file() and is_image_file(f))
        hint = f" (found {loose} image(s) directly in it)" if loose else ""
        raise MedtlError(
            f"{root}: no class sub-folders{hint}; expected {root}/<class>/<image> or "
            f"{root}/train/<class>/<image>"
        )
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_ORDER]
    if split_dirs:
        others = [d.name for d in subdirs if d not in split_dirs]
        if others:
            raise MedtlError(
                f"{root}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                f"folders ({', '.join(others)}); put every class folder under train/, val/ or test/"
            )
        layout: list[tuple[str | None, Path]] = [(d.name.lower(), d) for d in split_dirs]
    else:
        layout = [(None, root)]

    found: list[tuple[str | None, str, Path]] = []  # (split, class, file)
    empty: list[Path] = []
    for split, split_dir in layout:
        class_dirs = _visible_dirs(split_dir)
        if not class_dirs:
            raise MedtlError(
                f"{split_dir}: no class sub-folders; expected {split_dir}/<class>/<image>"
            )
        for class_dir in class_dirs:
            files = _images_under(class_dir)
            if not files:
                empty.append(class_dir)
            found.extend((split, class_dir.name, f) for f in files)
    if not found:
        raise MedtlError(
            f"{root}: no images found in its class folders (extensions: {_EXTENSIONS_TEXT})"
        )
    if empty:
        raise MedtlError(f"class folder {empty[0]} has no images ({_EXTENSIONS_TEXT})")

    classes = _sort_classes({name for _, name, _ in found})
    index = {name: i for i, name in enumerate(classes)}
    records = []
    for split, name, f in found:
        path = os.path.abspath(f)
        pid = patient_from_name(path, regex) if regex is not None else None
        records.append(Record(path, index[name], split, pid))
    return records, classes, {}


def _sort_classes(names: set[str]) -> list[str]:
    # Integer-like class names sort numerically so that "10" follows "9", not "1".
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


# ---- CSV manifests ---------------------------------------------------------------------------


def _from_manifest(manifest: Path, regex: re.Pattern[str] | None,
                   policy: _LabelPolicy | None = None) -> _Raw:
    policy = policy or _LabelPolicy(None, math.nan, math.nan)
    base = Path(os.path.abspath(manifest)).parent
    try:
        # utf-8-sig: spreadsheets often save a byte-order mark that would corrupt the first header.
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            names = [(h or "").strip() for h in (reader.fieldnames or [])]
            header = [h.lower() for h in names]
            # Without a 'label' column a manifest may be multi-label: its rows will say.
            if "path" not in header:
                _no_columns(manifest, [c for c in ("path", "label") if c not in header and not
                                       (c == "label" and _FINDINGS_COLUMN in header)], header)
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataReadError(str(manifest), f"cannot read manifest ({exc})") from exc
    if "label" not in header:
        return _multilabel_manifest(manifest, base, names, header, rows, regex, policy)
    if policy.labels is not None:
        raise MedtlError(f"{manifest}: --labels picks the label columns of a multi-label "
                         "manifest; this one has a 'label' column (one class per image)")
    if not rows:
        raise MedtlError(f"{manifest}: the manifest has a header but no rows")

    entries: list[tuple[str, str, str | None, str | None]] = []  # (path, label, split, patient)
    for line, row in rows:
        where = f"{manifest}, line {line}"
        raw_path = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip()
        if not raw_path:
            raise MedtlError(f"{where}: empty path")
        if not label:
            raise MedtlError(f"{where}: empty label for {raw_path}")
        file = _manifest_file(where, raw_path, base)
        split_value, patient = _split_and_patient(where, row, file, regex)
        entries.append((os.path.abspath(file), label, split_value, patient))

    classes = _sort_classes({label for _, label, _, _ in entries})
    index = {name: i for i, name in enumerate(classes)}
    records = [Record(p, index[label], split, pid) for p, label, split, pid in entries]
    return records, classes, {}


def _no_columns(manifest: Path, missing: list[str], header: list[str], hint: str = "") -> None:
    found = ", ".join(header) if header else "none"
    raise MedtlError(
        f"{manifest}: no {' or '.join(repr(c) for c in missing)} column; a manifest "
        f"needs the header path,label[,patient_id,split] (found: {found}){hint}"
    )


def _manifest_file(where: str, raw_path: str, base: Path) -> Path:
    """The file a manifest row names, checked to exist."""
    file = Path(raw_path).expanduser()
    if not file.is_absolute():
        relative, file = file, base / file
        # CheXpert's train.csv lies in CheXpert-v1.0-small/ but lists its images as
        # CheXpert-v1.0-small/train/...: relative to the folder above the manifest's.
        if (relative.parts and relative.parts[0] == base.name and not _listed_exists(file)
                and _listed_exists(base.parent / relative)):
            file = base.parent / relative
    if not _listed_exists(file):
        raise MedtlError(f"{where}: image not found: {raw_path} (looked for {file})")
    return file


def _listed_exists(file: Path) -> bool:
    return file.is_file() or (file.is_dir() and is_volume_path(file))


def _split_and_patient(where: str, row: dict[str, str], file: Path,
                       regex: re.Pattern[str] | None,
                       patient_column: str = "patient_id") -> tuple[str | None, str | None]:
    split_value = (row.get("split") or "").strip().lower()
    if split_value and split_value not in SPLIT_ORDER:
        raise MedtlError(
            f"{where}: split '{split_value}' is not one of train, val, test (or empty)"
        )
    # A manifest's patient ids are record numbers: pseudonymised before anything sees them.
    raw_patient = (row.get(patient_column) or "").strip()
    patient = patient_key(raw_patient) if raw_patient else None
    if patient is None and regex is not None:
        patient = patient_from_name(str(file), regex)
    return split_value or None, patient


# ---- multi-label manifests -------------------------------------------------------------------


def _label_value(text: str | None) -> float | None:
    """A multi-label cell: 1, 0 or -1 (``1.0``, ``0.0``, ``-1.0`` too), None when blank;
    anything else is a ValueError."""
    value = (text or "").strip()
    if not value:
        return None
    number = float(value)  # ValueError for text
    if number not in (1.0, 0.0, -1.0):
        raise ValueError(value)
    return number


def _is_label_column(column: str, rows: list[tuple[int, dict[str, str]]]) -> bool:
    """Whether every non-blank value of ``column`` is 1, 0 or -1, and one is not blank."""
    seen = False
    for _, row in rows:
        try:
            value = _label_value(row.get(column))
        except ValueError:
            return False
        seen = seen or value is not None
    return seen


def _pick(manifest: Path, wanted: list[str], available: dict[str, str], what: str) -> list[str]:
    """The names in ``available`` (lower case -> name) that ``wanted`` asks for, in its order;
    an unknown one is a :class:`MedtlError` listing what there is."""
    unknown = [w for w in wanted if w.lower() not in available]
    if unknown:
        shown = ", ".join(available.values()) or "none"
        raise MedtlError(f"{manifest}: no {what} {', '.join(repr(u) for u in unknown)} "
                         f"(--labels); {what}s here: {shown}")
    return [available[w.lower()] for w in wanted]


def _multilabel_manifest(manifest: Path, base: Path, names: list[str], header: list[str],
                         rows: list[tuple[int, dict[str, str]]], regex: re.Pattern[str] | None,
                         policy: _LabelPolicy) -> _Raw:
    """A manifest without a ``label`` column: ChestX-ray14's ``Finding Labels`` or one column
    per label. Records carry label 0 and their targets."""
    repeated = sorted({h for h in header if h and header.count(h) > 1})
    if repeated:
        raise MedtlError(f"{manifest}: column '{repeated[0]}' appears more than once (case "
                         "aside); each label needs one column")
    # ChestX-ray14's Data_Entry_2017.csv names it "Patient ID": grouping by it is what keeps a
    # patient's follow-up images on one side of a split.
    patient_column = ("patient_id" if "patient_id" in header or "patient id" not in header
                      else "patient id")
    if _FINDINGS_COLUMN in header:
        classes, table = _findings_targets(manifest, rows, policy)
    else:
        classes, table = _column_targets(manifest, names, header, rows, policy, patient_column)
    if not rows:
        raise MedtlError(f"{manifest}: the manifest has a header but no rows")
    records = []
    for (line, row), targets in zip(rows, table, strict=True):
        where = f"{manifest}, line {line}"
        raw_path = (row.get("path") or "").strip()
        if not raw_path:
            raise MedtlError(f"{where}: empty path")
        file = _manifest_file(where, raw_path, base)
        split_value, patient = _split_and_patient(where, row, file, regex, patient_column)
        records.append(Record(os.path.abspath(file), 0, split_value, patient,
                              targets=targets))
    return records, classes, {}


def _findings_targets(manifest: Path, rows: list[tuple[int, dict[str, str]]],
                      policy: _LabelPolicy) -> tuple[list[str], list[tuple[float, ...]]]:
    """ChestX-ray14: ``Effusion|Cardiomegaly`` lists the findings present, ``No Finding``
    none; every finding the manifest names is a label, each known for every image."""
    found: list[set[str]] = []
    for line, row in rows:
        where = f"{manifest}, line {line}"
        cell = (row.get(_FINDINGS_COLUMN) or "").strip()
        items = {item.strip() for item in cell.split("|") if item.strip()}
        if not items:
            raise MedtlError(f"{where}: empty 'Finding Labels' for "
                             f"{(row.get('path') or '').strip()}; write 'No Finding' for none")
        if any(item.lower() == NO_FINDING for item in items):
            if len(items) > 1:
                raise MedtlError(f"{where}: 'Finding Labels' says 'No Finding' and names "
                                 f"findings ({cell})")
            items = set()
        found.append(items)
    every = sorted(set().union(*found)) if found else []
    classes = (every if policy.labels is None else
               _pick(manifest, policy.labels, {f.lower(): f for f in every}, "finding"))
    table = [tuple(1.0 if name in items else 0.0 for name in classes) for items in found]
    return classes, table


def _column_targets(manifest: Path, names: list[str], header: list[str],
                    rows: list[tuple[int, dict[str, str]]], policy: _LabelPolicy,
                    patient_column: str) -> tuple[list[str], list[tuple[float, ...]]]:
    """One column per label (1, 0, -1, blank): the columns asked for, else every column whose
    values say so."""
    reserved = {*_RESERVED, patient_column}
    spelled = {h: n for h, n in zip(header, names, strict=True) if h and h not in reserved}
    if policy.labels is not None:
        chosen = [h.lower() for h in _pick(manifest, policy.labels, spelled, "label column")]
    else:
        chosen = [h for h in spelled if _is_label_column(h, rows)]
        ignored = [spelled[h] for h in spelled if h not in chosen]
        if ignored:
            logging.getLogger("medtl").info(
                "%s: columns that are not labels (values other than 1, 0, -1 or blank) are "
                "ignored: %s", manifest, ", ".join(ignored))
        if not chosen:
            _no_columns(manifest, ["label"], header,
                        "; multi-label data needs one column per label holding 1, 0, -1 or "
                        "blank, or a 'Finding Labels' column")
        if len(chosen) == 1:
            raise MedtlError(
                f"{manifest}: one label column ('{spelled[chosen[0]]}') and no 'label' column: "
                f"name it 'label' for one class per image, or pass --labels "
                f"'{spelled[chosen[0]]}' for a multi-label model of one label")
    values = {-1.0: policy.uncertain, 1.0: 1.0, 0.0: 0.0}
    table = []
    for line, row in rows:
        targets = []
        for column in chosen:
            try:
                value = _label_value(row.get(column))
            except ValueError:
                raise MedtlError(
                    f"{manifest}, line {line}, column '{spelled[column]}': value "
                    f"'{(row.get(column) or '').strip()}' is not 1, 0, -1 (uncertain) or blank"
                ) from None
            targets.append(policy.blank if value is None else values[value])
        table.append(tuple(targets))
    return [spelled[h] for h in chosen], table


# ---- .npz (MedMNIST layout) ------------------------------------------------------------------


# Labels are class numbers 0..K-1; a run holds at most this many classes (as
# medtl.transfer.meta.MAX_CLASSES), so a label of 10**10 is refused, not 10**10 class names.
MAX_NPZ_CLASSES = 10_000


def _from_npz(path: Path, names: list[str] | None = None) -> _Raw:
    """MedMNIST's layout; label arrays of shape (n, K > 1) are multi-label (ChestMNIST: 14
    findings, 0/1), their labels named by ``names`` (``--labels``, in column order) or
    "0".."K-1"."""
    abs_path = os.path.abspath(path)
    if not zipfile.is_zipfile(abs_path):
        raise MedtlError(f"{path}: not an .npz archive (a single array, .npy?)")
    wanted = [f"{s}_{kind}" for s in SPLIT_ORDER for kind in ("images", "labels")]
    # Sizes checked from the .npy headers before anything is decompressed; no pickles.
    found, keys = read_npz(abs_path, wanted)
    present = [s for s in SPLIT_ORDER if f"{s}_images" in found or f"{s}_labels" in found]
    if not present:
        raise MedtlError(
            f"{path}: no MedMNIST keys; expected train_images and train_labels (and "
            f"optionally val_*, test_*), found: {', '.join(keys) or 'none'}"
        )
    arrays: dict[tuple[str, str], np.ndarray] = {}
    labels_by_split: dict[str, np.ndarray] = {}
    for split in present:
        img_key, lab_key = f"{split}_images", f"{split}_labels"
        for key in (img_key, lab_key):
            if key not in found:
                raise MedtlError(f"{path}: has '{split}_*' arrays but no '{key}'")
        images = _check_npz_images(path, img_key, found[img_key])
        arrays[(abs_path, split)] = images
        labels = found[lab_key]
        if labels.ndim == 2 and labels.shape[1] > 1:
            labels_by_split[split] = _check_npz_targets(path, lab_key, labels, len(images))
        else:
            labels_by_split[split] = _check_npz_labels(path, lab_key, labels, len(images))
    widths = {ys.shape[1] if ys.ndim == 2 else 1 for ys in labels_by_split.values()}
    if len(widths) > 1:
        raise MedtlError(f"{path}: its label arrays differ in width ({sorted(widths)}): every "
                         "split needs the same labels")
    if max(widths) > 1:
        k = widths.pop()
        classes = list(names) if names else [str(i) for i in range(k)]
        if len(classes) != k:
            raise MedtlError(f"{path}: --labels names {len(classes)} labels, and the .npz has "
                             f"{k} label columns")
        records = [Record(abs_path, 0, split, None, key=split, index=i,
                          targets=tuple(float(v) for v in row))
                   for split, ys in labels_by_split.items() for i, row in enumerate(ys)]
        return records, classes, arrays
    if names:
        raise MedtlError(f"{path}: --labels names the columns of a multi-label .npz; this one "
                         "has one class per image")
    classes = _npz_classes(path, labels_by_split)
    records = [
        Record(abs_path, int(y), split, None, key=split, index=i)
        for split, ys in labels_by_split.items()
        for i, y in enumerate(ys)
    ]
    return records, classes, arrays


def _check_npz_images(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    shape_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
    if not shape_ok:
        raise MedtlError(
            f"{path}: '{key}' has shape {images.shape}; expected (n, H, W) or (n, H, W, 3)"
        )
    if images.dtype != np.uint8:
        raise MedtlError(f"{path}: '{key}' has dtype {images.dtype}; expected uint8")
    return images


def _check_npz_targets(path: Path, key: str, labels: np.ndarray, n_images: int) -> np.ndarray:
    """(n, K) multi-label targets: 0 and 1, NaN for unknown (float arrays only)."""
    if len(labels) != n_images:
        raise MedtlError(f"{path}: '{key}' has {len(labels)} label rows for {n_images} images")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)
            or labels.dtype == np.bool_):
        raise MedtlError(f"{path}: '{key}' has dtype {labels.dtype}; expected 0/1 numbers")
    values = labels.astype(np.float64)
    known = ~np.isnan(values)
    bad = known & (values != 0) & (values != 1)
    if bad.any():
        raise MedtlError(f"{path}: '{key}' holds {values[bad][0]:g}; multi-label targets are "
                         "0, 1 (or NaN for unknown)")
    return values


def _check_npz_labels(path: Path, key: str, labels: np.ndarray, n_images: int) -> np.ndarray:
    # MedMNIST stores labels as (n, 1); (n, k > 1) is multi-label (_check_npz_targets).
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise MedtlError(
            f"{path}: '{key}' has shape {labels.shape}; expected (n,) or (n, 1) "
            "(multi-label data is not supported)"
        )
    if len(labels) != n_images:
        raise MedtlError(f"{path}: '{key}' has {len(labels)} labels for {n_images} images")
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and bool(np.all(labels == np.round(labels)))
    )
    if not integral:
        raise MedtlError(f"{path}: '{key}' holds non-integer labels (dtype {labels.dtype})")
    if len(labels) and labels.min() < 0:
        raise MedtlError(f"{path}: '{key}' holds a negative label ({labels.min()})")
    if len(labels) and labels.max() >= MAX_NPZ_CLASSES:  # before the cast: 1e30 or inf too
        raise MedtlError(f"{path}: '{key}' holds the label {labels.max()}; labels are class "
                         f"numbers 0 to {MAX_NPZ_CLASSES - 1}")
    return labels.astype(np.int64)


def _npz_classes(path: Path, labels_by_split: dict[str, np.ndarray]) -> list[str]:
    """Class names "0".."K-1" for labels numbered 0..K-1, every number used."""
    used = np.unique(np.concatenate(list(labels_by_split.values())))
    if not len(used):
        raise MedtlError(f"{path}: no images in {', '.join(labels_by_split)}")
    n_classes = int(used[-1]) + 1
    if len(used) < n_classes:  # (used is sorted: the first gap is where it leaves 0, 1, 2...)
        first = int(np.flatnonzero(used != np.arange(len(used)))[0])
        raise MedtlError(f"{path}: labels are class numbers 0..{n_classes - 1} but "
                         f"{n_classes - len(used)} of them have no image (the first: {first}); "
                         "number the classes 0..K-1 without gaps")
    return [str(i) for i in range(n_classes)]


# ---- checks and the carved validation split --------------------------------------------------


def _probe_files(
    records: list[Record], skip_bad: bool
) -> tuple[list[Record], list[tuple[str, str]]]:
    kept, skipped = [], []
    for r in records:
        reason = None if is_volume_path(r.path) else probe_image(r.path)
        if reason is None:
            kept.append(r)
        elif skip_bad:
            skipped.append((r.path, reason))
        else:
            raise DataReadError(r.path, f"{reason} (--skip-bad skips unreadable files)")
    return kept, skipped


def _check_class_sizes(records: list[Record], classes: list[str], source: str) -> None:
    counts = Counter(r.label for r in records)
    for i, name in enumerate(classes):
        n = counts.get(i, 0)
        if n < 2:
            raise MedtlError(
                f"{source}: class '{name}' has {n} image{'' if n == 1 else 's'}; "
                "at least 2 are needed"
            )


def _check_labels_in_train(records: list[Record], classes: list[str], source: str) -> None:
    in_train = {r.label for r in records if r.split == "train"}
    if not in_train:
        return  # an evaluation-only source (e.g. just test/): nothing to compare against
    for r in records:
        if r.split != "train" and r.label not in in_train:
            raise MedtlError(
                f"{source}: class '{classes[r.label]}' appears in {r.split} but not in train "
                f"(e.g. {r.uid})"
            )


def _check_label_sizes(records: list[Record], classes: list[str], source: str) -> None:
    """Multi-label: each label needs 2 known positives and 2 known negatives in the source, or
    neither a split nor an AUC can be made of it."""
    targets = np.array([r.targets for r in records], dtype=np.float64).reshape(
        len(records), len(classes))
    for k, name in enumerate(classes):
        positives = int(np.sum(targets[:, k] == 1.0))
        negatives = int(np.sum(targets[:, k] == 0.0))
        if positives < 2 or negatives < 2:
            raise MedtlError(
                f"{source}: label '{name}' has {positives} known positive and {negatives} "
                f"known negative image(s) ({len(records) - positives - negatives} unknown); "
                "at least 2 of each are needed: leave it out with --labels (naming the others)"
            )


def _check_positives_in_train(records: list[Record], classes: list[str], source: str) -> None:
    """Multi-label: a label present in val or test must be present in train."""
    in_train = np.array([r.split == "train" for r in records], dtype=bool)
    if not in_train.any():
        return  # an evaluation-only source: nothing to compare against
    present = np.array([r.targets for r in records], dtype=np.float64).reshape(
        len(records), len(classes)) == 1.0
    for k in np.flatnonzero(~present[in_train].any(axis=0)):
        elsewhere = np.flatnonzero(present[:, k] & ~in_train)
        if len(elsewhere):
            r = records[int(elsewhere[0])]
            raise MedtlError(f"{source}: label '{classes[k]}' is present in {r.split} but in "
                             f"no train image (e.g. {r.uid})")


def _carve(records: list[Record], classes: list[str], fraction: float, seed: int,
           multilabel: bool = False) -> list[Record]:
    train_idx = [i for i, r in enumerate(records) if r.split == "train"]
    labels: list[int] | np.ndarray = (
        np.array([records[i].targets for i in train_idx], dtype=np.float64).reshape(
            len(train_idx), len(classes))
        if multilabel else [records[i].label for i in train_idx])
    groups = [records[i].patient_id for i in train_idx]
    val_pos = carve_validation(labels, groups, fraction=fraction, seed=seed, class_names=classes)
    to_val = {train_idx[int(p)] for p in val_pos}
    return [replace(r, split="val") if i in to_val else r for i, r in enumerate(records)]


def dataset_from_files(
    inputs: Sequence[str | os.PathLike[str]], classes: Sequence[str], view: View | None = None
) -> Dataset:
    """Unlabelled images to predict: files, and folders searched recursively for images.

    Labels are unknown, so every record carries label 0 and the caller must not score them.
    """
    paths: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise MedtlError(f"{item}: no such file or folder")
        if p.is_dir():
            found = _images_under(p)
            if not found:
                raise MedtlError(f"{item}: no images in this folder ({_EXTENSIONS_TEXT})")
            paths.extend(found)
        elif is_image_file(p) or p.name.lower().endswith(VOLUME_SUFFIXES):
            paths.append(p)
        else:
            raise MedtlError(f"{item}: not an image file ({_EXTENSIONS_TEXT})")
    records = [Record(str(p.resolve()), 0, None) for p in dict.fromkeys(paths)]
    records = [replace(r, burned_in=True) if _burned(r.path) else r for r in records]
    view = view or View()
    return Dataset(_expand_volumes(records, view), classes,
                   ", ".join(str(i) for i in inputs), view=view)


def _burned(path: str) -> bool:
    """Whether a file to predict or explain is a DICOM saying BurnedInAnnotation YES (warned)."""
    p = Path(path)
    if p.suffix.lower() not in DICOM_EXTENSIONS:
        return False
    return _dicom_header(p, want_patient=False)[1]
