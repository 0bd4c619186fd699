"""The model a server answers with: an exported bundle (ONNX, no PyTorch), and when a run
directory was given, the run's torch model too, for Grad-CAM.

A run is exported into a temporary folder first (``medtl.export.writer.export_run``), so a
run and its bundle answer /v1/predict with the same graph; the folder is removed on
:meth:`Served.close`.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtl.errors import MedtlError
from medtl.export.bundle import ExportedEnsemble, ExportedModel, is_bundle, load_bundle


@dataclass
class Served:
    """A loaded bundle, its id, and the run's explainer when a run is served."""

    model: ExportedModel | ExportedEnsemble
    id: str
    explainer: Any = None  # medtl.explain.Explainer of the run (Grad-CAM), or None
    clf: Any = None  # the run's loaded classifier, with ``explainer``
    temporary: Path | None = None  # the export folder of a served run, removed on close
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def explain_method(self) -> str:
        """gradcam when the run's torch model has gradients, else occlusion on the ONNX model
        (a bundle, or a hybrid run whose SVM/forest/kNN head has none)."""
        return "gradcam" if self.explainer is not None else "occlusion"

    def close(self) -> None:
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None


def load_served(path: str | Path) -> Served:
    """A bundle (``medtl export``) or a run directory (``medtl train``) ready to serve; a run
    is exported to a temporary folder and keeps its torch model for Grad-CAM. Every problem is
    a MedtlError (a tampered bundle included)."""
    p = Path(path)
    if not p.exists():
        raise MedtlError(f"{path}: no such run or bundle")
    if is_bundle(p):
        return Served(model=load_bundle(p), id=p.resolve().name)
    if not (p / "config.json").is_file():
        raise MedtlError(f"{path}: neither a bundle (medtl export) nor a run directory "
                         "(medtl train)")
    # torch is imported only here: serving a bundle never needs it
    from medtl.explain import Explainer
    from medtl.export.writer import export_run
    from medtl.run import load_run

    run = load_run(p)
    folder = Path(tempfile.mkdtemp(prefix="medtl-serve-"))
    try:
        bundle = export_run(run, folder / "bundle")
        model = load_bundle(bundle)
        clf = run.load_model(device="cpu", quiet=True)
        # An ensemble's /v1/explain: occlusion on its bundle, the members combined (one
        # Grad-CAM module cannot stand for members of several input sizes)
        explainer = None if run.kind == "ensemble" else Explainer.for_classifier(clf)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Served(model=model, id=run.path.resolve().name, temporary=folder, clf=clf,
                  explainer=explainer if explainer is not None and explainer.differentiable
                  else None)
