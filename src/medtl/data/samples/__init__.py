"""Embedded demo data: a small, patient-disjoint sample of the Kermany paediatric chest X-rays.

``kermany_demo/{train,test}/{NORMAL,PNEUMONIA}/`` holds JPEGs copied byte for byte from the
224x224 copy of Kermany et al. (CC BY 4.0; see ``kermany_demo/ATTRIBUTION.md``), selected by
``scripts/make_demo_sample.py``. File names carry the patient: load with
``patient_regex=DEMO_PATIENT_REGEX`` so the carved validation split is grouped by patient.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from medtl.data.splits import KERMANY_PATIENT_REGEX

DEMO_PATIENT_REGEX = KERMANY_PATIENT_REGEX
DEMO_NAME = "kermany_demo"


def demo_data_path() -> Path:
    """Folder of the embedded demo sample (``train/`` and ``test/``, classes NORMAL, PNEUMONIA)."""
    resource = files(__name__) / DEMO_NAME
    # medtl is installed as plain files (not zipped), so the resource is a real folder; fall back
    # to this module's folder for unusual loaders that return a non-Path Traversable.
    return resource if isinstance(resource, Path) else Path(__file__).resolve().parent / DEMO_NAME
