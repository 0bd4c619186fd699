"""Write a medtl manifest for NIH ChestX-ray14 or CheXpert, with their official splits.

    python scripts/public_manifests.py chestxray14 ROOT OUT.csv
    python scripts/public_manifests.py chexpert ROOT OUT.csv

Why: neither download is a layout medtl reads as it is.

- **ChestX-ray14** (NIH, Wang et al. 2017). ROOT holds ``Data_Entry_2017*.csv`` (columns
  ``Image Index``, ``Finding Labels`` with ``|`` between findings, ``Patient ID``, ...),
  ``train_val_list.txt`` and ``test_list.txt`` (the official patient-wise split), and the PNGs
  in any sub-folders (``images/`` or ``images_001/images/`` ... as the archives unpack). The
  manifest gets ``path,Finding Labels,patient_id,split``: medtl reads ``Finding Labels`` as
  the multi-label layout (``No Finding`` = every label absent), keeps the official test split
  and carves validation from train_val by patient.
- **CheXpert** (Irvin et al. 2019). ROOT is the unpacked ``CheXpert-v1.0-small`` (or the
  full-size) folder with ``train.csv`` and ``valid.csv``: columns ``Path`` (relative to ROOT's
  parent), ``Sex``, ``Age``, ``Frontal/Lateral``, ``AP/PA`` and the 14 observations with
  1.0 / 0.0 / -1.0 (uncertain) / blank (not mentioned). The manifest keeps those columns, adds
  ``patient_id`` (``patient00001`` from the path) and ``split``: train.csv is ``train`` and the
  official validation set (234 studies, labelled by radiologists' consensus) is ``test``, as in
  most papers; medtl carves its own validation from train by patient.

Only the standard library is used; no image is read or copied (the manifest lists absolute
paths). A listed image that is missing stops the script with its name (exit 2).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path


def chestxray14(root: Path) -> tuple[list[str], list[list[str]]]:
    entries = sorted(root.glob("Data_Entry_2017*.csv"))
    if not entries:
        raise SystemExit(_fail(f"{root}: no Data_Entry_2017*.csv"))
    lists = {}
    for name in ("train_val_list.txt", "test_list.txt"):
        path = root / name
        if not path.is_file():
            raise SystemExit(_fail(f"{root}: no {name} (the official split)"))
        lists[name] = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    images = {p.name: p for p in root.rglob("*.png")}
    rows = []
    with open(entries[0], newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            name = row["Image Index"].strip()
            if name not in images:
                raise SystemExit(_fail(f"{entries[0]}: {name} is listed but not under {root}"))
            split = ("test" if name in lists["test_list.txt"] else
                     "train" if name in lists["train_val_list.txt"] else None)
            if split is None:
                continue  # in neither official list: not part of the benchmark
            rows.append([str(images[name].resolve()), row["Finding Labels"].strip(),
                         row["Patient ID"].strip(), split])
    return ["path", "Finding Labels", "patient_id", "split"], rows


def chexpert(root: Path) -> tuple[list[str], list[list[str]]]:
    header: list[str] | None = None
    rows = []
    for name, split in (("train.csv", "train"), ("valid.csv", "test")):
        path = root / name
        if not path.is_file():
            raise SystemExit(_fail(f"{root}: no {name}"))
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            head = next(reader)
            if header is None:
                header = head
            elif head != header:
                raise SystemExit(_fail(f"{path}: its columns differ from train.csv's"))
            for row in reader:
                rel = row[0]
                image = root.parent / rel
                if not image.is_file():
                    raise SystemExit(_fail(f"{path}: {rel} is listed but not under "
                                           f"{root.parent}"))
                patient = re.search(r"patient\d+", rel)
                rows.append([str(image.resolve()), *row[1:],
                             patient.group(0) if patient else "", split])
    assert header is not None
    return ["path", *header[1:], "patient_id", "split"], rows


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=("chestxray14", "chexpert"))
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        return _fail(f"{args.root}: not a folder")
    header, rows = (chestxray14 if args.dataset == "chestxray14" else chexpert)(args.root)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    per_split: dict[str, int] = {}
    for row in rows:
        per_split[row[-1]] = per_split.get(row[-1], 0) + 1
    print(f"{args.out}: {len(rows)} images ({', '.join(f'{s} {n}' for s, n in per_split.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
