"""The run directory: its layout, its config.json schema, and how one is written safely.

This module alone knows the file names of a run and the shape of its ``config.json``. A run is
written in a hidden sibling, ``.NAME.partial/``, and renamed to ``NAME`` only once complete, so a
failed or killed (re)training never damages the run that was there; ``--resume`` continues the
unfinished one from its checkpoints. One process at a time writes a run (a lock file beside it),
and ``--overwrite`` replaces only what medtl wrote as a run (the ``.medtl-run`` marker).

Every file goes through the atomic, durable writer of :mod:`medtl.files`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import MedtlError
from medtl.files import LockHeldError, describe_holder, fsync_dir, hold_lock
from medtl.files import write_csv as write_csv
from medtl.files import write_json as write_json

# ------------------------------------------------------------------------------------ layout
CONFIG = "config.json"          # written last: its presence marks a complete run
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
HISTORY = "history.csv"
LOG = "log.txt"
REPORT = "report.html"
CV_TABLE = "cv.csv"             # cross-validation: one row of figures per fold
MODEL_DIR = "model"             # everything needed to predict: weights, head, model.json
MODEL_META = "model.json"
CHECKPOINTS = "checkpoints"     # only while a run is unfinished
FOLDS = "folds"                 # cross-validation: folds/fold-K, each a complete run
MARKER = ".medtl-run"           # "medtl wrote this directory as a run": --overwrite may replace it

RUN_FILES = (CONFIG, METRICS, PREDICTIONS, HISTORY, LOG, REPORT)

CONFIG_FORMAT = 2
KINDS = ("single", "cv", "model")
# What every config.json holds, and what each kind adds. Format 1 is medtl 0.1's three layouts
# (no "format" key), upgraded on reading.
_REQUIRED = ("backbone", "strategy", "head", "weights", "seed", "classes", "positive_class",
             "medtl_version")
_REQUIRED_BY_KIND = {"single": ("preprocessing", "view", "data"),
                     "cv": ("folds", "options", "view", "data"),
                     "model": ("preprocessing",)}


def fold_path(run_dir: str | Path, k: int) -> Path:
    """The run of fold ``k`` (from 1) of a cross-validation run."""
    return Path(run_dir) / FOLDS / f"fold-{k}"


def _siblings(out: Path) -> tuple[Path, Path, Path]:
    """(unfinished run, lock file, replaced run) beside ``out``: same folder, so same file
    system, so a rename between them is atomic."""
    out = Path(os.path.abspath(out))
    return (out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.lock"),
            out.with_name(f".{out.name}.replaced"))


def partial_dir(out: str | Path) -> Path:
    """Where the unfinished run of ``out`` is written (and its checkpoints kept)."""
    return _siblings(Path(out))[0]


def lock_file(out: str | Path) -> Path:
    """The lock file of ``out``, held by the process writing it."""
    return _siblings(Path(out))[1]


# ------------------------------------------------------------------------------------ config
def write_config(run_dir: str | Path, config: Mapping[str, Any]) -> None:
    """Write ``config.json`` (format :data:`CONFIG_FORMAT`) into ``run_dir``.

    ``config`` needs a ``kind`` (``single``: a trained and scored run; ``cv``: a
    cross-validation run whose folds are runs; ``model``: a model saved from Python) and the keys
    every kind has (see ``_REQUIRED``). Write it last: it marks the run complete.
    """
    kind = config.get("kind")
    if kind not in KINDS:
        raise ValueError(f"config.json: kind {kind!r} is not one of {KINDS}")
    missing = [k for k in (*_REQUIRED, *_REQUIRED_BY_KIND[kind]) if k not in config]
    if missing:
        raise ValueError(f"config.json of a {kind} run lacks {missing}")
    body = {k: v for k, v in config.items() if k not in ("format", "kind")}
    write_json(Path(run_dir) / CONFIG, {"format": CONFIG_FORMAT, "kind": kind, **body})


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """``run_dir``'s config.json in the current format, whichever medtl wrote it."""
    path = Path(run_dir) / CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedtlError(f"{run_dir}: no {CONFIG} (not a run, or an unfinished one)") from None
    except (OSError, ValueError) as exc:
        raise MedtlError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(cfg, dict):
        raise MedtlError(f"{path}: not a medtl run configuration")
    return upgrade_config(cfg, source=path)


def upgrade_config(cfg: Mapping[str, Any], *, source: str | Path = CONFIG) -> dict[str, Any]:
    """A config dict of any format brought to :data:`CONFIG_FORMAT`.

    medtl 0.1 wrote three layouts without a ``format`` key: ``medtl train`` (``data`` holds
    the source and fingerprint), ``medtl train --folds`` (``folds`` and ``params``; ``weights``
    as requested, the data options at the top) and ``TransferClassifier.save`` (no ``data``).
    """
    cfg = dict(cfg)
    fmt = cfg.get("format", 1)
    if not isinstance(fmt, int) or fmt > CONFIG_FORMAT:
        raise MedtlError(f"{source}: format {fmt!r} is newer than this medtl reads "
                         f"({CONFIG_FORMAT}); upgrade medtl")
    if fmt == CONFIG_FORMAT:
        return cfg
    if "folds" in cfg and "params" in cfg and "fold" not in cfg:
        kind = "cv"
        if not isinstance(cfg.get("weights"), dict):
            cfg["weights"] = {"requested": cfg.get("weights")}
        data = dict(cfg.get("data") or {})
        for key in ("patient_regex", "val_fraction"):
            if key in cfg:
                data.setdefault(key, cfg.pop(key))
        cfg["data"] = data
        cfg["options"] = cfg.pop("params")  # the training options, under their current name
    elif "data" in cfg:
        kind = "single"
    else:
        kind = "model"
    classes = list(cfg.get("classes") or [])
    cfg.setdefault("positive_class", classes[-1] if len(classes) == 2 else None)
    cfg.setdefault("medtl_version", "0.1.0")
    return {"format": CONFIG_FORMAT, "kind": kind, **cfg}


# ------------------------------------------------------------------------------------ marker
def write_marker(run_dir: str | Path) -> None:
    """Mark ``run_dir`` as written by medtl, so that ``--overwrite`` may replace it."""
    import medtl

    write_json(Path(run_dir) / MARKER, {"format": CONFIG_FORMAT,
                                        "medtl_version": medtl.__version__,
                                        "created": datetime.now(UTC).isoformat(
                                            timespec="seconds")})


def is_run(path: str | Path) -> bool:
    """Whether medtl wrote ``path`` as a run: it holds the marker, or it is a complete run of
    medtl 0.1 (which wrote no marker): a 0.1 config.json with its model, or with fold runs."""
    p = Path(path)
    if (p / MARKER).is_file():
        return True
    try:
        cfg = json.loads((p / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict) or "format" in cfg:
        return False
    if not {"backbone", "strategy", "classes"} <= cfg.keys():
        return False
    if "folds" in cfg and "fold" not in cfg:  # a cross-validation run, not one of its folds
        return (fold_path(p, 1) / MODEL_DIR / MODEL_META).is_file()
    return (p / MODEL_DIR / MODEL_META).is_file()


def resumable(out: str | Path) -> bool:
    """Whether ``train(out=..., resume=True)`` has something to continue: an unfinished run of
    ``out`` with a checkpoint or finished folds (in its partial sibling, or, as medtl 0.1 left
    them, in ``out`` itself)."""
    out = Path(out)
    return _has_progress(partial_dir(out)) or (not (out / CONFIG).is_file()
                                               and _has_progress(out))


def _has_progress(d: Path) -> bool:
    return d.is_dir() and ((d / FOLDS).is_dir() or any(d.rglob("*.pt")))


# ------------------------------------------------------------------------------------ writing
class RunDraft:
    """A run being written: files go into :attr:`path` (the partial sibling of :attr:`out`),
    and :meth:`commit` puts the finished run in place of ``out`` in one rename."""

    def __init__(self, out: Path, path: Path, resumed: bool) -> None:
        self.out = out
        self.path = path
        self.resumed = resumed
        self.committed = False

    def __repr__(self) -> str:
        return f"RunDraft({str(self.out)!r}, resumed={self.resumed})"

    def commit(self) -> Path:
        """Swap the finished run in: ``out`` aside, the new run in, the old one deleted. A crash
        between the two renames is repaired by the next :func:`writing_run` on ``out``."""
        if self.committed:
            return self.out
        if not (self.path / CONFIG).is_file():
            raise RuntimeError(f"{self.path}: commit before {CONFIG} was written")
        shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)  # only served resumption
        out = Path(os.path.abspath(self.out))
        _, _, replaced = _siblings(out)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            os.replace(out, replaced)
        os.replace(self.path, out)
        fsync_dir(out.parent)
        if replaced.exists():
            shutil.rmtree(replaced)
        self.committed = True
        return self.out


@contextmanager
def writing_run(out: str | Path, *, overwrite: bool = False, resume: bool = False,
                ) -> Iterator[RunDraft]:
    """Lock ``out``, check that it may be (re)written, and yield a :class:`RunDraft` whose
    ``path`` receives the run's files; on leaving the block without error the draft is
    committed (when :meth:`RunDraft.commit` was not called already).

    - ``out`` holding anything but a medtl run is refused, with or without ``overwrite``, and
      left as it is; a run is replaced only with ``overwrite``, and only once the new one is
      complete.
    - ``resume`` continues the unfinished run of ``out`` (its checkpoints, its finished folds).
      Without it, an unfinished run that could be resumed is not silently discarded: it needs
      ``overwrite``.
    - A second process on the same ``out`` gets a MedtlError naming the one that holds it.
    - On an error ``out`` is untouched; the draft stays for ``--resume`` when it holds a
      checkpoint or finished folds, and is removed otherwise.
    """
    out = Path(out)
    with ExitStack() as stack:
        try:
            stack.enter_context(hold_lock(lock_file(out), command=_command_line()))
        except LockHeldError as exc:
            raise MedtlError(f"{out}: in use by {describe_holder(exc.holder)}; wait for it to "
                             "finish or stop it") from None
        _repair_swap(out)
        draft = _resume_draft(out) if resume else _new_draft(out, overwrite)
        try:
            yield draft
        except BaseException:
            # Keep what --resume can continue; a draft with nothing of that is only litter.
            if not draft.resumed and not _has_progress(draft.path):
                shutil.rmtree(draft.path, ignore_errors=True)
            raise
        draft.commit()


def _command_line() -> str:
    """What the lock says this process is: ``medtl train ...`` for the CLI (whether started
    as ``medtl`` or ``python -m medtl.cli``), the script and its arguments otherwise."""
    if not sys.argv or not sys.argv[0]:
        return "python"
    prog = Path(sys.argv[0]).name
    if prog in ("medtl", "cli.py", "__main__.py"):
        prog = "medtl"
    return " ".join([prog, *sys.argv[1:]])


def _new_draft(out: Path, overwrite: bool) -> RunDraft:
    partial = partial_dir(out)
    if out.exists() and not out.is_dir():
        raise MedtlError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not is_run(out):
            raise MedtlError(f"{out}: refusing to replace a directory that is not a medtl run "
                             f"(no {MARKER} marker); nothing was changed. Choose another --out")
        if not overwrite:
            raise MedtlError(f"{out}: already holds a run; pass --overwrite to replace it (the "
                             "new run takes its place only once complete) or choose another "
                             "--out")
    _refuse_current_directory(out)
    if partial.exists():
        if _has_progress(partial) and not overwrite:
            raise MedtlError(f"{out}: an unfinished run of it is in {partial}; pass --resume to "
                             "continue it or --overwrite to start again")
        _remove_partial(partial)
    _make_partial(partial)
    return RunDraft(out, partial, resumed=False)


def _make_partial(partial: Path) -> None:
    """Create ``partial`` with its marker in one rename: a process killed at any moment leaves
    either no draft or a marked one, never an unmarked folder a later run must refuse."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    for stale in partial.parent.iterdir():  # from a process killed before that rename
        if (stale.name.startswith(f"{partial.name}.") and stale.name.endswith(".tmp")
                and stale.is_dir() and _left_by_medtl(stale)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = partial.with_name(f"{partial.name}.{os.urandom(4).hex()}.tmp")
    tmp.mkdir()
    write_marker(tmp)
    os.replace(tmp, partial)
    fsync_dir(partial.parent)


def _resume_draft(out: Path) -> RunDraft:
    partial = partial_dir(out)
    if not _has_progress(partial):
        if (out / CONFIG).is_file() or not _has_progress(out):
            where = partial / CHECKPOINTS
            done = "; the run there is complete" if (out / CONFIG).is_file() else ""
            raise MedtlError(f"{out}: nothing to resume (no checkpoint in {where}){done}")
        # An unfinished run in ``out`` itself, as medtl 0.1 left one: continue it as a draft.
        _refuse_current_directory(out)
        if partial.exists():
            _remove_partial(partial)
        write_marker(out)  # before the rename, so the draft is never unmarked
        os.replace(out, partial)
        fsync_dir(partial.parent)
    if not (partial / MARKER).is_file():
        write_marker(partial)
    return RunDraft(out, partial, resumed=True)


def _left_by_medtl(draft: Path) -> bool:
    """A draft folder holds the marker, or nothing but (the temporary file of) the marker."""
    return (draft / MARKER).is_file() or all(
        p.name.startswith(f".{MARKER}.") and p.name.endswith(".tmp") for p in draft.iterdir())


def _remove_partial(partial: Path) -> None:
    if not _left_by_medtl(partial):
        raise MedtlError(f"{partial}: not left by medtl (no {MARKER} marker); remove or rename "
                         "it yourself")
    shutil.rmtree(partial)


def _refuse_current_directory(out: Path) -> None:
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == here or target in here.parents:
        raise MedtlError(f"--out {out}: is the current directory (or holds it), which a run "
                         "cannot replace as a whole; choose a folder inside it")


def _repair_swap(out: Path) -> None:
    """Finish or undo a :meth:`RunDraft.commit` that a crash cut between its renames."""
    partial, _, replaced = _siblings(out)
    if not replaced.exists():
        return
    if not out.exists():
        if (partial / CONFIG).is_file():
            os.replace(partial, out)
        else:
            os.replace(replaced, out)
        fsync_dir(out.parent)
    # Left over from a commit killed while deleting it: the old run, replaced already.
    shutil.rmtree(replaced, ignore_errors=True)


# ------------------------------------------------------------------------------------ reading
def prediction_rows(images: Sequence[Any], labels: Sequence[int] | None, proba: np.ndarray,
                    classes: Sequence[str], split: str | None) -> list[dict[str, Any]]:
    """One row per image: path, split, label, one probability per class, prediction.

    ``images`` are :class:`medtl.data.Record` objects, or plain paths (a volume's aggregate
    row). ``path`` is always the file; when some record is a slice of a volume or an image in an
    .npz, a ``slice`` column or ``key`` and ``index`` columns follow it (empty where a row has
    none), so that each row still names one image. Datasets of image files get none of them.
    """
    located = [(im, {}) if isinstance(im, str) else (im.path, im.location()) for im in images]
    columns = [c for c in ("slice", "key", "index") if any(c in loc for _, loc in located)]
    rows = []
    for i, (path, loc) in enumerate(located):
        row: dict[str, Any] = {"path": path}
        for c in columns:
            row[c] = loc.get(c, "")
        if split is not None:
            row["split"] = split
        if labels is not None:
            row["label"] = classes[int(labels[i])]
        ok = bool(np.isfinite(proba[i]).all())
        for c, cls in enumerate(classes):
            row[f"prob_{cls}"] = float(proba[i, c]) if ok else ""
        row["prediction"] = classes[int(np.argmax(proba[i]))] if ok else "UNREADABLE"
        rows.append(row)
    return rows


class Run:
    """A run directory on disk: its config, metrics, predictions and model."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def config(self) -> dict[str, Any]:
        """config.json in the current format (runs of medtl 0.1 are upgraded on reading)."""
        return read_config(self.path)

    @property
    def kind(self) -> str:
        """``single``, ``cv`` (cross-validation: one run per fold) or ``model``."""
        return self.config["kind"]

    @property
    def metrics(self) -> dict[str, Any]:
        p = self.path / METRICS
        return json.loads(p.read_text()) if p.exists() else {}

    def predictions(self) -> list[dict[str, str]]:
        with open(self.path / PREDICTIONS, newline="") as f:
            return list(csv.DictReader(f))

    def load_model(self, *, device: str = "auto", quiet: bool = False, skip_bad: bool = False,
                   threads: int | None = None):
        """The run's fitted :class:`~medtl.TransferClassifier`.

        It reads the shared feature cache and never adds to it: what predict, evaluate and
        explain give it are new images, mostly seen once, and caching them would grow the cache
        without bound (docs/decisions.md). Fitting is what fills the cache.
        """
        from medtl.transfer.estimator import TransferClassifier

        clf = TransferClassifier.load(self.path / MODEL_DIR, device=device, quiet=quiet,
                                      skip_bad=skip_bad, threads=threads)
        extractor = getattr(clf.model_, "extractor", None)  # a frozen model's features
        if extractor is not None:
            extractor.cache_writes = False
        return clf


def save_run(clf, out: str | Path, *, overwrite: bool = False) -> Run:
    """A run directory (kind ``model``) around a classifier fitted from Python: its model and
    config.json, so ``load_run``, ``evaluate`` and ``predict`` take it. Written like any run
    (beside ``out``, swapped in when whole; ``overwrite`` replaces only a run). ``medtl train``
    writes complete runs (metrics, predictions, report)."""
    from sklearn.utils.validation import check_is_fitted

    import medtl

    check_is_fitted(clf, "model_")  # before anything is written
    model, out = clf.model_, Path(out)
    classes = list(model.classes)
    with writing_run(out, overwrite=overwrite) as draft:
        model.save(draft.path / MODEL_DIR)
        write_config(draft.path, {
            "kind": "model", "backbone": clf.backbone, "strategy": clf.strategy,
            "head": clf.head, "weights": model.backbone.weights_info.to_dict(),
            "seed": clf.seed, "classes": classes,
            "positive_class": classes[-1] if len(classes) == 2 else None,
            "preprocessing": model.preprocessing.to_dict(), "options": clf.options.to_dict(),
            "medtl_version": medtl.__version__})
    return Run(out)


def load_run(path: str | Path) -> Run:
    """Open a run directory written by ``medtl train``; a clear error when it is not one."""
    p = Path(path)
    if not p.exists():
        if _has_progress(partial_dir(p)) or (partial_dir(p) / MARKER).is_file():
            raise MedtlError(f"{p}: not finished yet (its unfinished run is in "
                             f"{partial_dir(p)}; --resume continues it)")
        raise MedtlError(f"{p}: no such run directory")
    if (p / FOLDS).is_dir() and not (p / MODEL_DIR).exists():
        raise MedtlError(f"{p}: a cross-validation run has one model per fold; use "
                         f"{fold_path(p, 1)} (or another fold)")
    if not (p / CONFIG).is_file() or not (p / MODEL_DIR / MODEL_META).is_file():
        raise MedtlError(f"{p}: not a medtl run directory ({CONFIG} or {MODEL_DIR}/ missing)")
    return Run(p)
