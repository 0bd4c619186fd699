"""``medtl bench``: the reviews' experiment, backbones x transfer approaches (x seeds), as one
resumable command.

Each cell is an ordinary run directory under ``OUT/cells/``; a cell whose ``config.json`` exists
is finished (train writes it last) and is never computed again, so an interrupted bench is
simply run again. Frozen features are shared between cells through medtl's feature cache. The
leaderboard and the report are rebuilt from the cells' files at the end of every bench.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from medtl.errors import MedtlError
from medtl.run import write_csv

log = logging.getLogger("medtl")

# rank_by, val_value and val_source say what each cell is ranked (and the first chosen) on:
# its validation figure, never a test one; "shown" names the split of the figures after them.
LEADERBOARD_FIELDS = ("cell", "backbone", "strategy", "head", "seed", "chosen", "rank_by",
                      "val_value", "val_source", "shown", "auc", "auc_ci95_low",
                      "auc_ci95_high", "accuracy", "balanced_accuracy", "sensitivity",
                      "specificity", "f1", "trainable_params", "total_params", "train_s",
                      "images_per_s", "run_dir")


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``strategy`` may carry a hybrid head as ``hybrid:svm``."""

    backbone: str
    strategy: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.backbone}-{self.strategy.replace(':', '-')}-seed{self.seed}"

    def options(self) -> dict[str, Any]:
        strategy, _, head = self.strategy.partition(":")
        opts: dict[str, Any] = {"backbone": self.backbone, "strategy": strategy,
                                "seed": self.seed}
        if head:
            opts["head"] = head
        return opts


def grid(backbones: Sequence[str], strategies: Sequence[str], seeds: int = 1) -> list[Cell]:
    """Every (backbone, strategy, seed), validated before anything runs."""
    from medtl.models.registry import get_spec
    from medtl.transfer.strategies import STRATEGIES, get_strategy

    if not backbones or not strategies:
        raise MedtlError("medtl bench: name at least one backbone and one strategy")
    if seeds < 1:
        raise MedtlError(f"--seeds {seeds}: at least 1")
    for b in backbones:
        get_spec(b)
    for s in strategies:
        name, _, head = s.partition(":")
        if name not in STRATEGIES:
            raise MedtlError(f"unknown strategy '{name}' in --strategies; choose from: "
                             f"{', '.join(STRATEGIES)}")
        takers = [n for n, cls in STRATEGIES.items() if "head" in cls.own_options]
        if head and "head" not in get_strategy(name).own_options:
            raise MedtlError(f"'{s}': only {' and '.join(takers)} "
                             f"{'takes' if len(takers) == 1 else 'take'} a head "
                             "(hybrid:logreg|svm|rf|knn)")
    return [Cell(b, s, k) for b in backbones for s in strategies for k in range(seeds)]


def bench(data: str | Path, *, backbones: Sequence[str], strategies: Sequence[str],
          out: str | Path, seeds: int = 1, jobs: int = 1, ray: str | None = None,
          quiet: bool = False, rank_by: str = "auc", ensemble: int | None = None,
          ensemble_method: str = "mean", **train_options: Any) -> Path:
    """Run every cell not finished yet, then write ``leaderboard.csv`` and ``report.html``.

    Both rank the cells on their validation ``rank_by`` (a cross-validated cell's mean over
    folds) and show test figures: the first is the chosen cell; one without validation figures
    is listed last and cannot be chosen.

    ``train_options`` go to every cell's :func:`medtl.workflow.train` (image_size, epochs,
    patient_regex, folds, ...). ``jobs`` > 1 runs cells in that many processes; ``ray`` runs
    them as Ray tasks on the cluster at that address (``local`` starts one on this machine);
    every node must see ``data`` and ``out`` at the same paths (a shared file system).
    ``ensemble``: also build the ensemble (``ensemble_method``) of the K cells best on
    validation, ``out/ensembles/topK-METHOD``, ranked with the cells.
    """
    from medtl.reporting.compare import check_rank_by

    check_rank_by(rank_by)
    if ensemble is not None:  # before any cell trains
        from medtl.errors import check_choice
        from medtl.transfer.ensemble import METHODS

        check_choice("--ensemble-method", ensemble_method, METHODS)
        if ensemble < 2:
            raise MedtlError(f"--ensemble {ensemble}: an ensemble takes at least 2 cells")
    cells = grid(backbones, strategies, seeds)
    # A mistake common to every cell (a bad path, regex or window) is one error, up front.
    from medtl.data import load_dataset

    load_dataset(data, **{k: v for k, v in train_options.items()
                          if k in ("patient_regex", "window", "slices", "mode", "labels",
                                   "uncertain", "blank") and v is not None})
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if not (out / "cells" / c.name / "config.json").is_file()]
    log.info("bench: %d cells, %d finished before, %d to run", len(cells), len(cells) - len(todo),
             len(todo))
    failures: list[str] = []
    t0 = time.perf_counter()
    if ray is not None and todo:
        failures += _run_on_ray(ray, str(data), todo, str(out), train_options)
    elif jobs > 1 and len(todo) > 1:
        per_job = worker_options(train_options, jobs)
        # spawn: a forked child would inherit torch's thread pools and locks half-initialised.
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_cell, str(data), c, str(out), per_job): c
                       for c in todo}
            for future in as_completed(futures):
                failures += future.result()
    else:
        for c in todo:
            failures += _run_cell(str(data), c, str(out), {**train_options, "quiet": quiet})
    log.info("bench: %d cells run in %.0f s", len(todo), time.perf_counter() - t0)
    rows = leaderboard(out, cells, rank_by=rank_by)
    extra = [] if not ensemble else [_top_ensemble(out, rows, ensemble, ensemble_method, quiet)]
    if extra:
        rows = leaderboard(out, cells, rank_by=rank_by, extra=extra)
    write_csv(out / "leaderboard.csv", rows)
    from medtl.workflow import report

    finished = [out / "cells" / c.name for c in cells
                if (out / "cells" / c.name / "config.json").is_file()] + extra
    if finished:
        report(finished, out / "report.html", title=f"medtl bench: {Path(str(data)).name}",
               by_group=True, split="out-of-fold" if train_options.get("folds") else "test",
               rank_by=rank_by)
    if failures:
        raise MedtlError("bench: some cells failed (rerun to retry them):\n  " +
                         "\n  ".join(failures))
    return out


def worker_options(train_options: dict[str, Any], jobs: int) -> dict[str, Any]:
    """Each of ``jobs`` workers gets its share of the cores (unless ``threads`` is given): N
    workers of all-core thread pools would start N times too many threads, which wait on each
    other (benchmarks/bench_jobs.py: twice the wall time on two cores)."""
    share = max(1, (os.cpu_count() or 1) // jobs)
    return {**train_options, "threads": train_options.get("threads") or share}


def _run_cell(data: str, cell: Cell, out: str, options: dict[str, Any]) -> list[str]:
    """Train one cell; a half-written cell directory from an earlier attempt is replaced,
    or resumed from its checkpoint when it has one. Returns failure messages."""
    from medtl.run import resumable
    from medtl.workflow import train

    cell_dir = Path(out) / "cells" / cell.name
    # An unfinished cell waits in its partial sibling (medtl.run), checkpoints included.
    resume = resumable(cell_dir)
    if cell_dir.exists() and not resume:  # half-written by medtl 0.1, which wrote in place
        shutil.rmtree(cell_dir)
    try:
        train(data, out=cell_dir, resume=resume, **cell.options(),
              **{"quiet": True, **options})
    except MedtlError as exc:
        return [f"{cell.name}: {exc}"]
    return []


RAY_RETRIES = 3  # attempts after the first for a cell whose Ray worker or node died


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT that nothing answers is refused at once: Ray itself retries for minutes,
    printing its own log lines, before it gives up. Other forms (local, auto, ray://) are
    Ray's to resolve."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise MedtlError(f"--ray {address}: nothing answers there ({exc.strerror or exc}); "
                         "start the head first (ray start --head) or check the address"
                         ) from None


def _run_on_ray(address: str, data: str, todo: Sequence[Cell], out: str,
                options: dict[str, Any]) -> list[str]:
    """Each cell as a Ray task (one CPU each); Ray schedules them over the cluster's nodes."""
    try:
        import ray
    except ImportError as exc:
        raise MedtlError("--ray needs Ray: pip install 'medtl[ray]' (or pip install ray)"
                         ) from exc
    started_here = not ray.is_initialized()
    if started_here:
        _check_reachable(address)
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, ignore_reinit_error=True)
        except ConnectionError as exc:
            raise MedtlError(f"--ray {address}: could not join the cluster ({exc})") from None
    failures: list[str] = []
    try:
        # A cell whose worker or node dies is run again (RAY_RETRIES times): _run_cell resumes
        # or replaces what the dead attempt left. Said here, not left to Ray's default.
        task = ray.remote(num_cpus=1, max_retries=RAY_RETRIES)(_run_cell)
        # One CPU per task, so one thread each unless the caller said otherwise.
        per_task = worker_options(options, os.cpu_count() or 1)  # one CPU each
        refs = {task.remote(data, c, out, per_task): c for c in todo}
        for ref, cell in refs.items():
            try:
                failures += ray.get(ref)
            except ray.exceptions.RayError as exc:  # retries spent: this cell fails, not all
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                failures.append(f"{cell.name}: lost on the Ray cluster after "
                                f"{RAY_RETRIES} retries ({first})")
    finally:
        if started_here:
            ray.shutdown()
    return failures


def _top_ensemble(out: Path, rows: list[dict[str, Any]], k: int, method: str,
                  quiet: bool) -> Path:
    """The ensemble of the ``k`` cells ranked best on validation (cross-validated cells, and
    cells without validation figures, cannot be members)."""
    from medtl.ensembles import ensemble

    top = [r["run_dir"] for r in rows if r["val_value"] is not None and r["shown"] != "cv mean"]
    if len(top) < k:
        raise MedtlError(f"--ensemble {k}: only {len(top)} finished cells have validation "
                         "predictions to combine")
    log.info("bench: ensemble (%s) of the %d cells best on validation", method, k)
    return ensemble(top[:k], method=method, out=out / "ensembles" / f"top{k}-{method}",
                    overwrite=True, quiet=quiet).path


def leaderboard(out: Path, cells: Sequence[Cell], rank_by: str = "auc",
                extra: Sequence[Path] = ()) -> list[dict[str, Any]]:
    """One row per finished cell, ranked on validation ``rank_by`` (a cross-validated cell's
    mean over folds), never on test; the first row is the chosen cell (``chosen``: yes) when it
    has a validation figure. The figures after ``shown`` are test's (validation's for a cell
    without a test split, the mean over folds for a cross-validated one)."""
    from medtl.reporting.compare import rank_on_validation
    from medtl.run import Run

    entries = []
    for c in cells:
        path = Path(out) / "cells" / c.name
        if (path / "config.json").is_file():
            entries.append({"cell": c, "path": path, "metrics": Run(path).metrics})
    for path in extra:  # ensembles of cells: ranked on their validation figures like a cell
        entries.append({"cell": None, "path": path, "metrics": Run(path).metrics,
                        "config": Run(path).config})
    rows = []
    for i, e in enumerate(rank_on_validation(entries, rank_by)):
        c, m = e["cell"], e["metrics"]
        if "cv" in m:  # cross-validated cell: the mean over folds (sd in auc_sd)
            shown, s, ci = "cv mean", m["cv"].get("mean", {}), [None, None]
            m = {**m, "timing": {}, "params": {}}
        else:
            shown = "test" if "test" in m else "val"
            s = m.get(shown, {})
            ci = s.get("auc_ci95") or [None, None]
        timing, params = m.get("timing", {}), m.get("params", {})
        rows.append({**(_cell_columns(c) if c is not None else {
                         "cell": e["path"].name, "backbone": "ensemble", "strategy": "ensemble",
                         "head": e["config"]["method"], "seed": ""}),
                     "chosen": "yes" if i == 0 and e["choice"] is not None else "",
                     "rank_by": rank_by, "val_value": e["choice"],
                     "val_source": e["choice_source"], "shown": shown,
                     "auc": s.get("auc"), "auc_ci95_low": ci[0], "auc_ci95_high": ci[1],
                     **{f: s.get(f) for f in ("accuracy", "balanced_accuracy", "sensitivity",
                                             "specificity", "f1")},
                     "trainable_params": params.get("trainable"),
                     "total_params": params.get("total"), "train_s": timing.get("train_s"),
                     "images_per_s": timing.get("predict_images_per_s"),
                     "run_dir": str(e["path"])})
    return rows


def _cell_columns(c: Cell) -> dict[str, Any]:
    return {"cell": c.name, "backbone": c.backbone, "strategy": c.options()["strategy"],
            "head": c.options().get("head", ""), "seed": c.seed}
