"""Flower's two apps for medtl: the server (rounds, FedAvg or FedProx) and the site (client).

The same handlers run in Flower's simulation engine (one process, the sites as Ray actors) and in
its deployment engine (a SuperLink and one SuperNode per hospital, medtl.federated.deploy). The
server sends the global shared tensors and the plan (a JSON config: options, classes, schedule);
a site answers with its updated tensors and counts only, checked on both ends
(medtl.federated.shared). A site's data never leaves it: which folder it reads is the site's
own setting (its SuperNode's ``--node-config``), or in simulation its position in the list the
coordinator was given.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import MedtlError
from medtl.federated.local import (
    Privacy,
    Recipe,
    Schedule,
    SiteData,
    get_recipe,
    round_seed,
)
from medtl.federated.shared import FederationError, check_reply
from medtl.files import atomic_write
from medtl.training.options import TrainOptions

log = logging.getLogger("medtl")

ROUNDS_FILE = "rounds.json"
ARRAYS_FILE = "global.npz"
PLAN_FILE = "plan.json"
NAMED_WEIGHTS = ("imagenet", "random")
KEEP_PREPARED = 4  # sites' prepared data one process keeps (features, or decoded images)


@dataclass
class Plan:
    """What the server asks of every site: JSON in each message's config, so a SuperNode
    started before the run needs nothing but its data."""

    options: dict[str, Any]
    classes: list[str]
    rounds: int
    local_epochs: int
    algorithm: str = "fedavg"
    mu: float = 0.0
    privacy: dict[str, float] | None = None
    min_sites: int = 2
    round_timeout: float = 3600.0
    patient_regex: str | None = None
    val_fraction: float = 0.2
    sites: list[str] = field(default_factory=list)  # simulation: the sites' data, by position

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as exc:
            raise FederationError(f"not a medtl federation plan: {exc}") from exc

    @property
    def train_options(self) -> TrainOptions:
        return TrainOptions(**self.options)

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.rounds, self.local_epochs, self.mu,
                        Privacy(**self.privacy) if self.privacy else None)

    def recipe(self) -> Recipe:
        return get_recipe(self.options["strategy"])(self.train_options, self.classes)

    def for_sites(self) -> str:
        """The plan as sent: without the list of simulated sites' folders."""
        return json.dumps({**asdict(self), "sites": []}, sort_keys=True)


# --------------------------------------------------------------------------------- site side
_PREPARED: dict[tuple, tuple[Recipe, SiteData, bool]] = {}
_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def _plan_of(msg) -> Plan:
    config = msg.content["config"]
    return Plan.from_json(str(config["plan"]))


def _site_of(context, sites: Sequence[str]) -> tuple[int, str]:
    """(number, data) of this site: its node config's ``data`` (deployment), or its place in
    the coordinator's list (simulation)."""
    node = context.node_config
    if "data" in node:
        data = str(node["data"])
        return zlib.crc32(data.encode()) & 0x7FFFFFFF, data
    if "partition-id" in node and sites:
        i = int(node["partition-id"])
        return i, sites[i]
    raise FederationError("this site has no data: start its SuperNode with "
                          "--node-config \"data='/path/to/site'\"")


def _prepared(context, plan: Plan, sites: Sequence[str]) -> tuple[int, Recipe, SiteData, bool]:
    from medtl.data import load_dataset

    number, data = _site_of(context, sites)
    node = context.node_config
    # How the site's data is read is the site's own setting where its node config gives it.
    regex = node.get("patient-regex", plan.patient_regex)
    val_fraction = float(node.get("val-fraction", plan.val_fraction))
    key = (data, regex, val_fraction, json.dumps(plan.options, sort_keys=True),
           tuple(plan.classes))
    if key not in _PREPARED:
        if "data" in node and plan.options.get("weights") not in NAMED_WEIGHTS:
            # A deployed site opens no file the server names: weights from a file are the
            # site's own choice (its node config's ``weights``), never the plan's.
            if "weights" not in node:
                raise FederationError(f"the federation asks for weights "
                                      f"{plan.options.get('weights')!r}: a site loads only "
                                      "imagenet or random weights unless its node config "
                                      "names a weights file")
            plan.options["weights"] = str(node["weights"])
        recipe = plan.recipe()
        ds = load_dataset(data, patient_regex=regex or None, val_fraction=val_fraction,
                          seed=recipe.options.seed)
        if ds.classes != plan.classes:
            raise FederationError(f"{data}: classes {ds.classes}, the federation's are "
                                  f"{plan.classes}")
        train, val = ds.split("train"), ds.split("val")
        site = recipe.prepare(train, val)
        strategy = recipe.options
        from medtl.transfer.heads import needs_balancing

        balanced = (strategy.class_weight == "balanced"
                    or (strategy.class_weight == "auto" and needs_balancing(site.y.numpy())))
        # A simulation actor serves several sites in turn: keep the last few prepared.
        while len(_PREPARED) >= KEEP_PREPARED:
            _PREPARED.pop(next(iter(_PREPARED)))
        _PREPARED[key] = (recipe, site, balanced)
    recipe, site, balanced = _PREPARED[key]
    return number, recipe, site, balanced


def site_train(msg, context, sites: Sequence[str] = ()):
    """A round of local training from the global tensors in ``msg``."""
    from flwr.app import Message, MetricRecord, RecordDict

    plan = _plan_of(msg)
    number, recipe, data, balanced = _prepared(context, plan, sites)
    model = recipe.from_arrays(_numpy(msg.content["arrays"]), source="the server's message")
    server_round = int(msg.content["config"]["server-round"])
    mu = float(msg.content["config"].get("proximal-mu", plan.mu))
    schedule = Schedule(plan.rounds, plan.local_epochs, mu, plan.schedule.privacy)
    # The global model this round starts from, counted on validation before it trains: the
    # previous round's figures come with this reply, so a round is one exchange, not two.
    counts = recipe.confusion(model, data)
    recipe.train_round(model, data, seed=round_seed(recipe.options.seed, number, server_round),
                       schedule=schedule, balanced=balanced)
    reply = RecordDict({"arrays": _arrays(recipe.to_arrays(model)),
                        "metrics": MetricRecord({"num-examples": len(data.y), **counts})})
    return Message(reply, reply_to=msg)


def site_evaluate(msg, context, sites: Sequence[str] = ()):
    """The global model's confusion counts on the site's validation split."""
    from flwr.app import Message, MetricRecord, RecordDict

    plan = _plan_of(msg)
    _, recipe, data, _ = _prepared(context, plan, sites)
    model = recipe.from_arrays(_numpy(msg.content["arrays"]), source="the server's message")
    counts = recipe.confusion(model, data)
    reply = RecordDict({"metrics": MetricRecord({"num-examples": len(data.y_val), **counts})})
    return Message(reply, reply_to=msg)


def only_parameters_and_counts(msg, context, call_next):
    """Client mod: every reply this site sends is checked against the rule of
    medtl.federated.shared before it leaves; one that breaks it is never sent."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    plan = _plan_of(msg)
    if plan.for_sites() not in _SHAPES:
        _SHAPES.clear()
        _SHAPES[plan.for_sites()] = plan.recipe().shapes()
    check_reply(reply.content, _SHAPES[plan.for_sites()],
                train=msg.metadata.message_type == "train", num_classes=len(plan.classes),
                source="this site's reply")
    return reply


def make_client_app(sites: Sequence[str] = (), mods: Sequence = ()):
    """The site's ClientApp. ``sites``: in simulation, the data of the virtual client with
    partition-id i is ``sites[i]``; deployed, each SuperNode names its own. ``mods`` run
    outside medtl's guard, so they see what leaves the site (tests inspect with them)."""
    from flwr.clientapp import ClientApp

    sites = list(sites)
    app = ClientApp(mods=[*mods, only_parameters_and_counts])

    @app.train()
    def train(msg, context):
        return site_train(msg, context, sites)

    @app.evaluate()
    def evaluate(msg, context):
        return site_evaluate(msg, context, sites)

    return app


# ------------------------------------------------------------------------------- server side
def _numpy(record) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _arrays(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v))
                        for k, v in arrays.items()})


class _Present:
    """The grid as a strategy sees it: without the sites dropped from the federation."""

    def __init__(self, grid, dropped: set[int]) -> None:
        self._grid, self._dropped = grid, dropped

    def get_node_ids(self):
        return [n for n in self._grid.get_node_ids() if n not in self._dropped]

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _strategy(plan: Plan, shapes: dict[str, tuple[int, ...]]):
    """Flower's FedAvg or FedProx, refusing replies that break the rule and rounds with fewer
    than ``min_sites`` answers. A site that gives no valid reply in time (killed, failed, or
    refused) is dropped: it is not asked again, so later rounds do not wait out
    ``round_timeout`` for a node the SuperLink still lists until its heartbeat lapses (up to
    60 s). Started again, a site is a new node and joins the next round."""
    from flwr.serverapp.strategy import FedAvg, FedProx

    base = FedProx if plan.algorithm == "fedprox" else FedAvg
    k = len(plan.classes)
    dropped: set[int] = set()
    asked: set[int] = set()

    def checked(replies, train: bool, server_round: int):
        replies = list(replies)
        good = []
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: site %s failed: %s", server_round,
                            msg.metadata.src_node_id, _last_line(msg.error.reason))
                continue
            try:
                check_reply(msg.content, shapes, train=train, num_classes=k,
                            source=f"site {msg.metadata.src_node_id}")
            except FederationError as exc:
                log.warning("round %d: reply refused: %s", server_round, exc)
                continue
            good.append(msg)
        missed = asked - {m.metadata.src_node_id for m in good}
        if missed:
            log.warning("round %d: %d site(s) gave no valid reply by the deadline and are "
                        "dropped from the federation (a site started again rejoins)",
                        server_round, len(missed))
            dropped.update(missed)
        asked.clear()
        if train and len(good) < plan.min_sites:
            raise FederationError(f"round {server_round}: {len(good)} site(s) answered, fewer "
                                  f"than --min-sites {plan.min_sites}")
        return good

    class Checked(base):
        def configure_train(self, server_round, arrays, config, grid):
            messages = list(super().configure_train(server_round, arrays, config,
                                                    _Present(grid, dropped)))
            asked.update(m.metadata.dst_node_id for m in messages)
            return messages

        def aggregate_train(self, server_round, replies):
            return super().aggregate_train(server_round, checked(replies, True, server_round))

        def evaluate_final(self, grid, arrays, server_round: int):
            """The last global model counted at every site: the one exchange after the
            rounds (each round's training reply counted the model it started from)."""
            from flwr.app import ConfigRecord, Message, MessageType, RecordDict

            config = ConfigRecord({"plan": plan.for_sites(), "server-round": server_round})
            messages = [Message(RecordDict({"arrays": arrays, "config": config}),
                                message_type=MessageType.EVALUATE, dst_node_id=node)
                        for node in _Present(grid, dropped).get_node_ids()]
            asked.update(m.metadata.dst_node_id for m in messages)
            replies = grid.send_and_receive(messages, timeout=plan.round_timeout)
            return _summed([m.content for m in checked(replies, False, server_round)], "")

    kw = dict(fraction_evaluate=0.0, min_train_nodes=plan.min_sites,
              min_available_nodes=plan.min_sites, train_metrics_aggr_fn=_summed)
    if base is FedProx:
        kw["proximal_mu"] = plan.mu
    return Checked(**kw)


def _summed(records, weight_key: str = ""):
    """The sites' counts added up, and how many sites sent them (Flower's metric aggregation
    would average them)."""
    from flwr.app import MetricRecord

    total: dict[str, int] = {}
    for rd in records:
        for key, value in rd["metrics"].items():
            total[key] = total.get(key, 0) + int(value)
    return MetricRecord({**total, "sites": len(records)})


def serve_rounds(grid, plan: Plan, workdir: Path) -> None:
    """The server's work: the rounds, each round's global tensors and counts saved to
    ``workdir`` as they end (an interrupted federation keeps its last round)."""
    from flwr.app import ConfigRecord

    recipe = plan.recipe()
    initial = recipe.to_arrays(recipe.initial())
    shapes = {k: tuple(v.shape) for k, v in initial.items()}
    strategy = _strategy(plan, shapes)
    rounds: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def after_round(server_round: int, arrays) -> None:
        if server_round == 0:
            return None
        with atomic_write_npz(workdir / ARRAYS_FILE) as f:
            np.savez(f, **_numpy(arrays))
        rounds.append({"round": server_round, "seconds": round(time.perf_counter() - t0, 2)})
        atomic_write(workdir / ROUNDS_FILE, json.dumps(rounds, indent=1).encode())
        return None

    config = ConfigRecord({"plan": plan.for_sites()})
    result = strategy.start(grid=grid, initial_arrays=_arrays(initial), num_rounds=plan.rounds,
                            timeout=plan.round_timeout, train_config=config,
                            evaluate_fn=after_round)
    final = strategy.evaluate_final(grid, result.arrays, plan.rounds)
    trained = result.train_metrics_clientapp
    for row in rounds:
        r = row["round"]
        train = trained.get(r)
        row["sites_trained"] = int(train["sites"]) if train else 0
        row["train_examples"] = int(train["num-examples"]) if train else 0
        # Round r's model was counted by the sites that started round r + 1 (or at the end).
        counted = trained.get(r + 1) if r < plan.rounds else final
        if counted:
            row.update(val_counts(dict(counted), len(plan.classes)))
    atomic_write(workdir / ROUNDS_FILE, json.dumps(rounds, indent=1).encode())


def _last_line(text: str) -> str:
    """The message of a remote traceback: its last non-empty line, without Ray's decoration."""
    lines = [ln.strip(" '>") for ln in str(text).splitlines() if ln.strip(" '>")]
    return lines[-1][:500] if lines else "no reason given"


def val_counts(counts: dict[str, Any], k: int) -> dict[str, Any]:
    """Pooled validation figures of a round from the sites' summed confusion counts."""
    m = np.array([[int(counts.get(f"c{t}_{p}", 0)) for p in range(k)] for t in range(k)])
    n = int(m.sum())
    row: dict[str, Any] = {"sites_evaluated": int(counts.get("sites", 0)), "val_n": n,
                           "val_accuracy": float(np.trace(m) / n) if n else None}
    recall = [m[t, t] / m[t].sum() for t in range(k) if m[t].sum()]
    row["val_balanced_accuracy"] = float(np.mean(recall)) if recall else None
    return row


class atomic_write_npz:
    """A binary file handle whose content replaces ``path`` only when complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".part")

    def __enter__(self):
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed in __exit__
        return self.f

    def __exit__(self, kind, value, tb) -> None:
        import os

        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def make_server_app(plan: Plan | None = None, workdir: Path | None = None):
    """The ServerApp: given its plan (simulation), or deployed, reading it from the plan.json
    that ``medtl federate --superlink`` left in the run config's ``workdir``."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        w = workdir or Path(str(context.run_config["workdir"]))
        p = plan or Plan.from_json((w / PLAN_FILE).read_text())
        try:
            serve_rounds(grid, p, w)
        except MedtlError as exc:
            atomic_write(w / "error.txt", str(exc).encode())
            raise

    return app


def rounds_done(workdir: Path) -> int:
    """How many rounds the server has saved in ``workdir`` so far."""
    try:
        return len(json.loads((workdir / ROUNDS_FILE).read_text()))
    except (OSError, ValueError):
        return 0


@contextmanager
def follow_rounds(workdir: Path, rounds: int, *, quiet: bool) -> Iterator[None]:
    """A progress bar (with ETA) over the rounds, advanced as the server saves each one, from
    a thread: the rounds run inside Flower, in this process or at a SuperLink."""
    from medtl.console import progress_bar

    stop = threading.Event()
    with progress_bar("federated rounds", rounds, quiet=quiet) as advance:
        def watch() -> None:
            shown = 0
            while True:
                finished = stop.wait(0.5)
                now = rounds_done(workdir)
                if now > shown:
                    advance(now - shown)
                    shown = now
                if finished:
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


def load_global(workdir: Path) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """The last round's global tensors and the rounds' record, as the server saved them."""
    path = workdir / ARRAYS_FILE
    if not path.exists():
        error = workdir / "error.txt"
        why = error.read_text() if error.exists() else "the server saved no round"
        raise FederationError(f"the federation ended without a model: {why}")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    rounds = json.loads((workdir / ROUNDS_FILE).read_text())
    return arrays, rounds
