"""Manifests of Kermany's chest X-rays with the second label their file names carry.

    python scripts/kermany_labels.py SRC OUT [--relative]

Why: medtl issue 21 needs real X-rays with more than one label, and no public multi-label
chest X-ray set is available offline. Kermany's pneumonia files name their cause
(``person12_bacteria_47.jpeg``, ``person3_virus_11.jpeg``), so the same images give a
three-class task (the anchor of Kermany et al. 2018's bacterial-vs-viral result) and a
two-label task {pneumonia, viral} (viral implies pneumonia). No image is copied: the manifests
point at the originals.

SRC is the Kermany folder: ``{train,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (the official split). OUT
receives

- ``three_class.csv``: ``path,label,patient_id,split``, label ``normal`` / ``bacterial`` /
  ``viral`` (a single-label manifest);
- ``two_label.csv``: ``path,pneumonia,viral,patient_id,split`` with 1/0 (normal 0,0; bacterial
  1,0; viral 1,1): one column per label, the multi-label layout.

Rules (a file that fits none, or whose name contradicts its folder, stops the script with its
name, exit 2; hidden files such as ``.DS_Store`` are skipped):

- ``PNEUMONIA/person<N>_bacteria_<k>[_<j>].jpeg``: bacterial, patient ``person<N>``;
  ``PNEUMONIA/person<N>_virus_<k>[_<j>].jpeg``: viral, patient ``person<N>``;
- ``NORMAL/[NORMAL<m>-]IM-<N>-<k>[-<j>].jpeg``: normal, patient ``IM-<N>``.

The patient ids are those of the data README and of medtl's ``KERMANY_PATIENT_REGEX``
(``(person\\d+|IM-\\d+)``), so this manifest groups images exactly as ``medtl train
--patient-regex`` does. That rule may group more than one child under one id (the numbers
look like per-class series, see the printed notes); grouping too much never leaks a patient
across a carved split, it only makes the groups coarser.

Splits are the folders' (``train``, ``test``); medtl carves validation from train by patient.
A ``val/`` folder (the official 16-image validation split, if SRC has one) is written as
``train``: 16 images without a single viral one cannot choose a threshold, and medtl's carved
validation can. Paths are absolute, or with ``--relative`` relative to OUT (medtl reads a
manifest's relative paths from the manifest's folder).

Prints images and patients per split and label, and notes on the patient ids: patients with
both bacterial and viral images, and patients in both train and test.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SPLIT_FOLDERS = {"train": "train", "val": "train", "test": "test"}  # folder -> split written
REQUIRED_SPLITS = ("train", "test")
CLASS_FOLDERS = ("NORMAL", "PNEUMONIA")
LABELS = ("normal", "bacterial", "viral")
# The two-label columns of each three-class label: (pneumonia, viral).
TWO_LABEL = {"normal": (0, 0), "bacterial": (1, 0), "viral": (1, 1)}
PNEUMONIA_NAME = re.compile(r"(person\d+)_(bacteria|virus)_\d+(?:_\d+)?(?i:\.jpe?g)")
NORMAL_NAME = re.compile(r"(?:NORMAL\d+-)?(IM-\d+)-\d+(?:-\d+)?(?i:\.jpe?g)")
CAUSE = {"bacteria": "bacterial", "virus": "viral"}


class LayoutError(Exception):
    """SRC is not in the Kermany layout, or a file name fits no rule (exit 2, one line)."""


@dataclass(frozen=True)
class Image:
    path: str  # absolute
    label: str  # one of LABELS
    patient_id: str
    split: str  # train or test


def parse_name(name: str, folder: str) -> tuple[str, str]:
    """(label, patient_id) of a Kermany file name found in ``folder`` (NORMAL or PNEUMONIA)."""
    pneumonia = PNEUMONIA_NAME.fullmatch(name)
    normal = NORMAL_NAME.fullmatch(name)
    if folder == "PNEUMONIA" and pneumonia:
        return CAUSE[pneumonia.group(2)], pneumonia.group(1)
    if folder == "NORMAL" and normal:
        return "normal", normal.group(1)
    if pneumonia or normal:
        said = CAUSE[pneumonia.group(2)] if pneumonia else "normal"
        raise LayoutError(f"{folder}/{name}: the file name says {said}, the folder {folder}")
    expected = ("person<N>_bacteria_<k>.jpeg or person<N>_virus_<k>.jpeg"
                if folder == "PNEUMONIA" else "[NORMAL<m>-]IM-<N>-<k>.jpeg")
    raise LayoutError(f"{folder}/{name}: file name fits no rule (expected {expected})")


def read_images(src: Path) -> list[Image]:
    """Every image of SRC, in split, folder and name order."""
    if not src.is_dir():
        raise LayoutError(f"{src}: no such folder")
    images: list[Image] = []
    for folder_split, split in SPLIT_FOLDERS.items():
        if not (src / folder_split).is_dir():
            if folder_split in REQUIRED_SPLITS:
                raise LayoutError(f"{src}: no folder {folder_split}/; expected "
                                  "{train,test}/{NORMAL,PNEUMONIA}/*.jpeg")
            continue
        for folder in CLASS_FOLDERS:
            where = src / folder_split / folder
            if not where.is_dir():
                raise LayoutError(f"{src}: no folder {folder_split}/{folder}")
            names = sorted(e.name for e in os.scandir(where)
                           if e.is_file() and not e.name.startswith("."))
            if not names:
                raise LayoutError(f"{where}: no images")
            for name in names:
                label, pid = parse_name(name, folder)
                images.append(Image(os.path.abspath(where / name), label, pid, split))
    return images


def manifests(images: Sequence[Image], out: Path, *,
              relative: bool) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Rows of three_class.csv and two_label.csv, in the same order."""
    def shown(path: str) -> str:
        return os.path.relpath(path, os.path.abspath(out)) if relative else path

    three = [{"path": shown(i.path), "label": i.label, "patient_id": i.patient_id,
              "split": i.split} for i in images]
    two = [{"path": shown(i.path), "pneumonia": TWO_LABEL[i.label][0],
            "viral": TWO_LABEL[i.label][1], "patient_id": i.patient_id, "split": i.split}
           for i in images]
    return three, two


def summary(images: Sequence[Image]) -> dict[str, object]:
    """Images and patients per split and label, and the facts about the patient ids."""
    counts = {s: {lab: 0 for lab in LABELS} for s in REQUIRED_SPLITS}
    patients: dict[str, dict[str, set[str]]] = {s: {lab: set() for lab in LABELS}
                                                for s in REQUIRED_SPLITS}
    labels_of: dict[str, set[str]] = defaultdict(set)
    splits_of: dict[str, set[str]] = defaultdict(set)
    for i in images:
        counts[i.split][i.label] += 1
        patients[i.split][i.label].add(i.patient_id)
        labels_of[i.patient_id].add(i.label)
        splits_of[i.patient_id].add(i.split)
    mixed = {pid for pid, labs in labels_of.items() if {"bacterial", "viral"} <= labs}
    within = {s: len({pid for pid in mixed
                      if pid in patients[s]["bacterial"] and pid in patients[s]["viral"]})
              for s in REQUIRED_SPLITS}
    across = {pid for pid, ss in splits_of.items() if len(ss) > 1}
    return {
        "images": counts,
        "patients": {s: {lab: len(p) for lab, p in by.items()} for s, by in patients.items()},
        "patients_bacterial_and_viral": len(mixed),
        "patients_bacterial_and_viral_within_split": within,
        "patients_in_train_and_test": len(across),
        # The same id with the same label on both sides: 0 for a label whose ids were split by
        # patient (the official split), more where one id covers several series.
        "patients_in_train_and_test_same_label": {
            lab: len(patients["train"][lab] & patients["test"][lab]) for lab in LABELS},
        "patients_normal_and_pneumonia": sum(
            "normal" in labs and len(labs) > 1 for labs in labels_of.values()),
    }


def print_summary(facts: dict[str, object]) -> None:
    images, patients = facts["images"], facts["patients"]
    assert isinstance(images, dict) and isinstance(patients, dict)
    print(f"{'split':6} {'label':10} {'images':>7} {'patients':>9}")
    for split in REQUIRED_SPLITS:
        for label in LABELS:
            print(f"{split:6} {label:10} {images[split][label]:7d} {patients[split][label]:9d}")
        print(f"{split:6} {'all':10} {sum(images[split].values()):7d}")
    within = facts["patients_bacterial_and_viral_within_split"]
    same = facts["patients_in_train_and_test_same_label"]
    assert isinstance(within, dict) and isinstance(same, dict)
    print(f"patient ids with both bacterial and viral images: "
          f"{facts['patients_bacterial_and_viral']} (within train {within['train']}, within "
          f"test {within['test']}); with both normal and pneumonia images: "
          f"{facts['patients_normal_and_pneumonia']}")
    print(f"patient ids in both train and test: {facts['patients_in_train_and_test']} "
          "(medtl train warns and records them); with the same label on both sides: "
          + ", ".join(f"{lab} {n}" for lab, n in same.items()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="Kermany folder with train/ and test/")
    parser.add_argument("out", type=Path, help="folder for three_class.csv and two_label.csv")
    parser.add_argument("--relative", action="store_true",
                        help="paths relative to OUT instead of absolute")
    args = parser.parse_args(argv)
    try:
        images = read_images(args.src)
    except LayoutError as exc:
        print(f"kermany_labels: {exc}", file=sys.stderr)
        return 2
    from medtl.files import write_csv  # atomic: a half-written manifest never replaces one

    three, two = manifests(images, args.out, relative=args.relative)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "three_class.csv", three)
    write_csv(args.out / "two_label.csv", two)
    if (args.src / "val").is_dir():
        print("val/ found: its images are written as split train (medtl carves validation)")
    print_summary(summary(images))
    print(f"wrote three_class.csv and two_label.csv ({len(images)} images each) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
