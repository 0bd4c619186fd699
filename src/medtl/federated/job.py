"""``medtl federate``: train one model across sites, and write it as a run like any other.

The run directory holds the global model (``predict``, ``evaluate``, ``explain``, ``export`` and
``serve`` treat it as any run), metrics with CIs on the pooled validation and test splits and on
each site's test split, the rounds' record (``history.csv``: per round the sites that trained
and the pooled validation figures from the sites' counts), and with ``--baselines`` a run per
site alone and one of the pooled data (``baselines/``), trained by the same recipe. Validation
chooses the operating thresholds; test is scored once per model.

In simulation (the default) the coordinator holds every site's data, as a study of federated
learning does: the sites are Flower's virtual clients, and what the sites send each other is
still only parameters and counts. With ``--superlink`` the sites are real SuperNodes, each at
its hospital (medtl.federated.deploy), and the coordinator sees no image: it writes the model
and the rounds, and each site scores the model on its own test split (``medtl evaluate``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtl import run as bundle
from medtl.console import run_logging
from medtl.errors import MedtlError, check_choice
from medtl.federated.apps import (
    Plan,
    follow_rounds,
    load_global,
    make_client_app,
    make_server_app,
)
from medtl.federated.local import RECIPES, Privacy, round_seed, spent_epsilon
from medtl.federated.sites import has_site_column, site_names, split_by_site
from medtl.run import Run
from medtl.training.options import TrainOptions

log = logging.getLogger("medtl")

ALGORITHMS = ("fedavg", "fedprox")
DEFAULT_ROUNDS = 20
DEFAULT_MU = 0.01
FEDERATION_DIR = "federation"
BASELINES_DIR = "baselines"


def federate(
    sites: Sequence[str | Path],
    options: TrainOptions | None = None,
    *,
    rounds: int = DEFAULT_ROUNDS,
    local_epochs: int | None = None,
    algorithm: str = "fedavg",
    mu: float | None = None,
    min_sites: int | None = None,
    dp_epsilon: float | None = None,
    dp_delta: float = 1e-5,
    dp_clip: float = 1.0,
    baselines: bool = False,
    out: str | Path | None = None,
    overwrite: bool = False,
    patient_regex: str | None = None,
    val_fraction: float = 0.2,
    positive_class: str | None = None,
    target_sensitivity: float | None = None,
    paths: str = "relative",
    round_timeout: float = 3600.0,
    superlink: str | None = None,
    classes: Sequence[str] | None = None,
    insecure: bool = False,
    root_certificates: str | None = None,
    **option_values: Any,
) -> Run:
    """Federated training over ``sites`` (each a DATA source with its own splits) in Flower's
    simulation engine; returns the run written to ``out``. With ``superlink`` (HOST:PORT of a
    running SuperLink on this machine) the sites are the SuperNodes connected to it instead,
    ``sites`` is empty and ``classes`` names the classes every site labels."""
    from medtl.evaluation.summary import DEFAULT_TARGET_SENSITIVITY

    options = (options or TrainOptions(strategy="feature-extractor")).replace(**option_values)
    if superlink is None and (classes or insecure or root_certificates):
        raise MedtlError("--classes, --insecure and --root-certificates go with --superlink; "
                         "a simulation reads the classes from the sites' data")
    if superlink is not None:
        return _federate_deployed(
            options, superlink, classes, out=out, overwrite=overwrite, rounds=rounds,
            local_epochs=local_epochs, algorithm=algorithm, mu=mu, min_sites=min_sites,
            dp_epsilon=dp_epsilon, dp_delta=dp_delta, dp_clip=dp_clip,
            patient_regex=patient_regex, val_fraction=val_fraction,
            round_timeout=round_timeout, insecure=insecure,
            root_certificates=root_certificates, sites=sites, baselines=baselines)
    by_column = len(sites) == 1 and has_site_column(sites[0])
    plan = make_plan(options, 2 if by_column else len(sites), rounds=rounds,
                     local_epochs=local_epochs, algorithm=algorithm, mu=mu,
                     min_sites=None if by_column else min_sites, dp_epsilon=dp_epsilon,
                     dp_delta=dp_delta, dp_clip=dp_clip, patient_regex=patient_regex,
                     val_fraction=val_fraction, round_timeout=round_timeout)
    out = Path(out or Path("runs") / f"federated-{options.backbone}-{options.strategy}")
    t0 = time.perf_counter()
    with bundle.writing_run(out, overwrite=overwrite) as draft, \
            run_logging(draft.path, options.quiet):
        if by_column:  # one manifest, a site per value of its site column
            sites = split_by_site(sites[0], draft.path / FEDERATION_DIR / "sites")
            log.info("%d sites from the site column of the manifest", len(sites))
            if len(sites) < 2:
                raise MedtlError("the manifest's site column names one site: a federation "
                                 "needs at least 2")
            if min_sites is not None and min_sites > len(sites):
                raise MedtlError(f"--min-sites {min_sites}: between 1 and the {len(sites)} "
                                 "sites")
            plan.min_sites = min_sites or len(sites)
        names = site_names(sites)
        datasets = [_load(s, plan) for s in sites]
        classes = datasets[0].classes
        for name, ds in zip(names, datasets, strict=True):
            if ds.classes != classes:
                raise MedtlError(f"site {name}: classes {ds.classes}, site {names[0]}'s are "
                                 f"{classes}: every site must label the same classes")
            log.info("site %s: %s", name, "; ".join(f"{s} {sum(c.values())}"
                                                   for s, c in ds.counts().items()))
        plan.classes = list(classes)
        plan.sites = [str(Path(s).expanduser().resolve()) for s in sites]
        recipe = plan.recipe()
        # Each site's data prepared here first (a progress bar per site) where it serves twice:
        # features the simulated sites then read from the on-disk cache, or the baselines'
        # data. Decoded images are not kept on disk: without baselines the sites decode their
        # own, and holding every site's here too would only cost memory.
        prepared = ([recipe.prepare(ds.split("train"), ds.split("val")) for ds in datasets]
                    if baselines or recipe.cached_on_disk else None)
        workdir = draft.path / FEDERATION_DIR
        workdir.mkdir(exist_ok=True)
        t_fed = time.perf_counter()
        simulate(plan, workdir, quiet=options.quiet)
        fed_s = time.perf_counter() - t_fed
        arrays, rounds_done = load_global(workdir)
        pooled = pool(datasets, names)
        request = _request(sites, names, plan, positive_class, target_sensitivity
                           or DEFAULT_TARGET_SENSITIVITY, paths, draft.path, pooled)
        privacy = _privacy_record(plan, prepared) if prepared else None
        extra = {"federation": {**_federation_record(plan, names, datasets, rounds_done,
                                                      fed_s), "privacy": privacy}}
        model = recipe.from_arrays(arrays, source=str(workdir / "global.npz"))
        write_model_run(recipe.fitted(model), options, pooled, datasets, names, draft.path,
                        request, history=rounds_done, t_start=t0, config_extra=extra,
                        balanced=None)
        if baselines:
            _baselines(recipe, plan, datasets, names, prepared, pooled, request,
                       draft.path / BASELINES_DIR)
        draft.commit()
        log.info("federated run written to %s", out)
    return Run(out)


def _federate_deployed(options: TrainOptions, superlink: str, classes, *, out, overwrite,
                       sites, baselines, min_sites, insecure, root_certificates,
                       **plan_args: Any) -> Run:
    """The rounds across the SuperNodes of a SuperLink; the run holds the model and the
    rounds, each site scores it on its own test split (``medtl evaluate RUN DATA``)."""
    from medtl.federated.deploy import submit

    if sites:
        raise MedtlError("--superlink: the sites are the SuperNodes connected to it; give no "
                         "SITE_DATA (each hospital runs `medtl federate-site DATA`)")
    if baselines:
        raise MedtlError("--baselines needs every site's data in one place: simulation only")
    names = [c.strip() for c in (classes or []) if c.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise MedtlError("--superlink needs --classes: the class names every site labels, "
                         "comma-separated, in the order medtl sorts them (e.g. "
                         "NORMAL,PNEUMONIA)")
    if min_sites is None:
        raise MedtlError("--superlink needs --min-sites: how many SuperNodes a round waits "
                         "for")
    plan = make_plan(options, max(2, min_sites), min_sites=min_sites, **plan_args)
    plan.classes = names
    out = Path(out or Path("runs") / f"federated-{options.backbone}-{options.strategy}")
    t0 = time.perf_counter()
    with bundle.writing_run(out, overwrite=overwrite) as draft, \
            run_logging(draft.path, options.quiet):
        workdir = draft.path / FEDERATION_DIR
        workdir.mkdir(exist_ok=True)
        submit(plan, superlink, workdir, insecure=insecure,
               root_certificates=root_certificates, quiet=options.quiet)
        arrays, rounds_done = load_global(workdir)
        recipe = plan.recipe()
        model = recipe.from_arrays(arrays, source=str(workdir / "global.npz"))
        record = {"mode": "deployment", "superlink": superlink, "algorithm": plan.algorithm,
                  "mu": plan.mu, "rounds": plan.rounds, "rounds_done": len(rounds_done),
                  "local_epochs": plan.local_epochs, "min_sites": plan.min_sites,
                  "privacy": plan.privacy, "wall_s": round(time.perf_counter() - t0, 1),
                  "exchanged": "shared parameters and counts only (medtl.federated.shared)"}
        write_unscored_run(recipe.fitted(model), options, names, draft.path,
                           history=rounds_done, federation=record)
        draft.commit()
        log.info("federated run written to %s; each site scores it with `medtl evaluate %s "
                 "SITE_DATA`", out, out)
    return Run(out)


def write_unscored_run(fitted, options: TrainOptions, classes: Sequence[str], out: Path, *,
                       history: list[dict[str, Any]], federation: dict[str, Any]) -> None:
    """A run of a model trained where the coordinator has no image: the model, the rounds,
    the pooled validation counts per round; no val or test figures (the sites score it)."""
    from medtl.data.dataset import Dataset
    from medtl.data.privacy import PathDisplay
    from medtl.run import write_csv, write_json
    from medtl.transfer.estimator import TransferClassifier
    from medtl.workflow import _run_config

    clf = TransferClassifier.from_options(options)
    clf.model_, clf.classes_, clf.history_ = fitted, list(classes), history
    clf.stages_, clf.balanced_, clf.skipped_ = None, False, []
    clf.head_params_, clf.head_name_ = None, None
    fitted.ood = None
    fitted.save(out / bundle.MODEL_DIR)
    nothing = Dataset([], classes, "sites")  # the data stayed at the sites
    request = {"data": str(out / FEDERATION_DIR), "patient_regex": None, "val_fraction": None,
               "target_sensitivity": None, "paths": "hashed",
               "display": PathDisplay("hashed", [])}
    config = _run_config(clf, nothing, request, None, [], run_dir=out)
    config["data"] = {"source": None, "source_relative_to": None, "paths": "hashed",
                      "sites": "deployed: each site's data stayed there"}
    config["federation"] = federation
    write_json(out / bundle.METRICS, {"positive_class": None, "federation": federation,
                                      "params": {"total": fitted.n_total,
                                                 "trainable": fitted.n_trainable}})
    write_csv(out / bundle.HISTORY, history)
    bundle.write_config(out, {"kind": "single", **config})


def make_plan(options: TrainOptions, n_sites: int, *, rounds: int, local_epochs: int | None,
              algorithm: str, mu: float | None, min_sites: int | None,
              dp_epsilon: float | None, dp_delta: float, dp_clip: float,
              patient_regex: str | None, val_fraction: float, round_timeout: float) -> Plan:
    """The federation's plan, every option checked before any data is read."""
    check_choice("strategy", options.strategy, RECIPES)
    check_choice("algorithm", algorithm, ALGORITHMS)
    options.check()
    if n_sites < 2:
        raise MedtlError(f"{n_sites} site given: a federation needs at least 2 (one site "
                         "alone is `medtl train`)")
    if rounds < 1:
        raise MedtlError(f"--rounds {rounds}: at least 1")
    epochs = local_epochs or (5 if options.strategy == "feature-extractor" else 1)
    if epochs < 1:
        raise MedtlError(f"--local-epochs {epochs}: at least 1")
    if mu is not None and algorithm != "fedprox":
        raise MedtlError(f"--mu {mu}: FedProx's proximal weight; add --algorithm fedprox")
    mu = (DEFAULT_MU if mu is None else mu) if algorithm == "fedprox" else 0.0
    if mu < 0:
        raise MedtlError(f"--mu {mu}: must be >= 0")
    min_sites = n_sites if min_sites is None else min_sites
    if not 1 <= min_sites <= n_sites:
        raise MedtlError(f"--min-sites {min_sites}: between 1 and the {n_sites} sites")
    privacy = None
    if dp_epsilon is not None:
        privacy = Privacy(dp_epsilon, dp_delta, dp_clip)
        privacy.check()
        if options.strategy != "feature-extractor":
            raise MedtlError("--dp-epsilon with --strategy fine-tune: Opacus cannot train "
                             "BatchNorm layers privately; use --strategy feature-extractor")
    if round_timeout <= 0:
        raise MedtlError(f"--round-timeout {round_timeout}: must be positive")
    return Plan(options=options.to_dict(), classes=[], rounds=rounds, local_epochs=epochs,
                algorithm=algorithm, mu=mu,
                privacy=None if privacy is None else {"epsilon": privacy.epsilon,
                                                      "delta": privacy.delta,
                                                      "max_grad_norm": privacy.max_grad_norm},
                min_sites=min_sites, round_timeout=round_timeout, patient_regex=patient_regex,
                val_fraction=val_fraction)


def _load(source: str | Path, plan: Plan):
    from medtl.data import load_dataset

    ds = load_dataset(source, patient_regex=plan.patient_regex, val_fraction=plan.val_fraction,
                      seed=plan.train_options.seed)
    if ds.multilabel:
        raise MedtlError(f"{source}: multi-label data; federated training is single-label "
                         "for now (train it with medtl train)")
    for path, reason in ds.skipped:
        log.warning("skipped unreadable image %s: %s", path, reason)
    for split in ("train", "val"):
        ds.split(split)  # a site without one is a user's mistake, said with its name
    return ds


def pool(datasets: Sequence, names: Sequence[str]):
    """The sites' records as one dataset (their splits kept): centralised training's data and
    the pooled figures."""
    from medtl.data.dataset import Dataset

    records, arrays = [], {}
    for ds in datasets:
        records += ds.records
        arrays.update(ds._arrays)
    return Dataset(records, datasets[0].classes, "+".join(names), arrays=arrays,
                   view=datasets[0].view)


def simulate(plan: Plan, workdir: Path, *, quiet: bool = False) -> None:
    """The rounds in Flower's simulation engine: each site a virtual client (a Ray actor)."""
    try:
        from flwr.simulation import run_simulation
    except ImportError as exc:
        raise MedtlError("medtl federate needs Flower: pip install 'medtl[federated]'") from exc
    n = len(plan.sites)
    cores = os.cpu_count() or 1
    actors = max(1, min(n, cores))
    plan.options["threads"] = plan.options.get("threads") or max(1, cores // actors)
    plan.options["quiet"] = True
    _quiet_flower()
    # run_simulation warns that `flwr run` will replace it; it is Flower 1.x's in-process
    # simulation engine, which a library call needs (no app directory or subprocess).
    flwr_log = logging.getLogger("flwr")
    level, flwr_log.level = flwr_log.level, logging.ERROR
    try:
        with follow_rounds(workdir, plan.rounds, quiet=quiet):
            run_simulation(
                server_app=make_server_app(plan, workdir),
                client_app=make_client_app(plan.sites), num_supernodes=n,
                backend_config={"client_resources": {"num_cpus": max(1, cores // actors)},
                                "init_args": {"log_to_driver": False,
                                              "include_dashboard": False}})
    finally:
        flwr_log.setLevel(level)


def _quiet_flower() -> None:
    """Flower's round-by-round INFO lines and Ray's banners stay out of medtl's output."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)


def _request(sites, names, plan: Plan, positive_class, target_sensitivity, paths, run_dir,
             pooled) -> dict[str, Any]:
    from medtl.data.privacy import PathDisplay
    from medtl.files import cache_root
    from medtl.workflow import positive_index

    roots = [Path(s).expanduser() for s in sites]
    display = PathDisplay(paths, [str(p.parent if p.is_file() else p) for p in roots],
                          aliases={cache_root(): "medtl-cache"})
    return {"data": sites[0], "patient_regex": plan.patient_regex,
            "val_fraction": plan.val_fraction, "target_sensitivity": target_sensitivity,
            "positive_class": positive_class, "paths": paths, "display": display,
            "positive": positive_index(pooled.classes, positive_class)}


def _federation_record(plan: Plan, names, datasets, rounds_done, seconds) -> dict[str, Any]:
    return {"mode": "simulation", "algorithm": plan.algorithm, "mu": plan.mu,
            "rounds": plan.rounds, "rounds_done": len(rounds_done),
            "local_epochs": plan.local_epochs, "min_sites": plan.min_sites,
            "sites": [{"name": n, "counts": ds.counts()} for n, ds in
                      zip(names, datasets, strict=True)],
            "wall_s": round(seconds, 1),
            "exchanged": "shared parameters and counts only (medtl.federated.shared)"}


def _privacy_record(plan: Plan, prepared) -> dict[str, Any] | None:
    """Each site's (epsilon, delta) as Opacus' RDP accountant gives for its whole schedule."""
    from medtl.federated.local import noise_multiplier

    privacy = plan.schedule.privacy
    if privacy is None:
        return None
    batch = plan.train_options.batch_size
    sites = []
    for data in prepared:
        n = len(data.y)
        q = min(batch, n) / n
        epochs = plan.rounds * plan.local_epochs
        sigma = noise_multiplier(privacy, q, epochs)
        steps = int(epochs / q)
        sites.append({"n": n, "sample_rate": q, "noise_multiplier": sigma,
                      "epsilon": spent_epsilon(privacy, q, sigma, steps)})
    return {"mechanism": "DP-SGD (Opacus), per-example clipping and Gaussian noise at each site",
            "epsilon_target": privacy.epsilon, "delta": privacy.delta,
            "max_grad_norm": privacy.max_grad_norm, "accountant": "rdp", "sites": sites}


def write_model_run(fitted, options: TrainOptions, pooled, datasets, names, out: Path,
                    request: dict[str, Any], *, history: list[dict[str, Any]], t_start: float,
                    config_extra: dict[str, Any], balanced: bool | None) -> None:
    """A fitted model written as a run: pooled val and test, and each site's test."""
    from medtl.transfer.estimator import TransferClassifier
    from medtl.workflow import _split_metrics, write_fitted

    clf = TransferClassifier.from_options(options)
    clf.model_ = fitted
    clf.classes_ = list(fitted.classes)
    clf.history_ = history
    clf.stages_ = None
    clf.balanced_ = bool(balanced)
    clf.skipped_ = []
    clf.head_params_ = None
    clf.head_name_ = None
    clf.timing_ = {"train_s": time.perf_counter() - t_start, "resumed_s": 0.0,
                   "feature_s": 0.0}
    # No out-of-distribution guard: fitting one needs the sites' training features in one
    # place, which a federation does not have.
    fitted.ood = None
    log.info("no out-of-distribution guard for a federated model: it would need the sites' "
             "features in one place")
    positive = request["positive"]

    def per_site(clf, thresholds) -> dict[str, Any]:
        figures = {}
        for name, ds in zip(names, datasets, strict=True):
            if "test" in ds.split_names():
                m, _, _ = _split_metrics(clf, ds.split("test"), "test", positive,
                                         thresholds=thresholds, seed=clf.seed)
                figures[name] = {"test": m}
        return {"sites": figures}

    request = {**request, "config_extra": config_extra}
    out.mkdir(parents=True, exist_ok=True)
    write_fitted(clf, pooled, out, request, t_start=t_start,
                 extra_metrics=per_site if len(datasets) > 1 else None)


def train_alone(recipe, data, plan: Plan, *, site: int) -> tuple[Any, list[dict[str, Any]]]:
    """The recipe's rounds on one site's data, no server: a baseline of the federation."""
    from medtl.federated.apps import val_counts
    from medtl.transfer.heads import needs_balancing

    o = recipe.options
    balanced = (o.class_weight == "balanced"
                or (o.class_weight == "auto" and needs_balancing(data.y.numpy())))
    model = recipe.initial()
    schedule = plan.schedule
    history = []
    t0 = time.perf_counter()
    from medtl.console import progress_bar

    with progress_bar("rounds", plan.rounds, quiet=o.quiet) as advance:
        for r in range(1, plan.rounds + 1):
            recipe.train_round(model, data, seed=round_seed(o.seed, site, r), schedule=schedule,
                               balanced=balanced)
            counts = recipe.confusion(model, data)
            history.append({"round": r, "seconds": round(time.perf_counter() - t0, 2),
                            "sites_trained": 1, "train_examples": len(data.y),
                            **val_counts({**counts, "sites": 1}, len(recipe.classes))})
            advance(1)
    return model, history


def _baselines(recipe, plan: Plan, datasets, names, prepared, pooled, request, where: Path,
               ) -> None:
    """Each site alone and the pooled data, by the federation's recipe, each a run."""
    import torch

    from medtl.federated.local import SiteData

    where.mkdir(exist_ok=True)
    jobs = list(zip(names, prepared, strict=True))
    if len(prepared) > 1 and all(isinstance(p.x, torch.Tensor) for p in prepared):
        jobs.append(("pooled", SiteData(torch.cat([p.x for p in prepared]),
                                        torch.cat([p.y for p in prepared]),
                                        torch.cat([p.x_val for p in prepared]),
                                        torch.cat([p.y_val for p in prepared]), [])))
    for i, (name, data) in enumerate(jobs):
        t0 = time.perf_counter()
        log.info("baseline %s: %d training images, the federation's recipe", name, len(data.y))
        model, history = train_alone(recipe, data, plan, site=i)
        extra = {"federation": {"baseline": "pooled" if name == "pooled" else f"{name} alone",
                                "rounds": plan.rounds, "local_epochs": plan.local_epochs,
                                "wall_s": round(time.perf_counter() - t0, 1)}}
        write_model_run(recipe.fitted(model), recipe.options, pooled, datasets, names,
                        where / name, request, history=history, t_start=t0,
                        config_extra=extra, balanced=None)
        bundle.write_marker(where / name)


def compare(run: Path) -> list[dict[str, Any]]:
    """The federated model and its baselines side by side: pooled test AUC with its CI."""
    from medtl.run import load_run

    rows = []
    for name, path in [("federated", run), *sorted(
            (p.name, p) for p in (run / BASELINES_DIR).glob("*") if p.is_dir())]:
        m = load_run(path).metrics.get("test", {})
        rows.append({"model": name, "auc": m.get("auc"), "auc_ci95": m.get("auc_ci95"),
                     "n": m.get("n")})
    return rows
