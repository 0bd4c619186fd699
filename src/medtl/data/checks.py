"""Dataset inspection, every image decoded once: ``medtl info`` (what is there) and
``medtl check`` (what is wrong: unreadable files, duplicates, leakage across splits)."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtl.console import progress_bar
from medtl.data.dataset import Dataset, Record
from medtl.data.readers import DICOM_EXTENSIONS
from medtl.data.sources import load_dataset
from medtl.data.splits import patient_overlap
from medtl.errors import DataReadError, MedtlError


def dataset_summary(source: str | os.PathLike[str], *, patient_regex: str | None = None,
                    skip_bad: bool = False, quiet: bool = False,
                    labels: Sequence[str] | str | None = None, uncertain: str = "ignore",
                    blank: str = "unknown") -> dict[str, Any]:
    """Classes, counts and patients per split, image sizes, and every unreadable file.

    Decoding every image is the only way to find truncated files before a long run; files that
    fail the cheap load-time check are reported with the same reasons when ``skip_bad``.

    A multi-label dataset (``labels``, ``uncertain``, ``blank`` as :func:`load_dataset` takes
    them) adds ``multilabel: True``, ``label_counts`` (:func:`label_counts`) and
    ``cooccurrence`` (:func:`label_cooccurrence`); ``counts`` then holds the positives.
    """
    ds = load_dataset(source, patient_regex=patient_regex, skip_bad=skip_bad, labels=labels,
                      uncertain=uncertain, blank=blank)
    unreadable = [f"{p}: {why}" for p, why in ds.skipped]
    sizes: Counter[str] = Counter()
    with progress_bar("reading images", len(ds), quiet=quiet) as advance:
        for i in range(len(ds)):
            try:
                img = ds.read(i)
                sizes[f"{img.shape[1]}x{img.shape[0]}"] += 1
            except DataReadError as exc:
                if not skip_bad:
                    raise
                unreadable.append(f"{exc.path}: {exc.reason}")
            advance(1)
    modalities: Counter[str] = Counter()
    # Per file, and per image of an .npz (each counts as one array image).
    for path, key, _index in dict.fromkeys((r.path, r.key, r.index) for r in ds.records):
        modalities["array" if key is not None else _modality(path)] += 1
    patients: dict[str, int] = {}
    for split in ds.split_names():
        ids = {p for p in ds.split(split).patients if p is not None}
        if ids:
            patients[split] = len(ids)
    summary = {
        "source": str(source),
        "classes": ds.classes,
        "counts": ds.counts(),
        "patients": patients,
        "patient_structure": _patient_structure(ds),
        "image_sizes": dict(sizes.most_common(10)),
        "distinct_image_sizes": len(sizes),
        "modalities": dict(modalities),
        "unreadable": unreadable,
    }
    if ds.multilabel:  # single-label summaries keep exactly their keys
        summary.update(_multilabel_summary(ds))
    return summary


def label_counts(ds: Dataset) -> dict[str, dict[str, dict[str, int]]]:
    """Multi-label: ``{split: {label: {"positive", "negative", "unknown"}}}`` images, every
    split and label listed (unknown: blank, or -1 under ``--uncertain ignore``)."""
    y = ds.labels
    splits = np.array([r.split or "" for r in ds.records])
    out: dict[str, dict[str, dict[str, int]]] = {}
    for split in ds.split_names():
        part = y[splits == split]
        out[split] = {name: {"positive": int(np.sum(part[:, k] == 1.0)),
                             "negative": int(np.sum(part[:, k] == 0.0)),
                             "unknown": int(np.sum(np.isnan(part[:, k])))}
                      for k, name in enumerate(ds.classes)}
    return out


def label_cooccurrence(ds: Dataset) -> dict[str, Any]:
    """Multi-label: ``{"split", "labels", "matrix"}``, where ``matrix[i][j]`` counts the images
    of ``split`` (train, or ``all`` when there is no train split) with labels i and j both
    present; the diagonal is each label's positives."""
    split = "train" if "train" in ds.split_names() else "all"
    y = ds.labels
    if split == "train":
        y = y[np.array([r.split == "train" for r in ds.records], dtype=bool)]
    present = (y == 1.0).astype(np.int64)  # NaN == 1 is False: unknown is not a positive
    return {"split": split, "labels": list(ds.classes),
            "matrix": (present.T @ present).tolist()}


def _multilabel_summary(ds: Dataset) -> dict[str, Any]:
    return {"multilabel": True, "label_counts": label_counts(ds),
            "cooccurrence": label_cooccurrence(ds)}


HASH_SIZE = 16
"""pHash side: 16 x 16 = 256 bits. 64-bit hashes cannot tell chest X-rays apart: on the 5,840
Kermany X-rays half of the images have another patient's X-ray within 8 of 64 bits (pHash) or
2 of 64 (dHash), closer than a re-encoded copy of themselves."""
HASH_BITS = HASH_SIZE * HASH_SIZE
NEAR_THRESHOLD = 20
"""Most differing pHash bits (of 256) for two images to count as near-duplicates. Measured on all
5,840 Kermany X-rays (224 px JPEG, ../shared/data/chest_xray_kermany_224): a copy resized to
180 px and re-saved at JPEG quality 70 differs by at most 10 bits (99th percentile 6, mean 2.1;
1,460 copies), a harsher one (112 px, quality 50) by at most 16; the nearest X-ray of another
patient (byte-identical files aside) by at least 38 (0.1th percentile 42, median 72)."""
MAX_NEAR_THRESHOLD = 64
"""Above a quarter of the bits, unrelated images start to match and the pairs to explode."""
_BLOCK_WORDS = 1 << 20  # 64-bit words of XOR per block (8 MiB): the fastest size measured
_BYTE_BITS = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def check_dataset(source: str | os.PathLike[str], *, patient_regex: str | None = None,
                  near_threshold: int = NEAR_THRESHOLD, quiet: bool = False,
                  labels: Sequence[str] | str | None = None, uncertain: str = "ignore",
                  blank: str = "unknown") -> dict[str, Any]:
    """Problems (``medtl check`` exits 1 when there are any), notes and a summary of DATA.

    Problems, each ``{kind, leakage, count, message, paths, items}``:

    - ``unreadable``: files that fail the load-time probe or the full decode;
    - ``duplicate_across_splits`` / ``duplicate_within_split``: byte-identical files
      (:meth:`Dataset.content_key`); across splits the model is tested on training images,
      within one they count twice;
    - ``near_duplicate_across_splits`` / ``near_duplicate_within_split``: pairs whose 256-bit
      perceptual hashes (imagehash pHash) differ in at most ``near_threshold`` bits (see
      :data:`NEAR_THRESHOLD` for how the default was measured), byte-identical pairs aside;
    - ``patient_in_several_splits``: patients (``patient_regex`` or a manifest's column) with
      images in more than one split.

    Notes (never a failure): class imbalance per split, classes missing from a split, mixed
    image sizes and pixel formats, unknown patients, patients with images in several classes.
    The summary holds counts, class balance, the patient structure per split (patients, images
    per patient, patients in several classes), image sizes and pixel formats.

    The splits are taken as the source gives them (no validation carved). Every image is
    decoded once and hashed from that decode. Near-duplicates compare all n(n-1)/2 pairs of
    hashes in numpy blocks: under a second for 5,840 images, about 4 s for 20,000; the time
    grows as n squared (about 1.5 min for 100,000, extrapolated).

    Multi-label data (``labels``, ``uncertain``, ``blank`` as :func:`load_dataset` takes them):
    ``counts`` holds positives, ``class_balance`` the minority/majority ratio of each label's
    positives and negatives, and the summary adds ``multilabel``, ``label_counts`` and
    ``cooccurrence`` as :func:`dataset_summary` does; the notes speak of labels.

    Raises:
        MedtlError: a bad source or a threshold outside 0..:data:`MAX_NEAR_THRESHOLD`.
    """
    if not 0 <= near_threshold <= MAX_NEAR_THRESHOLD:
        raise MedtlError(f"near threshold must be 0 to {MAX_NEAR_THRESHOLD} bits (of "
                         f"{HASH_BITS}), got {near_threshold}")
    # As given: a carved validation split would be medtl's choice, not the data's; files that
    # fail the load-time probe are findings here, not a reason to stop.
    ds = load_dataset(source, patient_regex=patient_regex, skip_bad=True, val_fraction=0,
                      labels=labels, uncertain=uncertain, blank=blank)
    base = _base_folder(source)
    seen = _decode_all(ds, quiet)
    problems = _problems(ds, seen, near_threshold, base)
    structure = _patient_structure(ds)
    counts = ds.counts()
    per_label = label_counts(ds) if ds.multilabel else {}
    balance: dict[str, Any] = (
        {split: {name: _balance({"+": c["positive"], "-": c["negative"]})
                 for name, c in by_label.items()} for split, by_label in per_label.items()}
        if ds.multilabel else {split: _balance(c) for split, c in counts.items()})
    summary = {
        "images": len(ds) + len(ds.skipped),
        "decoded": len(seen.decoded),
        "classes": ds.classes,
        "counts": counts,
        "class_balance": balance,
        "patients": structure,
        "image_sizes": dict(seen.sizes.most_common(10)),
        "distinct_image_sizes": len(seen.sizes),
        "pixel_formats": dict(seen.formats.most_common()),
        "near_duplicates": {"hash": f"pHash {HASH_BITS} bits (imagehash)",
                            "threshold": near_threshold},
    }
    if ds.multilabel:
        summary.update(_multilabel_summary(ds))
        notes = _label_notes(per_label, balance)
        notes += _notes(ds, {}, {}, seen.sizes, seen.formats, structure)
    else:
        notes = _notes(ds, counts, balance, seen.sizes, seen.formats, structure)
    return {"source": str(source), "problems": problems, "notes": notes, "summary": summary}


def split_overlap(ds: Dataset, *, examples: int = 5) -> dict[str, Any]:
    """Leakage across the splits of ``ds`` as ``medtl train`` uses them, cheaply: patients with
    images in more than one split, and groups of byte-identical files (sha256 of the bytes,
    :meth:`Dataset.content_key`) spanning splits. No decode and no perceptual pass (that is
    ``medtl check``'s). Examples name files relative to the data folder.

    Returns ``{"splits", "shared_patients", "identical_files", "examples"}`` (up to
    ``examples`` of each kind), zeros when clean.
    """
    base = _base_folder(ds.source) if ds.source else ""
    # An unreadable file is not a duplicate of anything; training says what is wrong with it.
    keyed = [(i, key) for i in range(len(ds)) if (key := _key_or_none(ds, i)) is not None]
    dup = [p for p in _exact_duplicates(ds, [i for i, _ in keyed], [k for _, k in keyed], base)
           if p["leakage"]]
    patients = _patients_in_several_splits(ds, base)
    shown = [f"patient {it['patient']}: " + ", ".join(
        f"{_named(im, base)} ({im['split']})" for im in it["images"][:2])
        for it in (patients[0]["items"] if patients else [])[:examples]]
    shown += [" = ".join(f"{_named(im, base)} ({im['split']})" for im in it["images"][:2])
              for it in (dup[0]["items"] if dup else [])[:examples]]
    return {"splits": ds.split_names(),
            "shared_patients": patients[0]["count"] if patients else 0,
            "identical_files": dup[0]["count"] if dup else 0,
            "examples": shown}


def _key_or_none(ds: Dataset, i: int) -> str | None:
    try:
        return ds.content_key(i)
    except DataReadError:
        return None


@dataclass
class _Decoded:
    """What the one decode of every image yields, for all the checks that follow."""

    unreadable: list[dict[str, str]]  # {path, reason}: failed the load-time probe or decode
    decoded: list[int] = field(default_factory=list)  # dataset indices that decoded
    keys: list[str] = field(default_factory=list)  # content key of each decoded image
    hashes: list[np.ndarray] = field(default_factory=list)  # its packed pHash
    sizes: Counter[str] = field(default_factory=Counter)  # "WxH" -> images
    formats: Counter[str] = field(default_factory=Counter)  # stored pixel format -> images


def _decode_all(ds: Dataset, quiet: bool) -> _Decoded:
    """Decode every image once and take from that decode all that the checks need."""
    seen = _Decoded(unreadable=[{"path": p, "reason": why} for p, why in ds.skipped])
    with progress_bar("checking images", len(ds), quiet=quiet) as advance:
        for i in range(len(ds)):
            try:
                img = ds.read(i)
                key = ds.content_key(i)
            except DataReadError as exc:
                seen.unreadable.append({"path": exc.path, "reason": exc.reason})
            else:
                seen.decoded.append(i)
                seen.keys.append(key)
                seen.hashes.append(perceptual_hash(img))
                seen.sizes[f"{img.shape[1]}x{img.shape[0]}"] += 1
                seen.formats[_pixel_format(ds.records[i])] += 1
            advance(1)
    return seen


def _problems(ds: Dataset, seen: _Decoded, near_threshold: int,
              base: str) -> list[dict[str, Any]]:
    """Every problem, in the order reported: unreadable, exact, near-duplicates, patients."""
    problems = _unreadable_problems(seen.unreadable, base)
    problems += _exact_duplicates(ds, seen.decoded, seen.keys, base)
    bits = np.array(seen.hashes, dtype=np.uint8).reshape(len(seen.hashes), HASH_BITS // 8)
    problems += _near_duplicates(ds, seen.decoded, seen.keys, bits, near_threshold, base)
    problems += _patients_in_several_splits(ds, base)
    return problems


def _unreadable_problems(unreadable: list[dict[str, str]], base: str) -> list[dict[str, Any]]:
    """One problem listing every unreadable file, or none."""
    if not unreadable:
        return []
    first = unreadable[0]
    return [_problem(
        "unreadable", False, unreadable, [u["path"] for u in unreadable],
        f"{len(unreadable)} file(s) cannot be read or decoded (e.g. "
        f"{_shown(first['path'], base)}: {first['reason']})")]


def perceptual_hash(image: np.ndarray) -> np.ndarray:
    """The 256-bit pHash of an ``(H, W, 3)`` uint8 image, packed into 32 bytes.

    pHash (low frequencies of the DCT of a 64 x 64 grey thumbnail) survives resizing and JPEG
    re-encoding; flips, crops and rotations are not caught.
    """
    import imagehash
    from PIL import Image

    grey = Image.fromarray(image).convert("L")
    return np.packbits(imagehash.phash(grey, hash_size=HASH_SIZE).hash.ravel())


def _problem(kind: str, leakage: bool, items: list[dict[str, Any]], paths: list[str],
             message: str) -> dict[str, Any]:
    return {"kind": kind, "leakage": leakage, "count": len(items), "message": message,
            "paths": sorted(set(paths)), "items": items}


def _image(ds: Dataset, r: Record) -> dict[str, Any]:
    """An image of a finding: its file, where in the file (slice, array key and index) when it
    is not a file of its own, its split, label and patient."""
    return {"path": r.path, **r.location(), "split": r.split, "label": _label_name(ds, r),
            "patient": r.patient_id}


def _label_name(ds: Dataset, r: Record) -> str:
    """The class; multi-label, the labels present as ChestX-ray14 writes them
    (``Effusion|Cardiomegaly``, ``No Finding``)."""
    if r.targets is None:
        return ds.classes[r.label]
    present = [name for name, v in zip(ds.classes, r.targets, strict=True) if v == 1.0]
    return "|".join(present) or "No Finding"


def _label_key(r: Record) -> object:
    """What two images must share to carry the same labels (NaN equal to NaN)."""
    if r.targets is None:
        return r.label
    return tuple("?" if v != v else v for v in r.targets)


def _named(image: dict[str, Any], base: str) -> str:
    """An image of :func:`_image` in a message: its file, then where in the file."""
    shown = _shown(image["path"], base)
    if "slice" in image:
        return f"{shown} slice {image['slice']}"
    if "key" in image:
        return f"{shown} {image['key']}[{image['index']}]"
    return shown


def _in_split_order(ds: Dataset, records: list[Record]) -> list[Record]:
    """Train before val before test, then by path: examples read in the order data flows."""
    order = {s: k for k, s in enumerate(ds.split_names())}
    return sorted(records, key=lambda r: (order.get(r.split or "", len(order)), r.path,
                                          r.key or "", r.index or 0, r.slice or 0))


def _splits_of(ds: Dataset, records: list[Record]) -> list[str]:
    present = {r.split for r in records}
    return [s for s in ds.split_names() if s in present]


def _exact_duplicates(ds: Dataset, decoded: list[int], keys: list[str],
                      base: str) -> list[dict[str, Any]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for i, key in zip(decoded, keys, strict=True):
        groups[key].append(ds.records[i])
    found: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for recs in groups.values():
        if len(recs) > 1:
            recs = _in_split_order(ds, recs)
            splits = _splits_of(ds, recs)
            found[len(splits) > 1].append({
                "splits": splits, "conflicting_labels": len({_label_key(r) for r in recs}) > 1,
                "images": [_image(ds, r) for r in recs]})
    out = []
    for across, items in found.items():
        if not items:
            continue
        example = " = ".join(_named(im, base) for im in items[0]["images"])
        conflicts = sum(it["conflicting_labels"] for it in items)
        why = ("the model would be tested on images it trained on" if across
               else "each counts, and weighs in training, more than once")
        message = (f"{len(items)} group(s) of byte-identical files "
                   f"{'span splits' if across else 'within one split'}: {why}"
                   + (f"; {conflicts} with different labels" if conflicts else "")
                   + f" (e.g. {example})")
        out.append(_problem("duplicate_across_splits" if across else "duplicate_within_split",
                            across, items,
                            [im["path"] for it in items for im in it["images"]], message))
    return out


def _near_duplicates(ds: Dataset, decoded: list[int], keys: list[str], bits: np.ndarray,
                     threshold: int, base: str) -> list[dict[str, Any]]:
    found: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    rows, cols, dists = _near_pairs(bits, threshold)
    order = np.lexsort((cols, rows, dists))  # closest first, then in file order
    for a, b, d in zip(rows[order].tolist(), cols[order].tolist(), dists[order].tolist(),
                       strict=True):
        if keys[a] == keys[b]:
            continue  # byte-identical: already a duplicate
        recs = _in_split_order(ds, [ds.records[decoded[a]], ds.records[decoded[b]]])
        splits = _splits_of(ds, recs)
        found[len(splits) > 1].append({
            "distance": d, "splits": splits,
            "conflicting_labels": _label_key(recs[0]) != _label_key(recs[1]),
            "images": [_image(ds, r) for r in recs]})
    out = []
    for across, items in found.items():
        if not items:
            continue
        first = items[0]
        example = (" ~ ".join(_named(im, base) for im in first["images"])
                   + f", {first['distance']} bits")
        why = ("a resized or re-encoded copy is still the same image, so the model would be "
               "tested on images it trained on" if across
               else "probably the same image twice")
        message = (f"{len(items)} pair(s) of near-identical images (perceptual hashes within "
                   f"{threshold} of {HASH_BITS} bits) "
                   f"{'span splits' if across else 'within one split'}: {why} (e.g. {example})")
        out.append(_problem(
            "near_duplicate_across_splits" if across else "near_duplicate_within_split",
            across, items, [im["path"] for it in items for im in it["images"]], message))
    return out


def _near_pairs(bits: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``i < j`` of ``bits`` (packed hashes, a multiple of 8 bytes each) that differ in at
    most ``threshold`` bits, and their distances.

    Every pair is compared: the upper triangle of the distance matrix, a block of rows at a
    time, so memory stays near ``_BLOCK_WORDS`` words whatever the number of images.
    """
    words = np.ascontiguousarray(bits).view(np.uint64)
    n, width = words.shape
    rows_per_block = max(1, _BLOCK_WORDS // max(1, n * width))
    found_i, found_j, found_d = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [
        np.zeros(0, np.int32)]
    for start in range(0, n, rows_per_block):
        block = words[start:start + rows_per_block]
        dist = _popcount(block[:, None, :] ^ words[None, start:, :]).sum(axis=2, dtype=np.int32)
        r, c = np.nonzero(dist <= threshold)
        keep = c > r  # column c is image start + c, row r is image start + r
        r, c = r[keep], c[keep]
        found_i.append(start + r)
        found_j.append(start + c)
        found_d.append(dist[r, c])
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per element of an unsigned array, last axis widened to bytes on old numpy."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0; the project allows 1.26
        return np.bitwise_count(x)
    return _BYTE_BITS[np.ascontiguousarray(x).view(np.uint8)]


def _patients_in_several_splits(ds: Dataset, base: str) -> list[dict[str, Any]]:
    names = ds.split_names()
    pairs = {(a, b): patient_overlap(ds, a, b) for k, a in enumerate(names)
             for b in names[k + 1:]}
    leaked = sorted({p for ids in pairs.values() for p in ids})
    if not leaked:
        return []
    images: dict[str, list[Record]] = defaultdict(list)
    chosen = set(leaked)
    for r in _in_split_order(ds, ds.records):
        if r.patient_id in chosen:
            images[r.patient_id].append(r)
    items = [{"patient": p, "splits": _splits_of(ds, images[p]),
              "images": [_image(ds, r) for r in images[p]]} for p in leaked]
    where = ", ".join(f"{a} and {b}: {len(ids)}" for (a, b), ids in pairs.items() if ids)
    first = items[0]
    example = f"{first['patient']}: " + ", ".join(_named(im, base)
                                                   for im in first["images"][:3])
    message = (f"{len(leaked)} patient(s) have images in more than one split ({where}): "
               f"split by patient so that none is on both sides (e.g. {example})")
    return [_problem("patient_in_several_splits", True, items,
                     [im["path"] for it in items for im in it["images"]], message)]


def _balance(counts: dict[str, int]) -> float | None:
    """Minority over majority class size among the classes present; None if only one is."""
    values = [v for v in counts.values() if v]
    return round(min(values) / max(values), 3) if len(values) > 1 else None


def _notes(ds: Dataset, counts: dict[str, dict[str, int]], balance: dict[str, float | None],
           sizes: Counter[str], formats: Counter[str],
           structure: dict[str, Any] | None) -> list[str]:
    notes = []
    for split, c in counts.items():
        ratio = balance[split]
        if ratio is not None and ratio < 0.5:
            shown = ", ".join(f"{k} {v}" for k, v in c.items())
            notes.append(f"{split}: classes imbalanced ({shown}; minority/majority {ratio:.2f} "
                         "< 0.5): medtl weights classes 'balanced' automatically; read "
                         "balanced accuracy and AUC rather than accuracy")
        missing = [k for k, v in c.items() if not v]
        if missing:
            notes.append(f"{split}: no images of {', '.join(missing)}")
    if len(sizes) > 1:
        notes.append(f"{len(sizes)} different image sizes (most common: "
                     f"{', '.join(f'{k} x{v}' for k, v in sizes.most_common(3))}); all are "
                     "resized to the backbone's input")
    if len(formats) > 1:
        notes.append("mixed pixel formats in the files: "
                     f"{', '.join(f'{k} x{v}' for k, v in formats.most_common())}; all are "
                     "decoded to 8-bit RGB")
    if structure is None:
        notes.append("patients unknown: pass --patient-regex (or a manifest patient_id column) "
                     "so that splits and checks can group images by patient")
    else:
        several = {s: v["patients_in_several_classes"] for s, v in structure.items()
                   if v["patients_in_several_classes"]}
        if several:
            notes.append("patients with images in several classes ("
                         f"{', '.join(f'{s}: {n}' for s, n in several.items())}): expected for "
                         "follow-up images, a labelling error otherwise")
    return notes


def _label_notes(per_label: dict[str, dict[str, dict[str, int]]],
                 balance: dict[str, dict[str, float | None]]) -> list[str]:
    """Multi-label notes: imbalanced labels and labels without positives, per split, and the
    unknown values that losses and metrics will mask."""
    notes = []
    for split, by_label in per_label.items():
        skewed = [f"{name} {c['positive']}/{c['negative']}" for name, c in by_label.items()
                  if (r := balance[split][name]) is not None and r < 0.5]
        if skewed:
            notes.append(f"{split}: labels imbalanced (positive/negative: {', '.join(skewed)}; "
                         "minority/majority < 0.5): read each label's AUC and average "
                         "precision rather than accuracy")
        missing = [name for name, c in by_label.items() if not c["positive"]]
        if missing:
            notes.append(f"{split}: no positive images of {', '.join(missing)}")
    unknown = {split: {name: c["unknown"] for name, c in by_label.items() if c["unknown"]}
               for split, by_label in per_label.items()}
    if any(unknown.values()):
        shown = "; ".join(f"{split}: " + ", ".join(f"{k} {v}" for k, v in u.items())
                          for split, u in unknown.items() if u)
        notes.append(f"unknown label values (blank, or -1 under --uncertain ignore) are left "
                     f"out of losses and metrics ({shown})")
    return notes


def _patient_structure(ds: Dataset) -> dict[str, Any] | None:
    """Per split: patients, images, images per patient (min/median/max), patients in several
    classes (multi-label: in several label combinations); None when no image has a patient."""
    if not any(ds.patients):
        return None
    out: dict[str, Any] = {}
    for split in ds.split_names():
        part = [r for r in ds.records if r.split == split]
        per = Counter(r.patient_id for r in part if r.patient_id)
        classes: dict[str, set[object]] = defaultdict(set)
        for r in part:
            if r.patient_id:
                classes[r.patient_id].add(_label_key(r))
        n = sorted(per.values())
        out[split] = {
            "patients": len(per), "images": len(part),
            "images_per_patient": ({"min": n[0], "median": float(np.median(n)), "max": n[-1]}
                                   if n else None),
            "patients_in_several_classes": sum(1 for c in classes.values() if len(c) > 1)}
    return out


def _base_folder(source: str | os.PathLike[str]) -> str:
    """Where paths in messages are shown from: the data folder, or the manifest's folder."""
    p = Path(os.path.abspath(source))
    return str(p if p.is_dir() else p.parent)


def _shown(path: str, base: str) -> str:
    """A path relative to the data folder when under it: short enough for one line."""
    prefix = base.rstrip(os.sep) + os.sep
    return path[len(prefix):] if path.startswith(prefix) else path


def _pixel_format(record: Record) -> str:
    """The stored pixel format: Pillow's mode for image files, else the container."""
    from PIL import Image

    if record.is_volume:
        return "volume"
    if record.key is not None:
        return "array"
    p = Path(record.path)
    if p.suffix.lower() in DICOM_EXTENSIONS:
        return "DICOM"
    try:
        with Image.open(p) as img:  # header only: the pixels were decoded already
            return img.mode
    except Exception:  # noqa: BLE001 - the decode succeeded; this is only a label
        return "unknown"


def _modality(path: str) -> str:
    """DICOM Modality and BodyPartExamined (first slice of a series), else the file type."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".dcm")
        p = files[0] if files else p
    if p.suffix.lower() == ".dcm":
        from medtl.data.dicom import dicom_tags

        try:
            tags = dicom_tags(p)
        except DataReadError:
            return "DICOM (unreadable)"
        return " ".join(t for t in (tags["modality"] or "DICOM", tags["body_part"]) if t)
    if ".nii" in p.name.lower():
        return "NIfTI volume"
    return p.suffix.lower().lstrip(".") or "unknown"

