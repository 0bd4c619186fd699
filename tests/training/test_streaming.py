"""Training data larger than memory (medtl.training.streaming): the memory budget chooses
between one decoded tensor and images streamed by worker processes, and both train alike."""

from __future__ import annotations

import pytest
import torch

from medtl.data import load_dataset
from medtl.data.transforms import Preprocessing
from medtl.errors import DataReadError, MedtlError
from medtl.training.loop import TrainConfig, data_digest, fit
from medtl.training.options import TrainOptions, parse_budget, total_memory
from medtl.training.streaming import StreamedImages, index_batches, load_batches
from medtl.transfer.fitted import decode_images
from medtl.transfer.strategies import FullStrategy

from ..conftest import write_blob_images
from .test_loop import TinyNet

PRE = Preprocessing(size=32, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = write_blob_images(tmp_path_factory.mktemp("stream") / "data", n_per_class=14,
                             size=40, splits=("train", "val"))
    return load_dataset(root)


def _fit(x, y, xv, yv):
    torch.manual_seed(0)
    model = TinyNet()
    from medtl.data.augment import make_augment

    config = TrainConfig(epochs=2, batch_size=8, patience=2, seed=1, mean=PRE.mean,
                         std=PRE.std, threads=1)
    result = fit(model, [{"name": "all", "params": model.parameters(), "lr": 3e-3}],
                 x, y, xv, yv, config, augment=make_augment("basic", hflip=True))
    return model.state_dict(), result.history


def test_streamed_images_train_bit_for_bit_as_decoded_ones(blobs):
    train, val = blobs.split("train"), blobs.split("val")
    x, keep, _ = decode_images(train, PRE, skip_bad=False, quiet=True)
    xv, keep_v, _ = decode_images(val, PRE, skip_bad=False, quiet=True)
    y, yv = torch.from_numpy(train.labels[keep]), torch.from_numpy(val.labels[keep_v])
    in_memory = _fit(x, y, xv, yv)
    streamed = _fit(StreamedImages(train, PRE, workers=2), y,
                    StreamedImages(val, PRE, workers=1), yv)
    assert [r["train_loss"] for r in in_memory[1]] == [r["train_loss"] for r in streamed[1]]
    for name, t in in_memory[0].items():
        assert torch.equal(t, streamed[0][name]), name


def test_streamed_batches_are_the_decoded_rows_in_the_order_asked(blobs):
    train = blobs.split("train")
    x, _, _ = decode_images(train, PRE, skip_bad=False, quiet=True)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    plan = [order[:5], order[5:6], order[6:]]
    got = list(load_batches(StreamedImages(train, PRE, workers=2), plan))
    assert [idx.tolist() for idx, _ in got] == [b.tolist() for b in plan]
    for idx, images in got:
        assert torch.equal(images, x[idx])
    assert [b.tolist() for b in index_batches(5, 2)] == [[0, 1], [2, 3], [4]]


def _options(budget: str) -> TrainOptions:
    return TrainOptions(strategy="full", memory_budget=budget, image_size=32, quiet=True)


def test_the_memory_budget_chooses_what_is_streamed(blobs):
    train, val = blobs.split("train"), blobs.split("val")
    one = 32 * 32 * 3  # bytes of one decoded image
    cases = {"50%": (torch.Tensor, torch.Tensor), "0": (StreamedImages, StreamedImages),
             # train and val do not fit together, val alone does: only train streams
             f"{(len(train) + len(val)) * one - 1}": (StreamedImages, torch.Tensor),
             f"{(len(train) + len(val)) * one}": (torch.Tensor, torch.Tensor)}
    for budget, (kind_x, kind_v) in cases.items():
        x, y, xv, yv = FullStrategy(_options(budget)).images(train, val, PRE, [])
        assert isinstance(x, kind_x) and isinstance(xv, kind_v), budget
        assert y.tolist() == train.labels.tolist() and yv.tolist() == val.labels.tolist()


def test_a_streamed_split_has_its_own_digest(blobs):
    train = blobs.split("train")
    a = data_digest(StreamedImages(train, PRE))
    assert a == data_digest(StreamedImages(train, PRE))
    assert a != data_digest(StreamedImages(train.subset(range(len(train) - 1)), PRE))
    assert a != data_digest(StreamedImages(train, Preprocessing(48, PRE.mean, PRE.std)))


def test_an_unreadable_streamed_image_stops_training_or_is_skipped_once(tmp_path):
    root = write_blob_images(tmp_path / "data", n_per_class=6, size=40, splits=("train",))
    train = load_dataset(root).split("train")
    # Damaged after loading checked every file's header (as a file truncated on disk would be
    # found only when decoded).
    bad = next((root / "train" / "disc").iterdir())
    bad.write_bytes(b"not a png")
    i_bad = train.uids.index(str(bad))
    plan = [torch.arange(len(train))]
    with pytest.raises(DataReadError) as err:
        list(StreamedImages(train, PRE, workers=1).batches(plan))
    assert str(bad) in str(err.value)
    skipped: list[str] = []
    streamed = StreamedImages(train, PRE, workers=1, skip_bad=True, skipped=skipped)
    for _ in range(2):  # two epochs: reported once
        [(idx, images)] = list(streamed.batches(plan))
        assert i_bad not in idx.tolist() and len(idx) == len(train) - 1 == len(images)
    assert len(skipped) == 1 and str(bad) in skipped[0]


def test_memory_budget_values():
    assert parse_budget("0") == 0
    assert parse_budget("512MB") == 512 << 20
    assert parse_budget("1.5GB") == int(1.5 * (1 << 30))
    assert parse_budget("50%") == total_memory() // 2
    for bad in ("lots", "-1GB", "150%"):
        with pytest.raises(MedtlError, match="--memory-budget"):
            TrainOptions(memory_budget=bad).check()


def test_a_streamed_run_writes_the_same_predictions_as_one_in_memory(tmp_path):
    from medtl.workflow import train as run_train

    root = write_blob_images(tmp_path / "data", n_per_class=10, size=40,
                             splits=("train", "val", "test"))
    runs = {budget: run_train(root, strategy="fine-tune", unfreeze=2, epochs=2,
                              image_size=32, batch_size=8, quiet=True, memory_budget=budget,
                              out=tmp_path / f"run-{budget.strip('%')}")
            for budget in ("50%", "0")}
    a, b = (r.path / "predictions.csv" for r in runs.values())
    assert a.read_text() == b.read_text()
    assert runs["0"].config["options"]["memory_budget"] == "0"


def test_images_are_decoded_once_into_the_store_and_read_back(tmp_path):
    root = write_blob_images(tmp_path / "data", n_per_class=5, size=40, splits=("train",))
    train = load_dataset(root).split("train")
    plan = [torch.arange(len(train))]
    first = StreamedImages(train, PRE, workers=1, store=tmp_path / "store")
    [(_, images)] = list(first.batches(plan))
    for path in (root / "train").rglob("*.png"):  # the files are gone: only the store can
        path.unlink()                              # give the images now
    for again in (first, StreamedImages(train, PRE, workers=2, store=tmp_path / "store")):
        [(idx, images_again)] = list(again.batches(plan))
        assert idx.tolist() == plan[0].tolist() and torch.equal(images_again, images)
    # Without a store every epoch reads the files again.
    with pytest.raises(DataReadError):
        list(StreamedImages(train, PRE, workers=1).batches(plan))
