"""Deep CORAL (medtl.training.align) and the loop's unlabelled term (loop.Unlabelled).

The loss against a hand computation; a training toward a brightness/contrast-shifted target
lowers the CORAL distance of the predicted features; weight 0 trains exactly as no alignment;
frozen strategies refuse it; a resumed aligned run is bitwise an uninterrupted one; config.json
records it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import medtl
from medtl.errors import MedtlError
from medtl.training.align import coral_loss, covariance, unlabelled_term
from medtl.training.loop import TrainConfig, fit
from medtl.training.options import TrainOptions
from medtl.transfer.estimator import TransferClassifier
from tests.conftest import write_blob_images
from tests.training.test_loop import make_data

# ------------------------------------------------------------------------------ the loss


def test_coral_loss_is_zero_for_one_distribution_and_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=g)
    assert float(coral_loss(a, a)) == 0.0
    # the same distribution in another order: the same covariance (up to rounding)
    assert float(coral_loss(a, a[torch.randperm(40, generator=g)])) < 1e-12
    # a shifted mean alone does not change a covariance; a scaled one does
    assert float(coral_loss(a, a + 3.0)) < 1e-12
    b = torch.randn(30, 6, generator=g) * 2.0 + 1.0
    got = float(coral_loss(a, b))
    assert got > 0
    # by hand: unbiased covariances (np.cov, rows = samples), ||C_S - C_T||_F^2 / (4 d^2)
    cs, ct = np.cov(a.double().numpy(), rowvar=False), np.cov(b.double().numpy(), rowvar=False)
    assert got == pytest.approx(((cs - ct) ** 2).sum() / (4 * 6 ** 2), rel=1e-5)
    assert torch.allclose(covariance(a).double(), torch.from_numpy(cs), atol=1e-5)
    # and its gradient exists (it trains the features)
    a.requires_grad_(True)
    coral_loss(a, b).backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0


def test_a_batch_of_one_adds_nothing_and_shapes_are_checked():
    x = torch.randn(5, 3)
    assert float(coral_loss(x[:1], x)) == 0.0
    with pytest.raises(MedtlError, match="same d"):
        coral_loss(x, torch.randn(5, 4))


# ------------------------------------------------------------------------------ the options


@pytest.mark.parametrize("bad,match", [
    (dict(align="coral"), "needs --align-target"),
    (dict(align_target=["x"]), "without --align"),
    (dict(align="dann", align_target=["x"]), "unknown --align"),
    (dict(align="coral", align_target=["x"], align_weight=-1.0), "--align-weight"),
    (dict(align="coral", align_target="x"), "list of image files"),
])
def test_bad_align_options_are_refused_before_any_work(bad, match):
    with pytest.raises(MedtlError, match=match):
        TrainOptions(**bad).check()


# ------------------------------------------------------------------------------ training

SHIFT = (0.7, 60.0)  # target = source-like images at 0.7x contrast, +60 brightness


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("align")
    source = write_blob_images(root / "source", n_per_class=16, size=32,
                               splits=("train", "val", "test"))
    raw = write_blob_images(root / "raw", n_per_class=16, size=32, seed=3, splits=("x",))
    target = root / "target"
    for p in sorted(raw.rglob("*.png")):
        a = np.asarray(Image.open(p)).astype(np.float64) * SHIFT[0] + SHIFT[1]
        q = target / p.name  # a flat folder: no class names, as unlabelled images come
        q.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(q)
    return source, target


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """The OOD guard's covariance (1,280-d) on BLAS threads that share two busy cores took
    16 s instead of 0.5 s with one thread here: the runs below are otherwise a second each."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


FAST = dict(backbone="mobilenet_v2", strategy="full", image_size=32, epochs=2, batch_size=8,
            augment="none", quiet=True, seed=0, threads=1)  # 1: no spinning on shared cores


def _fit(source: Path, **options) -> TransferClassifier:
    ds = medtl.load_dataset(source)
    return TransferClassifier(**{**FAST, **options}).fit(ds.split("train"), ds.split("val"))


def _coral_distance(model, source: Path, target: Path) -> float:
    """CORAL distance of the fitted model's predicted features: source train vs target."""
    from medtl.data import dataset_from_files

    fs = model.features_and_proba(medtl.load_dataset(source).split("train"),
                                  calibrated=False, cache=False)[0]
    ft = model.features_and_proba(dataset_from_files([target], classes=model.classes),
                                  calibrated=False, cache=False)[0]
    return float(coral_loss(torch.from_numpy(fs), torch.from_numpy(ft)))


@pytest.fixture(scope="module")
def plain(domains):
    return _fit(domains[0])


def test_alignment_lowers_the_coral_distance(domains, plain):
    source, target = domains
    aligned = _fit(source, align="coral", align_target=[str(target)])
    before = _coral_distance(plain.model_, source, target)
    after = _coral_distance(aligned.model_, source, target)
    # measured: 5.4e-07 -> 3.2e-07, mostly by smaller covariances (trace of the source's
    # 3.5 -> 2.8, of the target's 0.80 -> 0.63): see "Watch" in docs/domain-adaptation.md
    assert after < 0.8 * before, (before, after)
    assert all(row["train_coral"] > 0 for row in aligned.history_)


def test_weight_zero_trains_exactly_as_no_alignment(domains, plain):
    source, target = domains
    zero = _fit(source, align="coral", align_target=[str(target)], align_weight=0.0)
    a, b = plain.model_.network.state_dict(), zero.model_.network.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the target was read and paired (the term was computed), it only weighed nothing
    assert all(row["train_coral"] > 0 for row in zero.history_)


def test_a_run_records_its_alignment_and_flags_test_images_aligned_to(domains, plain,
                                                                      tmp_path):
    from medtl.workflow import _align_record

    source, target = domains
    # the shifted images and the run's own 32 test images: transductive for those
    run = medtl.train(source, **{**FAST, "epochs": 1}, align="coral",
                      align_target=[str(target), str(source / "test")],
                      out=tmp_path / "coral")
    rec = run.config["align"]
    assert rec == {"method": "coral", "weight": 1.0, "target_images": 64,
                   "target_fingerprint": medtl.data.dataset_from_files(
                       [target, source / "test"], classes=run.config["classes"]).fingerprint(),
                   "test_images_in_target": 32}
    assert run.config["strategy_params"]["align"] == "coral"
    # as given (the data root's own folder relative to it, as --paths relative writes)
    assert run.config["options"]["align_target"] == [str(target), "test"]
    assert "train_coral" in (run.path / "history.csv").read_text().splitlines()[0].split(",")
    assert "the test figures are transductive" in (run.path / "log.txt").read_text()
    # the recorded options pass the checks of a shared run's model.json when it is loaded
    assert medtl.load_run(run.path).load_model(quiet=True).options.align == "coral"
    meta_path = run.path / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["params"]["align_target"] = {"../../etc": 1}  # a shared run is untrusted input
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(MedtlError, match="align_target"):
        medtl.load_run(run.path)
    # without --align: no record, and strategy_params as before --align existed
    ds = medtl.load_dataset(source)
    assert _align_record(plain, ds) == {}
    assert not {"align", "align_target", "align_weight"} & set(
        plain.make_strategy().own_values())


def test_the_frozen_cache_path_aligns_its_kept_target_copies(domains):
    source, target = domains
    clf = _fit(source, strategy="fine-tune", unfreeze=2, frozen_cache=1, align="coral",
               align_target=[str(target)])
    assert clf.align_["target_images"] == 32
    assert all(row["train_coral"] > 0 for row in clf.history_)


@pytest.mark.parametrize("strategy", ["feature-extractor", "hybrid"])
def test_frozen_strategies_refuse_alignment(domains, strategy, tmp_path, capsys):
    source, target = domains
    with pytest.raises(MedtlError, match="frozen, so its features cannot move toward"):
        medtl.train(source, strategy=strategy, align="coral", align_target=[str(target)],
                    out=tmp_path / "x", quiet=True)
    from tests.test_cli import one_line_error, run_cli

    code, _, err = run_cli(["train", source, "--strategy", strategy, "--align", "coral",
                            "--align-target", target, "--out", tmp_path / "y", "--quiet"],
                           capsys)
    assert code == 2 and "--align coral" in one_line_error(err)
    assert not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------ resume


class _Net(nn.Module):
    """Blocks, pooled features and a ``classifier``; BatchNorm and dropout, both of which a
    resumed run must restore."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Dropout2d(0.2), nn.Conv2d(8, 12, 3, padding=1),
                                  nn.BatchNorm2d(12), nn.ReLU())
        self.classifier = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x).mean(dim=(2, 3)))


class _Stop(Exception):
    pass


class _StopAfter:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_fit_start(self, state) -> None: ...
    def on_fit_end(self, state) -> None: ...

    def on_epoch_end(self, state) -> None:
        if state.epoch == self.epoch:
            raise _Stop


def _shifted(x: torch.Tensor) -> torch.Tensor:
    return (x.float() * SHIFT[0] + SHIFT[1]).clamp(0, 255).to(torch.uint8)


def test_an_aligned_run_resumes_bitwise(tmp_path):
    from medtl.data.augment import make_augment

    x, y = make_data(40, 1)
    xv, yv = make_data(16, 2)
    xt = _shifted(make_data(23, 3)[0])  # not a multiple of the batch: permutations wrap
    cfg = TrainConfig(epochs=3, batch_size=8, patience=3, seed=4, threads=1)
    augment = make_augment("basic", hflip=True)  # the target is augmented too, seeded
    torch.manual_seed(0)
    start = _Net()

    def run(**kw):
        m = copy.deepcopy(start)
        params = [{"name": "all", "params": list(m.parameters()), "lr": 1e-2}]
        result = fit(m, params, x, y, xv, yv, cfg, augment=augment,
                     unlabelled=unlabelled_term("coral", xt, 5.0), **kw)
        return m, result

    whole, whole_result = run()
    with pytest.raises(_Stop):
        run(checkpoint_dir=tmp_path, callbacks=[_StopAfter(2)])
    resumed, resumed_result = run(checkpoint_dir=tmp_path, resume=True)
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in whole_result.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"}
                     for r in resumed_result.history]
    assert all(r["train_coral"] > 0 for r in whole_result.history)
    # another weight (or target) is another training: refused, not silently continued
    with pytest.raises(MedtlError, match="different unlabelled term"):
        m = copy.deepcopy(start)
        fit(m, [{"name": "all", "params": list(m.parameters()), "lr": 1e-2}], x, y, xv, yv,
            cfg, augment=augment, unlabelled=unlabelled_term("coral", xt, 1.0),
            checkpoint_dir=tmp_path, resume=True)
