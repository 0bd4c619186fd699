"""Crafted runs (issue 15, acceptance 1): a run directory from elsewhere is untrusted input.

One genuine run is trained once (demo sample, hybrid logistic regression, 64 px); each case
copies it and crafts one thing: a forged sha256, traversal in a string that could become a
path, a random-forest head whose node indices leave their arrays, an oversized or unknown
preprocessing value, a metrics.json that is a symlink to /dev/zero, a model.json of a future
format, a catastrophic patient regex. ``medtl predict``, ``evaluate`` and ``explain`` each load
it in a subprocess and must exit 2 with one line starting with ``error:``, no traceback,
nothing written outside the run directory and the cache root (the whole temporary tree is
listed before and after: names, sizes, mtimes) and the cache root unchanged (its files hashed).

The genuine run passes the same three commands (exit 0), so a refusal means the crafting.
A well-formed sha256 that claims ImageNet's weights is only a claim: the commands may succeed,
but the shared cache gets no entry under the claimed value (the key is the loaded tensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_blob_images

# Stands for ImageNet's digest: well formed, and not what the run's weights hash to.
CLAIMED_SHA = hashlib.sha256(b"imagenet weights, as claimed").hexdigest()
TRAVERSAL = "/../../../../xyz"
# Backtracks catastrophically on any run of word characters that is not followed by an x.
CATASTROPHIC = r"^(\w|\w)+(?=x)"


# ------------------------------------------------------------------------------ helpers
def _medtl(*args: str) -> list[str]:
    return [sys.executable, "-m", "medtl.cli", *args]


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _tree_listing(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``root`` except under ``skip``: (size, mtime in ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            st = (here / name).lstat()
            out[str((here / name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _commands(case: Path, run: Path) -> dict[str, list[str]]:
    """The three commands that open a run. evaluate is given the data: the genuine run
    records it relative to itself (``--paths relative``), and the case has a copy of the run."""
    image = str(case / "work" / "input.png")
    return {"predict": ["predict", str(run), image, "--quiet"],
            "evaluate": ["evaluate", str(run), str(case / "data"), "--quiet"],
            "explain": ["explain", str(run), image, "--out", "maps", "--quiet"]}


def _env(case: Path) -> dict[str, str]:
    """The cache, HOME, XDG folders and TMPDIR, all inside ``case``."""
    return {**os.environ, "MEDTL_CACHE_DIR": str(case / "cache"), "HOME": str(case / "home"),
            "XDG_CACHE_HOME": str(case / "xdg-cache"), "XDG_CONFIG_HOME": str(case / "xdg-conf"),
            "TMPDIR": str(case / "tmp"), "MPLCONFIGDIR": str(case / "mpl"),
            "MEDTL_OFFLINE": "1", "COLUMNS": "400"}


def _run_all(case: Path, run: Path) -> dict[str, tuple[int, str]]:
    """The three commands on ``run`` as ``python -m medtl.cli``, side by side: (exit, output)."""
    procs = {name: subprocess.Popen(_medtl(*args), cwd=case / "work", env=_env(case), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, args in _commands(case, run).items()}
    outputs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    return {name: (procs[name].returncode, out) for name, out in outputs.items()}


# Starts once with medtl and torch imported, then forks one process per command: each runs
# medtl.cli.main (what ``python -m medtl.cli`` runs) in its own process, with its own folder,
# environment, output and exit status, without paying torch's import (seconds) 33 times.
ZYGOTE = r"""
import json, os, sys, tempfile, traceback
import medtl.cli, medtl.workflow, medtl.transfer.strategies, medtl.transfer.estimator
import medtl.explain, skops.io, sklearn.ensemble, torchvision.models

def child(job):
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    tempfile.tempdir = None
    fd = os.open(job["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["medtl", *job["argv"]]
    code = 0
    try:
        medtl.cli.main(job["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (exc.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

for line in sys.stdin:
    pids = []
    for job in json.loads(line):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(job)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(json.dumps(codes), flush=True)
"""


@pytest.fixture(scope="module")
def forked_cli():
    proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)

    def run_all(case: Path, run: Path, outputs: Path) -> dict[str, tuple[int, str]]:
        commands = _commands(case, run)
        jobs = [{"argv": args, "cwd": str(case / "work"), "env": _env(case),
                 "output": str(outputs / f"{name}.txt")} for name, args in commands.items()]
        proc.stdin.write(json.dumps(jobs) + "\n")
        proc.stdin.flush()
        codes = json.loads(proc.stdout.readline())
        return {name: (code, (outputs / f"{name}.txt").read_text())
                for name, code in zip(commands, codes, strict=True)}

    yield run_all
    proc.stdin.close()
    proc.wait(timeout=60)


def _new_case(genuine: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A case folder: a copy of the genuine run, of the seeded cache, and an input image."""
    case = tmp_path / "case"
    for d in ("home", "xdg-cache", "xdg-conf", "tmp", "mpl", "work"):
        (case / d).mkdir(parents=True)
    shutil.copytree(genuine["run"], case / "run", symlinks=True)
    shutil.copytree(genuine["cache"], case / "cache")
    shutil.copy(genuine["image"], case / "work" / "input.png")
    shutil.copytree(genuine["data"], case / "data")
    return case, case / "run"


# ------------------------------------------------------------------------------ the genuine run
@pytest.fixture(scope="module")
def genuine(tmp_path_factory, forked_cli) -> dict[str, Path]:
    """The run every case crafts a copy of (two classes of synthetic images, 64 px), and a
    cache its three commands used."""
    from medtl.workflow import train

    root = tmp_path_factory.mktemp("crafted")
    data = write_blob_images(root / "blobs", n_per_class=12)
    train(data, backbone="mobilenet_v2", weights="random", strategy="hybrid", head="logreg",
          image_size=64, patient_regex=r"(p\d+)", out=root / "run", quiet=True)
    seed = {"run": root / "run", "cache": root / "empty-cache", "data": data,
            "image": next((data / "test").rglob("*.png"))}
    seed["cache"].mkdir()
    case, run = _new_case(seed, root / "seed")
    outputs = root / "seed-outputs"
    outputs.mkdir()
    for name, (code, out) in forked_cli(case, run, outputs).items():  # the positive control
        assert code == 0, f"genuine run, {name}: {out[-3000:]}"
    return {**seed, "cache": case / "cache"}


# ------------------------------------------------------------------------------ the crafting
def _model(run: Path) -> Path:
    return run / "model" / "model.json"


def _forged_sha_traversal(run: Path) -> None:
    _edit_json(_model(run), lambda m: m["weights_info"].update(sha256=TRAVERSAL))


def _config_sha_traversal(run: Path) -> None:
    _edit_json(run / "config.json", lambda c: c["weights"].update(sha256=TRAVERSAL))


def _class_traversal(run: Path) -> None:
    def change(m: dict) -> None:
        m["classes"][0] = "../../../../evil"
    _edit_json(_model(run), change)


def _backbone_traversal(run: Path) -> None:
    _edit_json(_model(run), lambda m: m["params"].update(backbone="../../../../x"))


def _head_traversal(run: Path) -> None:
    _edit_json(_model(run), lambda m: m["params"].update(head="../../../../x"))


def _tree_out_of_range(run: Path) -> None:
    """A random-forest head of the right shape whose one child index points far outside."""
    import skops.io as sio
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 1280))
    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(x, x[:, 0] > 0)
    tree = forest.estimators_[0].tree_
    tree.children_left[int(np.flatnonzero(tree.children_left != -1)[0])] = 10**6
    (run / "model" / "head.skops").write_bytes(sio.dumps(forest))
    _edit_json(_model(run), lambda m: m["params"].update(head="rf"))


def _oversized_preprocessing(run: Path) -> None:
    _edit_json(_model(run), lambda m: m["preprocessing"].update(size=100000))


def _unknown_interpolation(run: Path) -> None:
    _edit_json(_model(run), lambda m: m["preprocessing"].update(interpolation="bogus"))


def _metrics_dev_zero(run: Path) -> None:
    (run / "metrics.json").unlink()
    (run / "metrics.json").symlink_to("/dev/zero")


def _future_format(run: Path) -> None:
    _edit_json(_model(run), lambda m: m.update(format=99))


def _catastrophic_regex(run: Path) -> None:
    _edit_json(run / "config.json", lambda c: c["data"].update(patient_regex=CATASTROPHIC))


# Each case and a word of the one-line error it must give.
CASES = {
    "model sha256 traversal": (_forged_sha_traversal, "sha256"),
    "config sha256 traversal": (_config_sha_traversal, "sha256"),
    "class name traversal": (_class_traversal, "class name"),
    "backbone traversal": (_backbone_traversal, "backbone"),
    "head traversal": (_head_traversal, "head"),
    "tree nodes out of range": (_tree_out_of_range, "head.skops"),
    "preprocessing size 100000": (_oversized_preprocessing, "size 100000"),
    "interpolation bogus": (_unknown_interpolation, "interpolation"),
    "metrics.json -> /dev/zero": (_metrics_dev_zero, "not a regular file"),
    "model.json format 99": (_future_format, "format 99 is newer than this medtl reads"),
    "catastrophic patient regex": (_catastrophic_regex, "catastrophically"),
}


@pytest.mark.parametrize("case_name", list(CASES))
def test_a_crafted_run_is_refused_by_predict_evaluate_and_explain(genuine, forked_cli, tmp_path,
                                                                  case_name):
    craft, expected = CASES[case_name]
    case, run = _new_case(genuine, tmp_path)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    craft(run)
    skip = (run, case / "cache", outputs)
    outside = _tree_listing(tmp_path, skip)
    cache = _hashes(case / "cache")

    results = forked_cli(case, run, outputs)

    for name, (code, out) in results.items():
        lines = out.strip().splitlines()
        assert code == 2, f"{name}: exit {code}: {out[-3000:]}"
        assert "Traceback" not in out, f"{name}: {out[-3000:]}"
        assert len(lines) == 1 and lines[0].startswith("error:"), f"{name}: {out!r}"
        assert expected in lines[0], f"{name}: {lines[0]}"
    assert _tree_listing(tmp_path, skip) == outside
    assert _hashes(case / "cache") == cache


def test_a_well_formed_forged_sha256_is_only_a_claim(genuine, forked_cli, tmp_path):
    """A run with random weights claiming ImageNet's digest loads (the claim is kept and shown
    as recorded), but the cache keys on the loaded tensors: the three commands make no entry
    named after the claim, only what the genuine run's commands made (its ONNX export, named
    after its tensors; a loaded run does not write features)."""
    from medtl.run import load_run

    case, run = _new_case(genuine, tmp_path)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    _edit_json(_model(run), lambda m: m["weights_info"].update(kind="imagenet",
                                                                source="imagenet",
                                                                sha256=CLAIMED_SHA))
    _edit_json(run / "config.json", lambda c: c["weights"].update(kind="imagenet",
                                                                  sha256=CLAIMED_SHA))
    model = load_run(run).load_model(quiet=True).model_
    assert model.backbone.weights_info.sha256 == CLAIMED_SHA  # kept as recorded: a claim
    assert load_run(run).config["weights"]["sha256"] == CLAIMED_SHA
    key = load_run(genuine["run"]).load_model(quiet=True).model_.extractor.key
    assert model.extractor.key == key  # the same tensors, the same key, whatever is claimed
    shutil.rmtree(case / "cache")
    (case / "cache").mkdir()

    for name, (code, out) in forked_cli(case, run, outputs).items():
        assert code == 0, f"{name}: {out[-3000:]}"
    names = [str(p.relative_to(case / "cache")) for p in (case / "cache").rglob("*")]
    assert names and all(CLAIMED_SHA[:8] not in n for n in names)
    assert sorted(names) == sorted(str(p.relative_to(genuine["cache"]))
                                   for p in genuine["cache"].rglob("*"))
    assert all(key in n for n in names if n.startswith(("onnx/", "features/")))


def test_evaluate_reads_the_recorded_data_only_when_it_exists(genuine, tmp_path):
    """config.json's data source is read by evaluate without DATA (users rely on it); a path
    that is not a folder or file here is refused with one line, naming it."""
    case, run = _new_case(genuine, tmp_path)
    missing = str(case / "work" / ".." / ".." / ".." / "no-such-data")
    _edit_json(run / "config.json",
               lambda c: c["data"].update(source=missing, source_relative_to="absolute"))
    outside = _tree_listing(tmp_path, skip=(run, case / "cache"))
    proc = subprocess.run(_medtl("evaluate", str(run), "--quiet"), cwd=case / "work",
                          env=_env(case), capture_output=True, text=True, timeout=600)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("error:") and "no-such-data" in lines[0] and "pass DATA" in lines[0]
    assert _tree_listing(tmp_path, skip=(run, case / "cache")) == outside
