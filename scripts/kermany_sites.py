"""Split the Kermany chest X-rays into three simulated hospital sites, by patient, with label skew.

    python scripts/kermany_sites.py --out DIR [--data DIR] [--seed 0]

Why: a federated-learning benchmark (medtl issue 19) needs sites that differ the way hospitals
do. Here they differ in case mix: site A sees mostly pneumonia (target 80 %), B half (50 %),
C mostly normal chests (20 %), in its training data and in its test data alike. Each site is
one CSV manifest (``path,label,patient_id,split``, absolute paths) that ``medtl`` reads as is.

How:

- The patient of a file is found with medtl's own ``KERMANY_PATIENT_REGEX``, applied as medtl
  applies it (``patient_from_name`` on the absolute path), so the grouping here is the one
  ``medtl check`` sees. A patient with both NORMAL and PNEUMONIA images stops the script.
- Test: every official test image goes to one site, so the three test sets pooled are exactly
  the official test set (targets A 72 N / 288 P, B 82 / 82, C 80 / 20).
- Training pool: the official train folder, minus the patients whose id also occurs in the
  official test folder (the official split reuses some ids; keeping them would put one patient
  in two splits). Targets A 300 N / 1,200 P, B 600 / 600, C 440 / 110. When the pool has fewer
  images of a class than its targets need, all training targets are scaled down by one factor,
  which keeps every site's pneumonia fraction; pneumonia images beyond the targets are left out.
- Patients are indivisible: per class they are shuffled with ``numpy.random.default_rng(seed)``,
  then each goes to the site furthest (relatively) below its target. A pool that is used whole
  (test, and normals) is placed largest patient first so that the small ones even out the
  remainders; a pool with a surplus is taken in shuffled order, and a patient who would push
  every site past its target is left out.
- Within each site and class, whole patients holding about 20 % of the training images
  (seeded, placed the same way) become ``val``, so val has the site's case mix too.

Writes ``site_a.csv``, ``site_b.csv``, ``site_c.csv`` and ``sites.json`` (counts of images and
patients per site, split and class, pneumonia fractions, targets, seed and command) to ``--out``
and prints the same as a table. The assignment is a function of the data and ``--seed`` only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtl.data import KERMANY_PATIENT_REGEX, patient_from_name
from medtl.data.splits import compile_patient_regex
from medtl.errors import MedtlError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray_kermany_224"
CLASSES = ("NORMAL", "PNEUMONIA")
OFFICIAL_SPLITS = ("train", "test")
SITES = ("site_a", "site_b", "site_c")
# Image targets per site, in CLASSES order.
TEST_TARGETS = {"site_a": (72, 288), "site_b": (82, 82), "site_c": (80, 20)}
TRAIN_TARGETS = {"site_a": (300, 1200), "site_b": (600, 600), "site_c": (440, 110)}
VAL_FRACTION = 0.2
EXTENSIONS = (".jpeg", ".jpg")


class LayoutError(Exception):
    """The data folder is missing or not in the Kermany layout (exit 2, one line)."""


@dataclass
class Patient:
    pid: str
    label: str
    files: list[str] = field(default_factory=list)


def read_pool(data: Path) -> dict[str, dict[str, dict[str, Patient]]]:
    """``pool[official_split][class][patient_id]``: the images of each patient, sorted."""
    if not data.is_dir():
        raise LayoutError(f"{data}: no such folder")
    regex = compile_patient_regex(KERMANY_PATIENT_REGEX)
    pool: dict[str, dict[str, dict[str, Patient]]] = {}
    label_of: dict[str, tuple[str, str]] = {}  # patient -> (label, a file), across both splits
    for split in OFFICIAL_SPLITS:
        pool[split] = {}
        for label in CLASSES:
            folder = data / split / label
            if not folder.is_dir():
                raise LayoutError(f"{data}: no folder {split}/{label}; expected "
                                  "{train,test}/{NORMAL,PNEUMONIA}/*.jpeg")
            files = sorted(os.path.abspath(f) for f in folder.iterdir()
                           if f.is_file() and f.suffix.lower() in EXTENSIONS)
            if not files:
                raise LayoutError(f"{folder}: no .jpeg images")
            patients: dict[str, Patient] = {}
            for file in files:
                try:
                    pid = patient_from_name(file, regex)
                except MedtlError as exc:
                    raise LayoutError(str(exc)) from None
                seen = label_of.setdefault(pid, (label, file))
                if seen[0] != label:
                    raise LayoutError(f"patient {pid} has both {seen[0]} ({seen[1]}) and "
                                      f"{label} ({file}) images; a label-skewed split by "
                                      "patient is undefined")
                patients.setdefault(pid, Patient(pid, label)).files.append(file)
            pool[split][label] = patients
    return pool


def assign(patients: Sequence[Patient], targets: dict[str, int], rng: np.random.Generator,
           *, use_all: bool) -> tuple[dict[str, list[Patient]], list[Patient]]:
    """Whole patients to sites, towards image ``targets``; returns (per site, left out).

    Shuffled, then each patient goes to the site with the largest relative deficit among those
    it fits (its images not more than the deficit). With ``use_all`` every patient is placed,
    largest first, in the neediest site when it fits none; without, such a patient is left out.
    """
    order = [patients[i] for i in rng.permutation(len(patients))]
    if use_all:
        order.sort(key=lambda p: -len(p.files))  # stable: equal sizes keep the shuffled order
    got = {s: 0 for s in targets}
    placed: dict[str, list[Patient]] = {s: [] for s in targets}
    left_out: list[Patient] = []

    def need(s: str) -> float:
        return (targets[s] - got[s]) / targets[s] if targets[s] else -np.inf

    for p in order:
        n = len(p.files)
        fits = [s for s in targets if n <= targets[s] - got[s]]
        candidates = fits or (list(targets) if use_all else [])
        if not candidates:
            left_out.append(p)
            continue
        site = max(candidates, key=need)  # ties: first site
        placed[site].append(p)
        got[site] += n
    return placed, left_out


def carve_val(patients: list[Patient], rng: np.random.Generator) -> tuple[list[Patient],
                                                                           list[Patient]]:
    """(train, val) of one class of one site: whole patients, about ``VAL_FRACTION`` of the
    images in val (placed as :func:`assign` places a pool used whole)."""
    n_images = sum(len(p.files) for p in patients)
    n_val = round(VAL_FRACTION * n_images)
    placed, _ = assign(patients, {"train": n_images - n_val, "val": n_val}, rng, use_all=True)
    return placed["train"], placed["val"]


def scaled_train_targets(pool: dict[str, dict[str, Patient]]) -> tuple[float,
                                                                      dict[str, tuple[int, ...]]]:
    """One factor (at most 1) for all training targets, so that each class's targets fit in its
    pool; the site fractions stay as designed."""
    available = [sum(len(p.files) for p in pool[c].values()) for c in CLASSES]
    wanted = [sum(t[k] for t in TRAIN_TARGETS.values()) for k in range(len(CLASSES))]
    factor = min(1.0, *(a / w for a, w in zip(available, wanted, strict=True)))
    return factor, {s: tuple(round(factor * n) for n in t) for s, t in TRAIN_TARGETS.items()}


def counts(rows: list[dict[str, str]]) -> dict[str, Any]:
    images = {c: sum(r["label"] == c for r in rows) for c in CLASSES}
    patients = {c: len({r["patient_id"] for r in rows if r["label"] == c}) for c in CLASSES}
    total = sum(images.values())
    frac = images["PNEUMONIA"] / total if total else None
    return {"images": images, "patients": patients, "n_images": total,
            "n_patients": sum(patients.values()),
            "pneumonia_fraction": None if frac is None else round(frac, 4)}


def check_disjoint(rows: dict[str, list[dict[str, str]]]) -> None:
    """No patient in two sites or two splits (an internal error if one is)."""
    where: dict[str, tuple[str, str]] = {}
    for site, site_rows in rows.items():
        for r in site_rows:
            if where.setdefault(r["patient_id"], (site, r["split"])) != (site, r["split"]):
                raise AssertionError(f"patient {r['patient_id']} in {where[r['patient_id']]} "
                                     f"and {(site, r['split'])}")


def build(data: Path, seed: int) -> tuple[dict[str, list[dict[str, str]]], dict[str, Any]]:
    """Rows of each site's manifest and the facts of the assignment."""
    pool = read_pool(data)
    rng = np.random.default_rng(seed)
    test_ids = {pid for c in CLASSES for pid in pool["test"][c]}
    train_pool = {c: {pid: p for pid, p in pool["train"][c].items() if pid not in test_ids}
                  for c in CLASSES}
    factor, train_targets = scaled_train_targets(train_pool)
    rows: dict[str, list[dict[str, str]]] = {s: [] for s in SITES}

    def add(site: str, patients: list[Patient], split: str) -> None:
        rows[site].extend({"path": f, "label": p.label, "patient_id": p.pid, "split": split}
                          for p in patients for f in p.files)

    left_out: dict[str, int] = {}
    for k, label in enumerate(CLASSES):
        placed, rest = assign(list(pool["test"][label].values()),
                              {s: TEST_TARGETS[s][k] for s in SITES}, rng, use_all=True)
        assert not rest
        for site in SITES:
            add(site, placed[site], "test")
    for k, label in enumerate(CLASSES):
        patients = list(train_pool[label].values())
        targets = {s: train_targets[s][k] for s in SITES}
        # The class that set the scale is used whole (rounding aside); a surplus is not.
        wanted = sum(TRAIN_TARGETS[s][k] for s in SITES)
        use_all = sum(len(p.files) for p in patients) <= round(factor * wanted)
        placed, rest = assign(patients, targets, rng, use_all=use_all)
        left_out[label] = sum(len(p.files) for p in rest)
        for site in SITES:
            train, val = carve_val(placed[site], rng)
            add(site, train, "train")
            add(site, val, "val")
    check_disjoint(rows)

    overlap = {c: {pid: p for pid, p in pool["train"][c].items() if pid in test_ids}
               for c in CLASSES}
    facts = {
        "official": {s: {c: sum(len(p.files) for p in pool[s][c].values()) for c in CLASSES}
                     for s in OFFICIAL_SPLITS},
        "train_excluded_test_patients": {
            c: {"images": sum(len(p.files) for p in overlap[c].values()),
                "patients": len(overlap[c])} for c in CLASSES},
        "train_left_out_images": left_out,
        "train_target_scale": round(factor, 4),
        "targets": {s: {"train+val": dict(zip(CLASSES, train_targets[s], strict=True)),
                        "test": dict(zip(CLASSES, TEST_TARGETS[s], strict=True))}
                    for s in SITES},
    }
    return rows, facts


def summary(rows: dict[str, list[dict[str, str]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for site in SITES:
        by_split = defaultdict(list)
        for r in rows[site]:
            by_split[r["split"]].append(r)
        out[site] = {split: counts(by_split[split]) for split in ("train", "val", "test")}
        out[site]["train+val"] = counts(by_split["train"] + by_split["val"])
    return out


def print_table(per_site: dict[str, dict[str, Any]], facts: dict[str, Any]) -> None:
    print(f"{'site':7} {'split':9} {'NORMAL':>7} {'PNEU':>6} {'pat N':>6} {'pat P':>6} "
          f"{'% pneu':>7} {'target':>7}")
    for site in SITES:
        for split in ("train", "val", "train+val", "test"):
            c = per_site[site][split]
            target = facts["targets"][site].get(split)
            tfrac = (f"{100 * target['PNEUMONIA'] / sum(target.values()):.1f}" if target
                     else "")
            frac = c["pneumonia_fraction"]
            print(f"{site:7} {split:9} {c['images']['NORMAL']:7d} {c['images']['PNEUMONIA']:6d} "
                  f"{c['patients']['NORMAL']:6d} {c['patients']['PNEUMONIA']:6d} "
                  f"{'' if frac is None else f'{100 * frac:.1f}':>7} {tfrac:>7}")
    ex = facts["train_excluded_test_patients"]
    print(f"training pool: official train minus patients also in official test "
          f"({ex['NORMAL']['images']} NORMAL / {ex['PNEUMONIA']['images']} PNEUMONIA images "
          f"excluded); targets scaled by {facts['train_target_scale']:.4f}; left out "
          f"{facts['train_left_out_images']['NORMAL']} NORMAL / "
          f"{facts['train_left_out_images']['PNEUMONIA']} PNEUMONIA training images")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"Kermany folder with train/ and test/ (default {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, required=True, help="folder for the manifests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the assignment (0)")
    args = parser.parse_args(argv)
    try:
        rows, facts = build(args.data, args.seed)
    except LayoutError as exc:
        print(f"kermany_sites: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for site in SITES:
        with open(args.out / f"{site}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=("path", "label", "patient_id", "split"))
            writer.writeheader()
            writer.writerows(rows[site])
    per_site = summary(rows)
    argv_used = list(sys.argv[1:] if argv is None else argv)
    record = {
        "seed": args.seed,
        "command": shlex.join(["python", "scripts/kermany_sites.py", *argv_used]),
        "data": os.path.abspath(args.data),
        **facts,
        "sites": per_site,
    }
    (args.out / "sites.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print_table(per_site, facts)
    print(f"wrote {', '.join(f'{s}.csv' for s in SITES)} and sites.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
