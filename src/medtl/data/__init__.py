"""Data: load image sources into a :class:`Dataset`, read images, split by patient."""

from medtl.data.checks import check_dataset, dataset_summary
from medtl.data.dataset import Dataset, Record
from medtl.data.readers import IMAGE_EXTENSIONS, read_image
from medtl.data.samples import DEMO_PATIENT_REGEX, demo_data_path
from medtl.data.sources import dataset_from_files, load_dataset
from medtl.data.splits import (
    KERMANY_PATIENT_REGEX,
    assert_no_patient_overlap,
    carve_validation,
    kfold_indices,
    patient_from_name,
    patient_overlap,
)

__all__ = [
    "DEMO_PATIENT_REGEX",
    "IMAGE_EXTENSIONS",
    "KERMANY_PATIENT_REGEX",
    "Dataset",
    "Record",
    "assert_no_patient_overlap",
    "carve_validation",
    "check_dataset",
    "dataset_from_files",
    "dataset_summary",
    "demo_data_path",
    "kfold_indices",
    "load_dataset",
    "patient_from_name",
    "patient_overlap",
    "read_image",
]
