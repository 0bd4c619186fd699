"""Build medtl's embedded demo sample from the 224x224 Kermany chest X-rays.

    python scripts/make_demo_sample.py [--source DIR] [--out DIR] [--seed 0]

Selects, per class, about 150 training images from the official train folder and 50 test images
from the official test folder, at most two images per patient, and copies the JPEG files byte
for byte (names kept: they carry the patient). Patient ids that occur in the official test
folder are never taken for training, because the official split reuses ids on both sides.
Re-running with the same arguments reproduces the same files.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "chest_xray_kermany_224"
DEFAULT_OUT = REPO / "src" / "medtl" / "data" / "samples" / "kermany_demo"
# Same pattern as medtl.data.splits.KERMANY_PATIENT_REGEX; repeated so the script runs without
# medtl installed.
PATIENT = re.compile(r"(person\d+|IM-\d+)")
CLASSES = ("NORMAL", "PNEUMONIA")
MAX_BYTES = 10 * 1024 * 1024

ATTRIBUTION = """\
# Kermany demo sample: attribution and selection

## Source

Daniel Kermany, Kang Zhang, Michael Goldbaum, "Labeled Optical Coherence Tomography (OCT) and
Chest X-Ray Images for Classification", Mendeley Data, v2, 2018, doi:10.17632/rscbjbr9sj.2.
Licence: Creative Commons Attribution 4.0 International (CC BY 4.0),
https://creativecommons.org/licenses/by/4.0/. Described in Kermany et al., "Identifying Medical
Diagnoses and Treatable Diseases by Image-Based Deep Learning", Cell 172(5), 2018.

The images are paediatric chest X-rays (NORMAL vs PNEUMONIA). The files here come from the copy
resized to 224x224 JPEG (aspect ratio not kept) in the public GitHub repository
waliatushar/ai-pneumonia-detection (commit 362d6d1b). medtl changed nothing in them: each file
is a byte-for-byte copy with its original name.

## What medtl selected

Made by `scripts/make_demo_sample.py --seed {seed}` (reproducible):

- `train/`: from the official train folder, {train_normal} NORMAL and {train_pneumonia} PNEUMONIA
  images; `test/`: from the official test folder, {test_normal} NORMAL and {test_pneumonia}
  PNEUMONIA images. Total {n_files} files, {megabytes:.2f} MB.
- Patients are chosen in a seeded random order, at most {max_per_patient} images per patient.
  The patient is in the file name (`person1946_bacteria_4874.jpeg` -> `person1946`,
  `IM-0115-0001.jpeg` and `NORMAL2-IM-1427-0001.jpeg` -> `IM-0115`, `IM-1427`); load with
  `patient_regex=medtl.data.DEMO_PATIENT_REGEX` to keep patients out of both train and val.
- No patient id is in both `train/` and `test/`: the official Kermany split reuses
  {shared_ids} patient ids across its train and test folders, so ids found in the official test
  folder were excluded from the training selection.
- This is a demonstration sample, far too small for results worth reporting.
"""


def patient_of(name: str) -> str:
    match = PATIENT.search(name)
    if match is None:
        raise SystemExit(f"{name}: no patient id in the file name")
    return match.group(1)


def by_patient(folder: Path) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in (".jpeg", ".jpg"):
            groups[patient_of(f.name)].append(f)
    return groups


def select(
    groups: dict[str, list[Path]], excluded: set[str], quota: int, per_patient: int, seed: str
) -> list[Path]:
    # A string seed is hashed deterministically by random.Random (unlike hash()).
    rng = random.Random(seed)
    patients = sorted(p for p in groups if p not in excluded)
    rng.shuffle(patients)
    chosen: list[Path] = []
    for patient in patients:
        if len(chosen) >= quota:
            break
        images = sorted(groups[patient])
        rng.shuffle(images)
        chosen.extend(images[: min(per_patient, quota - len(chosen))])
    if len(chosen) < quota:
        raise SystemExit(f"only {len(chosen)} images available for a quota of {quota}")
    return sorted(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--max-per-patient", type=int, default=2)
    args = parser.parse_args(argv)

    if not args.source.is_dir():
        print(f"{args.source}: Kermany 224x224 folder not found", file=sys.stderr)
        return 2
    official = {
        (split, cls): by_patient(args.source / split / cls)
        for split in ("train", "test")
        for cls in CLASSES
    }
    train_ids = {p for (s, _), g in official.items() if s == "train" for p in g}
    test_ids = {p for (s, _), g in official.items() if s == "test" for p in g}

    selection: dict[tuple[str, str], list[Path]] = {}
    for cls in CLASSES:
        selection["train", cls] = select(
            official["train", cls],
            test_ids,
            args.train_per_class,
            args.max_per_patient,
            f"{args.seed}-train-{cls}",
        )
        selection["test", cls] = select(
            official["test", cls],
            set(),
            args.test_per_class,
            args.max_per_patient,
            f"{args.seed}-test-{cls}",
        )

    for split in ("train", "test"):
        shutil.rmtree(args.out / split, ignore_errors=True)
    total = 0
    for (split, cls), files in selection.items():
        target = args.out / split / cls
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, target / f.name)
            total += f.stat().st_size

    n_files = sum(len(v) for v in selection.values())
    (args.out / "ATTRIBUTION.md").write_text(
        ATTRIBUTION.format(
            seed=args.seed,
            train_normal=len(selection["train", "NORMAL"]),
            train_pneumonia=len(selection["train", "PNEUMONIA"]),
            test_normal=len(selection["test", "NORMAL"]),
            test_pneumonia=len(selection["test", "PNEUMONIA"]),
            n_files=n_files,
            megabytes=total / 1e6,
            max_per_patient=args.max_per_patient,
            shared_ids=len(train_ids & test_ids),
        ),
        encoding="utf-8",
    )
    for (split, cls), files in selection.items():
        patients = {patient_of(f.name) for f in files}
        print(f"{split}/{cls}: {len(files)} images, {len(patients)} patients")
    print(f"total {n_files} files, {total / 1e6:.2f} MB -> {args.out}")
    if total >= MAX_BYTES:
        print(f"sample is {total / 1e6:.2f} MB; it must stay under 10 MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
