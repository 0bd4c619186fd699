"""``fine-tune --frozen-cache K`` (medtl.transfer.lower_cache): the frozen blocks run once, the
top blocks train on their kept output, and nothing frozen moves."""

from __future__ import annotations

import pytest
import torch

from medtl.data import load_dataset
from medtl.errors import MedtlError
from medtl.transfer.estimator import TransferClassifier
from medtl.transfer.lower_cache import EpochCopies, check_cache

from ..conftest import write_blob_images


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = write_blob_images(tmp_path_factory.mktemp("lower") / "data", n_per_class=12,
                             size=40, splits=("train", "val"))
    return load_dataset(root)


def _fit(blobs, **options):
    clf = TransferClassifier(backbone="mobilenet_v2", strategy="fine-tune", unfreeze=2,
                             epochs=3, image_size=32, batch_size=8, quiet=True, cache=False,
                             **options)
    return clf.fit(blobs.split("train"), blobs.split("val"))


def test_one_plain_version_trains_as_plain_fine_tuning(blobs):
    from medtl.models import create_backbone

    plain = _fit(blobs, augment="none")
    cached = _fit(blobs, augment="none", frozen_cache=1)
    # The same steps on the same inputs: equal up to float summation order.
    assert [r["train_loss"] for r in cached.history_] == pytest.approx(
        [r["train_loss"] for r in plain.history_], rel=1e-4)
    a, b = plain.model_.network.state_dict(), cached.model_.network.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)
    # What is frozen stays exactly the pretrained weights.
    start = create_backbone("mobilenet_v2", weights="imagenet").state_dict()
    top = set(list(cached.model_.network.blocks)[-2:])
    frozen = [k for k in b if k.startswith("blocks.") and k.split(".")[1] not in top]
    assert frozen and all(torch.equal(b[k], start[k]) for k in frozen)
    assert any(not torch.equal(b[k], start[k]) for k in b
               if k.startswith("blocks.") and k.split(".")[1] in top)


def test_epochs_cycle_through_the_kept_versions():
    copies = torch.arange(3 * 4).float().view(3, 4)
    kept = EpochCopies(copies)
    assert len(kept) == 4 and kept.shape == (4,)
    assert [kept.for_epoch(e)[0].item() for e in (1, 2, 3, 4)] == [0.0, 4.0, 8.0, 0.0]


def test_augmented_versions_are_kept_and_differ(blobs):
    clf = _fit(blobs, augment="basic", frozen_cache=3)
    assert len(clf.history_) == 3


def test_frozen_cache_mistakes_are_refused_before_any_data():
    for args, match in [((1, "basic", "none", 1, 8), "at least 2"),
                        ((3, "none", "none", 1, 8), "the same image"),
                        ((2, "basic", "mixup", 1, 8), "--mix"),
                        ((2, "basic", "none", 8, 8), "frozen blocks to cache")]:
        with pytest.raises(MedtlError, match=match):
            check_cache(*args)
    check_cache(0, "strong", "both", 8, 8)  # off: nothing to check
    with pytest.raises(MedtlError, match="--gradual"):
        TransferClassifier(strategy="fine-tune", gradual=True, frozen_cache=2).make_strategy()
