"""The run directory (medtl.run): one config.json schema with a format version, medtl 0.1's runs
still load, and a run is written beside its place and swapped in only when complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import medtl
from medtl import run as bundle
from medtl.errors import MedtlError

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0_1"


def _below_data(path: str) -> str:
    """``split/class/file.png`` of an image path, wherever its ``data/`` folder was."""
    parts = Path(path).parts
    return "/".join(parts[len(parts) - 1 - parts[::-1].index("data") + 1:])


# ------------------------------------------------------------------------- medtl 0.1's runs
def test_a_run_written_by_medtl_0_1_loads_and_predicts_what_it_saved():
    run = medtl.load_run(FIXTURE / "run")
    cfg = run.config
    assert (cfg["format"], cfg["kind"]) == (bundle.CONFIG_FORMAT, "single")
    assert cfg["classes"] == ["bar", "disc"] and cfg["positive_class"] == "disc"
    saved = {_below_data(r["path"]): r for r in run.predictions()}
    assert len(saved) == 20
    for split in ("val", "test"):
        # One split per call, as the run scored them: ONNX Runtime's float32 sums may differ in
        # the last bit with the batch's composition.
        images = sorted(str(p) for p in (FIXTURE / "data" / split).rglob("*.png"))
        for row in medtl.predict(run, images, quiet=True, paths="absolute"):
            for c in cfg["classes"]:
                assert row[f"prob_{c}"] == float(saved[_below_data(row["path"])][f"prob_{c}"])
    again = medtl.evaluate(run, FIXTURE / "data", quiet=True)
    assert again["metrics"]["auc"] == run.metrics["test"]["auc"]


def test_the_other_two_layouts_of_medtl_0_1_are_upgraded():
    cv = bundle.upgrade_config(json.loads((FIXTURE / "cv-config.json").read_text()))
    assert (cv["format"], cv["kind"]) == (2, "cv")
    assert cv["weights"] == {"requested": "random"}
    assert cv["data"]["patient_regex"] is None and cv["data"]["val_fraction"] == 0.2
    assert "patient_regex" not in cv and cv["positive_class"] == "disc"
    saved = bundle.upgrade_config(json.loads((FIXTURE / "saved-config.json").read_text()))
    assert (saved["format"], saved["kind"]) == (2, "model")
    assert saved["weights"]["kind"] == "random"
    for cfg in (cv, saved):  # what every kind holds
        assert set(bundle._REQUIRED) <= cfg.keys()
        assert set(bundle._REQUIRED_BY_KIND[cfg["kind"]]) <= cfg.keys()


def test_a_cross_validation_run_has_the_layout_of_an_upgraded_0_1_one(tmp_path):
    out = tmp_path / "cv"
    medtl.train(FIXTURE / "data", strategy="hybrid", weights="random", image_size=32, folds=2,
                out=out, quiet=True)
    cfg = medtl.Run(out).config
    old = bundle.upgrade_config(json.loads((FIXTURE / "cv-config.json").read_text()))
    assert cfg.keys() == old.keys()
    # --paths adds how the data is named (0.1 named it by absolute path, the reading default).
    assert cfg["kind"] == "cv" and cfg["data"].keys() == old["data"].keys() | {
        "paths", "source_relative_to"}
    assert json.loads((out / "config.json").read_text())["format"] == 2  # written, not upgraded
    for k in (1, 2):
        fold = medtl.load_run(bundle.fold_path(out, k))
        assert fold.config["kind"] == "single" and fold.config["fold"] == k
        assert bundle.is_run(fold.path)
    assert bundle.is_run(out) and not bundle.partial_dir(out).exists()


def test_config_json_is_checked_on_writing_and_a_newer_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        bundle.write_config(tmp_path, {"backbone": "x"})
    with pytest.raises(ValueError, match="lacks"):
        bundle.write_config(tmp_path, {"kind": "model", "backbone": "x"})
    (tmp_path / "config.json").write_text(json.dumps({"format": 99, "kind": "single"}))
    with pytest.raises(MedtlError, match="newer than this medtl reads"):
        bundle.read_config(tmp_path)


# ------------------------------------------------------------------------- what is a run
def _model_run(path: Path, tag: str = "old") -> Path:
    """A minimal complete run, as TransferClassifier.save writes one (kind "model")."""
    (path / "model").mkdir(parents=True)
    (path / "model" / "model.json").write_text(tag)
    bundle.write_marker(path)
    bundle.write_config(path, {"kind": "model", "backbone": "b", "strategy": "hybrid",
                               "head": "logreg", "weights": {}, "seed": 0, "classes": ["a"],
                               "positive_class": None, "medtl_version": "x",
                               "preprocessing": {}})
    return path


def test_only_what_medtl_wrote_counts_as_a_run(tmp_path):
    assert bundle.is_run(FIXTURE / "run")  # 0.1 wrote no marker: its config and model tell
    assert bundle.is_run(_model_run(tmp_path / "new"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text('{"backbone": "mine", "strategy": "x", "classes": []}')
    assert not bundle.is_run(notes)  # a 0.1-like config, but no model
    (notes / "model").mkdir()
    (notes / "model" / "model.json").write_text("{}")
    assert bundle.is_run(notes)
    (notes / "config.json").write_text('{"lr": 0.1}')  # someone else's config.json
    assert not bundle.is_run(notes)


# ------------------------------------------------------------------------- writing a run
def _finish(draft: bundle.RunDraft, tag: str = "new") -> None:
    (draft.path / "model").mkdir()
    (draft.path / "model" / "model.json").write_text(tag)
    bundle.write_config(draft.path, {**json.loads((FIXTURE / "saved-config.json").read_text()),
                                     "kind": "model"})


def test_a_run_is_written_beside_its_place_and_swapped_in_at_the_end(tmp_path):
    out = _model_run(tmp_path / "r")
    with bundle.writing_run(out, overwrite=True) as draft:
        assert draft.path == tmp_path / ".r.partial" and (draft.path / ".medtl-run").is_file()
        assert (out / "model" / "model.json").read_text() == "old"  # untouched meanwhile
        assert bundle.lock_file(out).is_file()
        _finish(draft)
    assert (out / "model" / "model.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no partial, lock or old run


def test_a_failed_rewrite_leaves_the_old_run_and_keeps_only_resumable_drafts(tmp_path):
    out = _model_run(tmp_path / "r")
    before = (out / "config.json").read_bytes()
    with pytest.raises(RuntimeError), bundle.writing_run(out, overwrite=True) as draft:
        (draft.path / "log.txt").write_text("started")
        raise RuntimeError("training failed")
    assert (out / "config.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # nothing to resume: removed
    with pytest.raises(KeyboardInterrupt), bundle.writing_run(out, overwrite=True) as draft:
        (draft.path / "checkpoints").mkdir()
        (draft.path / "checkpoints" / "checkpoint.pt").write_bytes(b"epoch 3")
        raise KeyboardInterrupt
    assert (out / "config.json").read_bytes() == before
    assert bundle.resumable(out)
    with pytest.raises(MedtlError, match="already holds a run"), bundle.writing_run(out):
        pass
    with bundle.writing_run(out, resume=True) as draft:
        assert draft.resumed and (draft.path / "checkpoints" / "checkpoint.pt").is_file()
        _finish(draft)
    assert (out / "model" / "model.json").read_text() == "new"
    assert not (out / "checkpoints").exists() and not bundle.resumable(out)


def test_an_unfinished_first_run_is_not_silently_discarded(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt), bundle.writing_run(out) as draft:
        (draft.path / "checkpoints").mkdir()
        (draft.path / "checkpoints" / "checkpoint.pt").write_bytes(b"epoch 3")
        raise KeyboardInterrupt
    with pytest.raises(MedtlError, match="pass --resume to continue it or --overwrite"), \
            bundle.writing_run(out):
        pass
    with pytest.raises(MedtlError, match="not finished yet"):
        medtl.load_run(out)
    with bundle.writing_run(out, overwrite=True) as draft:  # start again
        assert not (draft.path / "checkpoints").exists()
        _finish(draft)


def test_what_is_not_a_run_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(MedtlError, match="not a medtl run"), \
                bundle.writing_run(out, overwrite=overwrite):
            pass
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    run = _model_run(tmp_path / "run")
    with pytest.raises(MedtlError, match="pass --overwrite"), bundle.writing_run(run):
        pass


def test_resume_needs_something_to_resume_and_adopts_a_0_1_unfinished_run(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(MedtlError, match="nothing to resume"), \
            bundle.writing_run(out, resume=True):
        pass
    (out / "checkpoints").mkdir(parents=True)  # medtl 0.1 checkpointed inside the run
    (out / "checkpoints" / "checkpoint.pt").write_bytes(b"epoch 2")
    (out / "log.txt").write_text("0.1 log")
    with bundle.writing_run(out, resume=True) as draft:
        assert draft.path == bundle.partial_dir(out) and not out.exists()
        assert (draft.path / "log.txt").read_text() == "0.1 log"
        _finish(draft)
    assert (out / "log.txt").read_text() == "0.1 log" and bundle.is_run(out)
    with pytest.raises(MedtlError, match="run there is complete"), \
            bundle.writing_run(out, resume=True):
        pass


def test_a_draft_killed_while_being_created_blocks_nothing(tmp_path):
    out = tmp_path / "r"
    partial = bundle.partial_dir(out)
    # Killed before the marked draft was renamed into place, and killed while writing the
    # marker itself (only its temporary file exists): both are medtl's, so both give way.
    stale = partial.with_name(partial.name + ".0a1b2c3d.tmp")
    stale.mkdir()
    bundle.write_marker(stale)
    partial.mkdir()
    (partial / "..medtl-run.9f8e7d6c.tmp").write_text("{")
    with bundle.writing_run(out) as draft:
        assert sorted(p.name for p in draft.path.iterdir()) == [".medtl-run"]
        _finish(draft)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_one_writer_per_run_and_the_second_is_told_who(tmp_path):
    out = tmp_path / "r"
    with bundle.writing_run(out) as draft:
        with pytest.raises(MedtlError, match=f"in use by pid {os.getpid()} on ") as err, \
                bundle.writing_run(out, overwrite=True):
            pass
        assert "\n" not in str(err.value)
        _finish(draft)
    assert bundle.is_run(out)


@pytest.mark.parametrize("new_complete", [True, False])
def test_a_swap_cut_by_a_crash_is_repaired_by_the_next_writer(tmp_path, new_complete):
    out = _model_run(tmp_path / "r", "old")
    partial, _, replaced = bundle._siblings(out)
    if new_complete:
        _model_run(partial, "new")
    else:
        (partial / "checkpoints").mkdir(parents=True)
        (partial / "checkpoints" / "checkpoint.pt").write_bytes(b"epoch 1")
        bundle.write_marker(partial)
    os.replace(out, replaced)  # the crash: the old run renamed aside, the new one not in place
    with pytest.raises(RuntimeError), bundle.writing_run(out, overwrite=True):
        # The complete new run was put in place; an incomplete one gave way to the old run.
        assert (out / "model" / "model.json").read_text() == ("new" if new_complete else "old")
        assert not replaced.exists()
        raise RuntimeError("stop before committing")


def test_the_current_directory_is_not_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MedtlError, match="current directory"), bundle.writing_run("."):
        pass


def test_an_interrupted_training_resumes_from_its_draft(tmp_path, monkeypatch):
    out = tmp_path / "ft"
    options = {"strategy": "full", "weights": "random", "image_size": 32, "epochs": 2,
               "augment": "none", "out": out, "quiet": True}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after training, before the run is written

    with monkeypatch.context() as m:
        m.setattr(medtl.workflow, "_split_metrics", killed)
        with pytest.raises(KeyboardInterrupt):
            medtl.train(FIXTURE / "data", **options)
    assert not out.exists() and bundle.resumable(out)
    run = medtl.train(FIXTURE / "data", resume=True, **options)
    assert run.metrics["timing"]["resumed_s"] > 0  # the epochs came from the checkpoint
    assert not bundle.partial_dir(out).exists() and not (out / "checkpoints").exists()
    assert medtl.load_run(out).config["kind"] == "single"


# ------------------------------------------------------------------------- where a run may go
def _listing(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (links not followed) with a file's bytes."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink()
                                       else None) for p in sorted(root.rglob("*"))}


def test_an_out_that_is_a_file_or_a_symbolic_link_is_refused_before_anything_is_written(
        tmp_path):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "victim.txt").write_text("precious")
    (tmp_path / "to-dir").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / ".planted.lock").symlink_to(tmp_path / "victim.txt")
    (tmp_path / ".planted2.partial").symlink_to(tmp_path / "elsewhere")
    before = _listing(tmp_path)
    for out, why in [("afile", "not a directory"), ("to-dir", "symbolic link"),
                     ("dangling", "symbolic link"), ("planted", r"\.planted\.lock: is a symb"),
                     ("planted2", r"\.planted2\.partial: is a symb")]:
        for resume in (False, True):
            with pytest.raises(MedtlError, match=why), \
                    bundle.writing_run(tmp_path / out, overwrite=True, resume=resume):
                pytest.fail("a draft was opened")
    assert _listing(tmp_path) == before  # the link targets untouched, nothing created


def test_a_lock_file_planted_as_a_link_is_not_followed(tmp_path):
    from medtl.files import hold_lock

    (tmp_path / "victim.txt").write_text("precious")
    (tmp_path / "x.lock").symlink_to(tmp_path / "victim.txt")
    with pytest.raises(OSError), hold_lock(tmp_path / "x.lock"):
        pass
    assert (tmp_path / "victim.txt").read_text() == "precious"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_a_folder_without_write_permission_is_one_error_at_once(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(MedtlError, match="cannot write a run there.*ermission denied"), \
                bundle.writing_run(locked / "run"):
            pytest.fail("a draft was opened")
    finally:
        locked.chmod(0o755)


def test_permission_errors_while_opening_or_committing_a_run_name_the_path(tmp_path,
                                                                           monkeypatch):
    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(bundle, "_make_partial", refused)
    with pytest.raises(MedtlError, match=r"run: cannot write a run there \(.*\.run\.partial: "
                                         "Permission denied"), bundle.writing_run(tmp_path / "run"):
        pytest.fail("a draft was opened")
    monkeypatch.undo()
    monkeypatch.setattr(bundle.RunDraft, "commit", refused)
    with pytest.raises(MedtlError, match=r"the run is complete in .*\.run\.partial but could not "
                                         "be put in place"), \
            bundle.writing_run(tmp_path / "run") as draft:
        _finish(draft)
    assert (draft.path / "config.json").is_file()  # the finished run is kept, not lost


def test_a_config_json_that_is_a_device_does_not_make_a_folder_a_run(tmp_path):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    d = tmp_path / "d"
    (d / "model").mkdir(parents=True)
    (d / "model" / "model.json").write_text("{}")
    pad = "x" * (5 << 20)  # past any config.json medtl wrote: refused unread
    (d / "config.json").write_text(f'{{"backbone": "b", "strategy": "s", "classes": [], '
                                   f'"pad": "{pad}"}}')
    assert not bundle.is_run(d)  # (first: without the bound, the next read exhausts memory)
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/dev/zero")  # read without a bound, this never ends
    assert not bundle.is_run(d)


def test_a_damaged_or_newer_run_is_one_error_line(tmp_path, capsys):
    """A corrupt config.json, a model.json of a newer medtl, and a run --out over a corrupt run:
    exit 2 with one line naming the file, never a traceback."""
    import shutil

    from medtl.cli import main

    cases = []
    bad = shutil.copytree(FIXTURE / "run", tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    cases += [(["evaluate", str(bad), str(FIXTURE / "data")], "config.json: not valid JSON"),
              (["predict", str(bad), str(FIXTURE / "data" / "test")], "config.json"),
              (["train", str(FIXTURE / "data"), "--out", str(bad), "-q"], "not a medtl run")]
    newer = shutil.copytree(FIXTURE / "run", tmp_path / "newer")
    meta = json.loads((newer / "model" / "model.json").read_text())
    (newer / "model" / "model.json").write_text(json.dumps({**meta, "format": 99}))
    cases += [(["predict", str(newer), str(FIXTURE / "data" / "test")], "newer than this medtl")]
    for argv, why in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and why in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
