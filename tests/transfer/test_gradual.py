"""auto and fine-tune --gradual: the plan, the stopping rule, the log, and resuming a climb."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import medtl
from medtl.data import load_dataset
from medtl.data.samples import DEMO_PATIENT_REGEX, demo_data_path
from medtl.errors import MedtlError
from medtl.models import get_spec
from medtl.training.loop import load_checkpoint
from medtl.transfer.estimator import TransferClassifier
from medtl.transfer.gradual import MIN_DELTA, StageResult, climb, decide, plan_stages
from medtl.transfer.strategies import FineTuneStrategy, _Climb

BLOCKS = ["stem", "b1", "b2", "b3"]


def test_plan_follows_the_reviews_order():
    names = [s.name for s in plan_stages(BLOCKS, full_name="full")]
    assert names == ["feature-extractor", "fine-tune top 1", "fine-tune top 2",
                     "fine-tune top 3", "full"]
    assert [s.unfreeze for s in plan_stages(BLOCKS, full_name="full")] == [0, 1, 2, 3, 4]
    capped = plan_stages(BLOCKS, cap=2)
    assert [s.name for s in capped] == ["feature-extractor", "fine-tune top 1", "fine-tune top 2"]
    with pytest.raises(MedtlError, match="1 to 4 blocks"):
        plan_stages(BLOCKS, cap=5, full_name="full")


def scripted(aucs):
    """A climb whose stages score ``aucs`` in turn; records what was trained and undone."""
    trained, accepted, rejected = [], [], []

    def train_stage(stage):
        trained.append(stage.name)
        return StageResult(stage=stage.name, unfreeze=stage.unfreeze,
                           val_auc=aucs[stage.index], epochs=1, best_epoch=1, seconds=0.0,
                           trainable_params=stage.unfreeze)

    def accept(stage, result):
        accepted.append(stage.name)

    def reject(stage, result, best):
        rejected.append((stage.name, best.stage))

    return train_stage, accept, reject, trained, accepted, rejected


def test_climb_stops_at_the_first_stage_that_does_not_improve():
    train_stage, accept, reject, trained, accepted, rejected = scripted([0.80, 0.85, 0.84, 0.99,
                                                                         0.99])
    results = climb(plan_stages(BLOCKS, full_name="full"), train_stage, accept=accept,
                    reject=reject)
    # 0.99 at stage 4 is never seen: the climb stops when validation stops improving.
    assert trained == ["feature-extractor", "fine-tune top 1", "fine-tune top 2"]
    assert accepted == ["feature-extractor", "fine-tune top 1"]
    assert rejected == [("fine-tune top 2", "fine-tune top 1")]
    assert [r.accepted for r in results] == [True, True, False]
    assert "back to 'fine-tune top 1'" in results[-1].decision


def test_an_improvement_below_min_delta_is_not_one():
    train_stage, accept, reject, trained, *_ = scripted([0.90, 0.90 + MIN_DELTA / 2, 0.99])
    results = climb(plan_stages(BLOCKS[:2], full_name="full"), train_stage, accept=accept,
                    reject=reject)
    assert [r.accepted for r in results] == [True, False]


def test_full_is_tried_last_and_kept_only_when_it_helps():
    train_stage, accept, reject, trained, accepted, _ = scripted([0.80, 0.81, 0.82, 0.83, 0.84])
    results = climb(plan_stages(BLOCKS, full_name="full"), train_stage, accept=accept,
                    reject=reject)
    assert trained[-1] == "full" and accepted[-1] == "full"
    assert "no block left" in results[-1].decision


def test_a_resumed_climb_continues_after_its_finished_stages():
    stages = plan_stages(BLOCKS, full_name="full")
    train_stage, accept, reject, trained, *_ = scripted([0.0, 0.0, 0.90, 0.80, 0.0])
    done = [StageResult("feature-extractor", 0, 0.80, 1, 1, 0.0, 0, accepted=True),
            StageResult("fine-tune top 1", 1, 0.85, 1, 1, 0.0, 1, accepted=True)]
    results = climb(stages, train_stage, accept=accept, reject=reject, done=done)
    assert trained == ["fine-tune top 2", "fine-tune top 3"]
    assert len(results) == 4 and results[-1].accepted is False
    # A climb that had already ended trains nothing more.
    trained.clear()
    assert climb(stages, train_stage, accept=accept, reject=reject, done=results) == results
    assert trained == []


# ----------------------------------------------------------------- on real chest X-rays
LINE = re.compile(r"stage (\d+)/(\d+) '([^']+)' \(.*\): validation AUC ([0-9.]+), (\d+) epochs, "
                  r"[0-9.]+ s -> (accepted|rejected)")


@pytest.mark.slow  # about 90 s since auto compares every hybrid head; test_auto.py covers the rule
def test_auto_on_real_xrays_logs_each_stage_in_order_and_stops(tmp_path):
    run = medtl.train(demo_data_path(), strategy="auto", image_size=64, epochs=1,
                      augment="none", patient_regex=DEMO_PATIENT_REGEX, out=tmp_path / "auto",
                      quiet=True)
    log = (run.path / "log.txt").read_text()
    rows = [m.groups() for m in LINE.finditer(log)]
    assert rows, log
    plan = [s.name for s in plan_stages(list(get_spec("mobilenet_v2").blocks), full_name="full")]
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    assert [r[2] for r in rows] == plan[:len(rows)]
    aucs = [float(r[3]) for r in rows]
    decisions = [r[5] for r in rows]
    # Every stage but the last was kept, each because it beat the best before it by the rule
    # (gradual.decide) ...
    assert all(d == "accepted" for d in decisions[:-1])
    assert aucs == [round(s["val_auc"], 4) for s in run.config["stages"]]
    results = [StageResult(**s) for s in run.config["stages"]]
    for before, result in zip(results, results[1:], strict=False):
        assert decide(result, before)[0] == result.accepted
    # ... and the climb ended where validation stopped improving (or had nowhere to go).
    if decisions[-1] != "rejected":
        assert len(rows) == len(plan)
    chosen = [s for s in run.config["stages"] if s["accepted"]][-1]
    assert f"auto chose '{chosen['stage']}'" in log
    assert [s["stage"] for s in run.config["stages"]] == [r[2] for r in rows]
    assert run.metrics["test"]["auc"] > 0.75  # real X-rays, 64 px, a few epochs: clearly learnt
    history = (run.path / "history.csv").read_text().splitlines()
    assert history[0].startswith("stage,")
    saved = {r["path"]: r for r in run.predictions() if r["split"] == "test"}
    # DATA given: the run records the sample's place relative to itself, which it cannot do
    # when the two share only the root folder (then it names the folder only).
    again = medtl.evaluate(run.path, demo_data_path(), quiet=True)["rows"]
    assert all(r["prob_PNEUMONIA"] == float(saved[r["path"]]["prob_PNEUMONIA"]) for r in again)


@pytest.fixture(scope="module")
def small_xrays():
    ds = load_dataset(demo_data_path(), patient_regex=DEMO_PATIENT_REGEX)
    train, val = ds.split("train"), ds.split("val")
    return train.subset(range(0, len(train), 4)), val, ds.split("test").subset(range(40))


def test_an_interrupted_climb_resumes_without_redoing_finished_stages(small_xrays, tmp_path,
                                                                      monkeypatch):
    train, val, test = small_xrays
    params = dict(strategy="fine-tune", gradual=True, unfreeze=1, image_size=48, epochs=2,
                  augment="basic", quiet=True)
    whole = TransferClassifier(**params).fit(train, val, checkpoint_dir=tmp_path / "a")
    expected = whole.predict_proba(test)

    original = FineTuneStrategy.train_stage
    calls = {"probe": 0}

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt  # the user's Ctrl-C as the first trainable stage starts

    monkeypatch.setattr(FineTuneStrategy, "train_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        TransferClassifier(**params).fit(train, val, checkpoint_dir=tmp_path / "b")
    assert (tmp_path / "b" / "climb.pt").is_file()

    monkeypatch.setattr(FineTuneStrategy, "train_stage", original)
    first_stage_s = load_checkpoint(tmp_path / "b" / "climb.pt")["results"][0]["seconds"]
    probe = _Climb._frozen_stage

    def counted(self, *args):
        calls["probe"] += 1
        return probe(self, *args)

    monkeypatch.setattr(_Climb, "_frozen_stage", counted)
    resumed = TransferClassifier(**params).fit(train, val, checkpoint_dir=tmp_path / "b",
                                               resume=True)
    assert calls["probe"] == 0  # the feature-extractor stage was not trained again
    assert resumed.stages_ == [{**s, "seconds": r["seconds"]}
                               for s, r in zip(whole.stages_, resumed.stages_, strict=True)]
    np.testing.assert_array_equal(resumed.predict_proba(test), expected)
    # The finished stage's time, spent before the interruption, is part of the run's cost.
    assert first_stage_s > 0 and resumed.timing_["resumed_s"] == pytest.approx(first_stage_s)
    assert resumed.timing_["train_s"] > resumed.timing_["resumed_s"]
    assert whole.timing_["resumed_s"] == 0.0


def test_gradual_belongs_to_fine_tune():
    with pytest.raises(MedtlError, match="--gradual applies to --strategy fine-tune"):
        TransferClassifier(strategy="full", gradual=True).make_strategy()


def test_auto_is_the_default_strategy():
    assert TransferClassifier().strategy == "auto"
    cfg = json.dumps(TransferClassifier().get_params())
    assert '"strategy": "auto"' in cfg
