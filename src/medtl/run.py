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
import io
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import MedtlError
from medtl.files import (
    MAX_JSON_BYTES,
    LockHeldError,
    describe_holder,
    fsync_dir,
    hold_lock,
    read_bytes,
    read_json,
)
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
KINDS = ("single", "cv", "model", "ensemble")
# What every config.json holds, and what each kind adds. Format 1 is medtl 0.1's three layouts
# (no "format" key), upgraded on reading.
_REQUIRED = ("backbone", "strategy", "head", "weights", "seed", "classes", "positive_class",
             "medtl_version")
_REQUIRED_BY_KIND = {"single": ("preprocessing", "view", "data"),
                     "cv": ("folds", "options", "view", "data"),
                     "model": ("preprocessing",),
                     "ensemble": ("members", "method", "view", "data")}
MEMBERS = "members"             # an ensemble: members/<name>/, each a run (medtl.ensembles)


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
    """``run_dir``'s config.json in the current format, whichever medtl wrote it; read
    bounded (a regular file of at most MAX_JSON_BYTES) and checked (:func:`check_config`),
    since a run directory may come from anyone."""
    path = Path(run_dir) / CONFIG
    try:
        cfg = read_json(path, max_bytes=MAX_JSON_BYTES)
    except FileNotFoundError:
        raise MedtlError(f"{run_dir}: no {CONFIG} (not a run, or an unfinished one)") from None
    if not isinstance(cfg, dict):
        raise MedtlError(f"{path}: not a medtl run configuration")
    return check_config(upgrade_config(cfg, source=path), source=path)


def check_config(cfg: dict[str, Any], *, source: str | Path = CONFIG) -> dict[str, Any]:
    """``cfg`` (current format) when every value medtl uses from it has its type and bounds;
    else one MedtlError naming ``source`` and the value. Keys medtl does not use pass."""
    from medtl.data.sources import make_view
    from medtl.data.transforms import Preprocessing
    from medtl.transfer.meta import MAX_SEED, check_class_names, check_int, check_text, shown

    try:
        if cfg.get("kind") not in KINDS:
            raise MedtlError(f"kind {shown(cfg.get('kind'))} is not one of {KINDS}")
        classes = check_class_names(cfg.get("classes"), "classes")
        if cfg.get("positive_class") is not None and cfg["positive_class"] not in classes:
            raise MedtlError(f"positive_class {shown(cfg['positive_class'])} is not a "
                             "class")
        for key in ("backbone", "strategy", "head", "medtl_version"):
            if cfg.get(key) is not None:
                check_text(cfg[key], key)
        check_int(cfg.get("seed", 0), "seed", 0, MAX_SEED)
        view = cfg.get("view") or {}
        if not isinstance(view, dict) or not view.keys() <= {"window", "slices", "mode"}:
            raise MedtlError("view is not a mapping of window, slices and mode")
        for key, value in view.items():
            check_text(value, f"view {key}", limit=40)
        make_view(**view)
        if cfg.get("preprocessing") is not None:
            if not isinstance(cfg["preprocessing"], dict):
                raise MedtlError("preprocessing is not a mapping")
            Preprocessing.from_dict(cfg["preprocessing"])
        _check_recorded_weights(cfg.get("weights"))
        _check_data_record(cfg.get("data"))
        ts = cfg.get("target_sensitivity")
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float)
                               or not 0.0 < ts <= 1.0):
            raise MedtlError(f"target_sensitivity {shown(ts)} is not in (0, 1]")
        if cfg["kind"] == "cv":
            check_int(cfg.get("folds"), "folds", 2, 1000)
        if cfg["kind"] == "ensemble":
            from medtl.transfer.ensemble import check_members_record

            check_members_record(cfg.get("members"))
    except MedtlError as exc:
        raise MedtlError(f"{source}: {exc}") from None
    return cfg


def _check_recorded_weights(weights: Any) -> None:
    """config.json's weights provenance: shown only, but a digest is 64 lowercase hex."""
    from medtl.models.weights import is_sha256
    from medtl.transfer.meta import shown

    if weights is None:
        return
    if not isinstance(weights, dict):
        raise MedtlError("weights is not a mapping")
    sha = weights.get("sha256")
    if sha is not None and not is_sha256(sha):
        raise MedtlError(f"weights sha256 {shown(sha)} is not 64 lowercase hex digits")


def _check_data_record(data: Any) -> None:
    """config.json's ``data``: where ``evaluate`` reads by default and how it splits."""
    from medtl.transfer.meta import check_text, shown

    if data is None:
        return
    if not isinstance(data, dict):
        raise MedtlError("data is not a mapping")
    if data.get("source") is not None:
        check_text(data["source"], "data source", limit=4096)
    if data.get("patient_regex") is not None:
        # Compiled and tried on probe names: a catastrophic pattern is refused by every command
        # that opens the run; evaluate's searches also stop at a timeout (data.splits).
        from medtl.data.splits import MAX_PATTERN, compile_patient_regex

        check_text(data["patient_regex"], "data patient_regex", limit=MAX_PATTERN)
        compile_patient_regex(data["patient_regex"])
    vf = data.get("val_fraction")
    if vf is not None and (isinstance(vf, bool) or not isinstance(vf, int | float)
                           or not 0.0 <= vf < 1.0):
        raise MedtlError(f"data val_fraction {shown(vf)} is not in [0, 1)")


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
    try:  # bounded: a config.json linked to /dev/zero is not a run, not a hang
        cfg = read_json(p / CONFIG)
    except (OSError, MedtlError):
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
    - ``out`` (or its lock, draft or replaced sibling) that is a symbolic link is refused
      before anything is written: a run goes where it is named, never through a link to
      another place. A folder that cannot be written is a MedtlError naming it, at once.
    """
    out = Path(out)
    with ExitStack() as stack:
        _check_out(out)
        try:
            stack.enter_context(hold_lock(lock_file(out), command=_command_line()))
        except LockHeldError as exc:
            raise MedtlError(f"{out}: in use by {describe_holder(exc.holder)}; wait for it to "
                             "finish or stop it") from None
        except OSError as exc:
            raise _unwritable(out, exc) from None
        try:
            _repair_swap(out)
            draft = _resume_draft(out) if resume else _new_draft(out, overwrite)
        except OSError as exc:
            raise _unwritable(out, exc) from None
        try:
            yield draft
        except BaseException:
            # Keep what --resume can continue; a draft with nothing of that is only litter.
            if not draft.resumed and not _has_progress(draft.path):
                shutil.rmtree(draft.path, ignore_errors=True)
            raise
        try:
            draft.commit()
        except OSError as exc:
            raise MedtlError(f"{out}: the run is complete in {draft.path} but could not be put "
                             f"in place ({_os_reason(exc)}); move it yourself") from None


def _check_out(out: Path) -> None:
    """Refuse ``out`` and its siblings when they are symbolic links (dangling ones included):
    writing through one would put the run, or truncate a file, somewhere other than named.
    Refuse an ``out`` that is a file (or a device, a FIFO), whether writing or resuming."""
    for p in (out, *_siblings(out)):
        if p.is_symlink():
            raise MedtlError(f"{p}: is a symbolic link (to {os.readlink(p)}); medtl does not "
                             "write a run through a link. Give the real folder as --out, or "
                             "remove the link")
    if out.exists() and not out.is_dir():
        raise MedtlError(f"{out}: exists and is not a directory; choose another --out")


def _os_reason(exc: OSError) -> str:
    where = "".join(f"{f}: " for f in (exc.filename, exc.filename2) if f is not None)
    return f"{where}{exc.strerror or exc}"


def _unwritable(out: Path, exc: OSError) -> MedtlError:
    return MedtlError(f"{out}: cannot write a run there ({_os_reason(exc)}); choose another "
                      "--out or fix its permissions")


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
                    classes: Sequence[str], split: str | None,
                    show: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """One row per image: path, split, label, one probability per class, prediction.

    ``images`` are :class:`medtl.data.Record` objects, or plain paths (a volume's aggregate
    row). ``path`` is always the file, as ``show`` writes it (``--paths``:
    medtl.data.privacy.PathDisplay.show; as read when None); when some record is a slice of a
    volume or an image in an .npz, a ``slice`` column or ``key`` and ``index`` columns follow it
    (empty where a row has none), so that each row still names one image. Datasets of image
    files get none of them.
    """
    located = [(im, {}) if isinstance(im, str) else (im.path, im.location()) for im in images]
    if show is not None:
        located = [(show(path), loc) for path, loc in located]
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


def multilabel_prediction_rows(images: Sequence[Any], y: np.ndarray | None, proba: np.ndarray,
                               classes: Sequence[str], thresholds: Mapping[str, Any] | None,
                               split: str | None, show: Callable[[str], str] | None = None,
                               ) -> list[dict[str, Any]]:
    """One row per image of a multi-label model: path (and slice / key, index), split, then
    for each label ``L`` in order: ``L`` (truth 1, 0 or "" when unknown; no column at all when
    ``y`` is None, as in medtl predict), ``prob_L`` and ``pred_L`` (1 when ``prob_L >=`` the
    label's threshold, else 0). A row whose probabilities are not all finite (an unreadable
    image) has "" in both. ``thresholds`` None: 0.5 for every label.
    """
    from medtl.evaluation.multilabel import threshold_vector

    cut = threshold_vector(thresholds, classes)
    # The location columns exactly as prediction_rows writes them.
    base = [{k: v for k, v in r.items() if not k.startswith("prob_") and k != "prediction"}
            for r in prediction_rows(images, None, proba, classes, split, show=show)]
    rows = []
    for i, row in enumerate(base):
        ok = bool(np.isfinite(proba[i]).all())
        for c, name in enumerate(classes):
            if y is not None:
                v = y[i][c]
                row[str(name)] = "" if v != v else int(v)  # NaN: unknown
            row[f"prob_{name}"] = float(proba[i, c]) if ok else ""
            row[f"pred_{name}"] = int(proba[i, c] >= cut[c]) if ok else ""
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
        """``single``, ``cv`` (cross-validation: one run per fold), ``model`` or
        ``ensemble`` (members/, each a run; medtl.ensembles)."""
        return self.config["kind"]

    @property
    def metrics(self) -> dict[str, Any]:
        """metrics.json (empty when the run has none), read bounded and checked for shape."""
        p = self.path / METRICS
        if not p.exists() and not p.is_symlink():
            return {}
        return check_metrics(read_json(p, max_bytes=MAX_METRICS_BYTES), source=p)

    def predictions(self) -> list[dict[str, str]]:
        """predictions.csv's rows (a regular file of at most MAX_PREDICTIONS_BYTES)."""
        p = self.path / PREDICTIONS
        try:
            text = read_bytes(p, max_bytes=MAX_PREDICTIONS_BYTES).decode("utf-8")
        except FileNotFoundError:
            raise MedtlError(f"{self.path}: no {PREDICTIONS}") from None
        except UnicodeDecodeError as exc:
            raise MedtlError(f"{p}: not UTF-8 text ({exc.reason})") from None
        try:
            return list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as exc:
            raise MedtlError(f"{p}: not a predictions table ({exc})") from None

    def load_model(self, *, device: str = "auto", quiet: bool = False, skip_bad: bool = False,
                   threads: int | None = None):
        """The run's fitted :class:`~medtl.TransferClassifier`.

        It reads the shared feature cache and never adds to it: what predict, evaluate and
        explain give it are new images, mostly seen once, and caching them would grow the cache
        without bound (docs/decisions.md). Fitting is what fills the cache.
        """
        from medtl.transfer.estimator import TransferClassifier

        if self.kind == "ensemble":  # every member loaded, checked by load_run first
            return _load_ensemble(self, device=device, quiet=quiet, skip_bad=skip_bad,
                                  threads=threads)
        clf = TransferClassifier.load(self.path / MODEL_DIR, device=device, quiet=quiet,
                                      skip_bad=skip_bad, threads=threads)
        extractor = getattr(clf.model_, "extractor", None)  # a frozen model's features
        if extractor is not None:
            extractor.cache_writes = False
        return clf


def save_run(clf, out: str | Path, *, overwrite: bool = False,
             positive_class: str | None = None) -> Run:
    """A run directory (kind ``model``) around a classifier fitted from Python: its model and
    config.json, so ``load_run``, ``evaluate`` and ``predict`` take it. Written like any run
    (beside ``out``, swapped in when whole; ``overwrite`` replaces only a run). ``medtl train``
    writes complete runs (metrics, predictions, report). ``positive_class``: the class that
    ``evaluate``'s sensitivity and specificity refer to in a binary task (default: the last)."""
    from sklearn.utils.validation import check_is_fitted

    import medtl

    check_is_fitted(clf, "model_")  # before anything is written
    model, out = clf.model_, Path(out)
    classes = list(model.classes)
    if positive_class is not None and (len(classes) != 2 or positive_class not in classes):
        raise MedtlError(f"positive_class {positive_class!r}: not one of the two classes of a "
                         f"binary model (classes: {', '.join(classes)})")
    positive = positive_class or (classes[-1] if len(classes) == 2 else None)
    with writing_run(out, overwrite=overwrite) as draft:
        model.save(draft.path / MODEL_DIR)
        write_config(draft.path, {
            "kind": "model", "backbone": clf.backbone, "strategy": clf.strategy,
            "head": clf.head, "weights": model.backbone.weights_info.to_dict(),
            "seed": clf.seed, "classes": classes,
            "positive_class": positive,
            "preprocessing": model.preprocessing.to_dict(), "options": clf.options.to_dict(),
            "medtl_version": medtl.__version__})
    return Run(out)


MAX_METRICS_BYTES = 64 << 20      # curves and per-class figures of 10,000 classes fit
MAX_PREDICTIONS_BYTES = 1 << 30  # a row per image: a million images with many classes
_SPLIT_NAMES = ("train", "val", "test", "heldout")


def check_metrics(metrics: Any, *, source: str | Path = METRICS) -> dict[str, Any]:
    """metrics.json's shape where medtl reads it back: a mapping; each split's figures a
    mapping; the operating thresholds chosen on validation (which ``evaluate`` applies) finite
    numbers in [0, 1]; the positive class a name."""
    from medtl.transfer.meta import shown

    if not isinstance(metrics, dict):
        raise MedtlError(f"{source}: not a medtl metrics file")
    for split in _SPLIT_NAMES:
        if split in metrics and not isinstance(metrics[split], dict):
            raise MedtlError(f"{source}: the {split} figures are not a mapping")
    thresholds = metrics.get("thresholds")
    if thresholds is not None:
        if not isinstance(thresholds, dict):
            raise MedtlError(f"{source}: thresholds is not a mapping")
        for name in ("youden", "sensitivity_target"):
            t = thresholds.get(name)
            if name in thresholds and (isinstance(t, bool) or not isinstance(t, int | float)
                                       or not 0.0 <= t <= 1.0):
                raise MedtlError(f"{source}: threshold {name} {shown(t)} is not a "
                                 "number in [0, 1]")
    pc = metrics.get("positive_class")
    if pc is not None and not isinstance(pc, str):
        raise MedtlError(f"{source}: positive_class is not a class name")
    return metrics


def load_run(path: str | Path) -> Run:
    """Open a run directory written by ``medtl train``; a clear error when it is not one.

    A run directory may come from anyone, so the whole bundle is checked here, before any
    work: config.json, metrics.json and model.json read bounded (regular files of a bounded
    size) and every value medtl uses from them checked (one MedtlError line naming the file and
    the value). ``predict``, ``evaluate`` and ``explain`` all open runs here, so they refuse a
    crafted run the same way. Weight files are checked when the model loads.
    """
    p = Path(path)
    if not p.exists():
        if _has_progress(partial_dir(p)) or (partial_dir(p) / MARKER).is_file():
            raise MedtlError(f"{p}: not finished yet (its unfinished run is in "
                             f"{partial_dir(p)}; --resume continues it)")
        raise MedtlError(f"{p}: no such run directory")
    if (p / CONFIG).is_file() and (p / MEMBERS).is_dir() and not (p / MEMBERS).is_symlink():
        return _check_ensemble(p)
    if (p / FOLDS).is_dir() and not (p / MODEL_DIR).exists():
        raise MedtlError(f"{p}: a cross-validation run has one model per fold; use "
                         f"{fold_path(p, 1)} (or another fold)")
    if not (p / CONFIG).is_file() or not (p / MODEL_DIR / MODEL_META).is_file():
        raise MedtlError(f"{p}: not a medtl run directory ({CONFIG} or {MODEL_DIR}/ missing)")
    run = Run(p)
    cfg = run.config   # read and checked
    _ = run.metrics    # read bounded and checked for shape
    from medtl.errors import check_choice
    from medtl.transfer.fitted import read_model_meta
    from medtl.transfer.heads import HEADS
    from medtl.transfer.strategies import get_strategy

    meta, options = read_model_meta(p / MODEL_DIR)
    where = p / MODEL_DIR / MODEL_META
    try:
        if get_strategy(options.strategy).takes("head"):
            check_choice("head", options.head, HEADS)
    except MedtlError as exc:
        raise MedtlError(f"{where}: {exc}") from None
    if list(meta["classes"]) != list(cfg["classes"]):
        raise MedtlError(f"{p}: {where.name} and {CONFIG} name different classes")
    return run


def _check_ensemble(p: Path) -> Run:
    """An ensemble run: its config and combiner checked, and each member opened by load_run
    and its files checked against the sha256 the ensemble recorded (medtl.transfer.ensemble)."""
    from medtl.transfer.ensemble import COMBINER, check_combiner, check_member_files

    run = Run(p)
    cfg = run.config
    if cfg["kind"] != "ensemble":
        raise MedtlError(f"{p}: holds {MEMBERS}/ but is not an ensemble run")
    _ = run.metrics
    where = p / MODEL_DIR / COMBINER
    check_combiner(read_json(where), len(cfg["members"]), len(cfg["classes"]), where)
    for m in cfg["members"]:
        member = p / MEMBERS / m["name"]
        if member.is_symlink() or not member.is_dir():
            raise MedtlError(f"{member}: missing or not a folder (an ensemble member)")
        check_member_files(member, m["files"])
        mcfg = load_run(member).config
        if mcfg["kind"] == "ensemble" or list(mcfg["classes"]) != list(cfg["classes"]):
            raise MedtlError(f"{member}: not a member of this ensemble's classes")
    return run


def _load_ensemble(run: Run, **runtime: Any):
    """The EnsembleClassifier of an ensemble run (checked by load_run when opened)."""
    from medtl.transfer.ensemble import COMBINER, EnsembleClassifier, check_combiner

    cfg = _check_ensemble(run.path).config
    where = run.path / MODEL_DIR / COMBINER
    combiner = check_combiner(read_json(where), len(cfg["members"]), len(cfg["classes"]), where)
    members = [Run(run.path / MEMBERS / m["name"]).load_model(**runtime) for m in cfg["members"]]
    return EnsembleClassifier(members, combiner["method"], combiner["params"],
                              seed=cfg.get("seed", 0))


# ------------------------------------------------------------------------------ resume guard
REQUEST = "request.json"        # in the draft only: what was asked, for --resume to compare
_MAX_REQUEST_BYTES = 1 << 20


def write_request(draft_dir: str | Path, settings: Mapping[str, Any]) -> None:
    """Record what a run was asked to do (``{label: value}``: options, request values, data
    fingerprint) in its draft, before any training, for :func:`check_request` on --resume."""
    write_json(Path(draft_dir) / REQUEST, {"format": 1, "settings": dict(settings)})


def check_request(draft_dir: str | Path, settings: Mapping[str, Any], *,
                  out: str | Path) -> bool:
    """Refuse (MedtlError, one line) a --resume whose ``settings`` differ in any value from those
    the unfinished run recorded, naming each difference as ``label old -> new``.

    False when the draft has no record (left by a medtl before 0.2, which wrote none): nothing
    to compare, the caller records the settings from now on.
    """
    path = Path(draft_dir) / REQUEST
    if not path.exists() and not path.is_symlink():
        return False
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _MAX_REQUEST_BYTES:
            raise ValueError("not a small regular file")
        saved = json.loads(path.read_text(encoding="utf-8"))["settings"]
        if not isinstance(saved, dict):
            raise ValueError("no settings")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MedtlError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); start again "
                         "with --overwrite instead of --resume") from None
    now = json.loads(json.dumps(dict(settings), default=str))  # as it would be stored
    changed = [k for k in dict.fromkeys([*saved, *now]) if saved.get(k) != now.get(k)]
    if changed:
        diffs = "; ".join(f"{k} {_shown_value(saved.get(k))} -> {_shown_value(now.get(k))}"
                          for k in changed)
        raise MedtlError(f"{out}: --resume refused, the request differs from the unfinished "
                         f"run's: {diffs}. Resume with the same request and data, or start "
                         "again with --overwrite (without --resume)")
    return True


def _shown_value(v: Any) -> str:
    """A recorded value in a one-line message: digests shortened, long values cut."""
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]
    s = "(none)" if v is None else repr(v)
    return s if len(s) <= 60 else s[:59] + "…"
