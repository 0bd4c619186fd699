"""Hypothesis fuzzes the CLI's string options and file names (issue 15, acceptance 6).

Markup brackets ('[bold]', '[/_](P\\d+)'), control characters, bytes that are not UTF-8 (as
Python holds them from argv: surrogate escapes), very long and empty strings go into every
command's text options and paths. Whatever they are, the command exits 0 (1 for ``check``
finding a problem) or 2 with one ``error:`` line, never with a traceback, and a file name in
the error line is shown as typed: brackets kept, control characters and undecodable bytes
escaped (medtl.console.printable).

Commands run in-process through ``medtl.cli.main`` (a subprocess per example would take
seconds each), with stdout and stderr as a real terminal has them: UTF-8, stdout strict (a
surrogate printed there fails), stderr backslashreplace. Paths are single names inside a
temporary folder (never "/"-containing, "." or ".."), so no example reads or writes outside
it; NUL is left out because argv cannot carry it.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from medtl.console import printable
from medtl.files import escape_undecodable

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0_1"

SPECIAL = ["[bold]", "[/_](P\\d+)", "[/]", "[red]x[/red]", "scan[left].png", "[link=x]y",
           ":smile:", "\x1b[31m", "\x1b]0;title\x07", "\r", "\n", "\t", "\x08", "\u202e",
           "\x7f", "%s", "{0}", "\\", "'", '"', "*", "-", "--", "-x", "--help", "(", ")",
           "\udce9", "\udcff\udc80", "é", "😀", " ", "a" * 300]

_chunk = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(st.characters(exclude_characters="\x00"), max_size=12),
    st.binary(min_size=1, max_size=12).filter(lambda b: b"\x00" not in b).map(os.fsdecode),
)
TEXT = st.lists(_chunk, max_size=4).map("".join)


def _is_name(s: str) -> bool:
    return "/" not in s and "\x00" not in s and s not in ("", ".", "..")


NAME = TEXT.filter(_is_name)
# No shrinking: a failing example is reported as found, and a failure costs no minutes.
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A folder holding a small dataset ("data"), a run ("run") and an image ("img.png"); the
    working directory while the module runs."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(FIXTURE / "data", root / "data")
    shutil.copytree(FIXTURE / "run", root / "run")
    shutil.copy(next((root / "data" / "test" / "disc").iterdir()), root / "img.png")
    old = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(old)


def medtl(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``medtl ARGV`` run in this process."""
    from medtl.cli import main

    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", errors="backslashreplace",
                           write_through=True)
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code
    sys.stdout.flush()
    return (0 if code is None else code), out_bytes.getvalue().decode(), \
        err_bytes.getvalue().decode()


def _clean(code: int, out: str, err: str, allowed=(0, 2)) -> None:
    assert code in allowed, (code, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, err[-3000:]
    if code == 2 and "error:" in err:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err  # one line, however the names it holds are made


def _error_names(err: str, name: str) -> None:
    """``name`` appears in the error line as typed, control characters escaped."""
    assert printable(name) in err, (name, err)


@FUZZ
@given(data=NAME, regex=st.one_of(st.none(), TEXT), json=st.booleans())
@example(data="a" * 300 + "[x]", regex=None, json=False)  # a name too long for the system
@example(data="scan[left]\t\x1b[31m\udce9.png", regex="[/_](P\\d+)", json=False)
def test_info_and_check(place, data, regex, json):
    extra = ["--patient-regex", regex] if regex is not None else []
    for command, allowed in (("info", (0, 2)), ("check", (0, 1, 2))):
        argv = [command, "-q", *extra, *(["--json"] if json else [])]
        code, out, err = medtl(*argv, "--", data)
        _clean(code, out, err, allowed)
        if regex is None and not os.path.lexists(data):
            assert code == 2
            _error_names(err, data)
        code, out, err = medtl(*argv, "--", "data")  # the real dataset, fuzzed options
        _clean(code, out, err, allowed)


_INVALID = st.sampled_from(["--backbone", "--strategy", "--head", "--weights", "--augment",
                            "--window", "--slices", "--mode", "--engine", "--class-weight",
                            "--sampler", "--epochs", "--lr", "--image-size"])


@FUZZ
@given(bad=_INVALID, value=TEXT, out=NAME, regex=st.one_of(st.none(), TEXT),
       positive=st.one_of(st.none(), TEXT), data=st.one_of(st.just("data"), NAME))
def test_train_with_fuzzed_options_fails_cleanly(place, bad, value, out, regex, positive,
                                                  data):
    from medtl.models import list_specs

    valid = {s.name for s in list_specs()} | {"auto", "feature-extractor", "hybrid",
                                             "fine-tune", "full", "scratch", "truncated"}
    if value.strip() in valid:
        value += "[x]"  # one option always invalid: the run fails before training
    argv = ["train", "-q", "--weights", "random", "--image-size", "32", "--out", out, bad,
            value]
    if regex is not None:
        argv += ["--patient-regex", regex]
    if positive is not None:
        argv += ["--positive-class", positive]
    code, stdout, err = medtl(*argv, "--", data)
    _clean(code, stdout, err, allowed=(2,))
    assert not os.path.lexists(out) or out in ("data", "run", "img.png")  # nothing half-written


@settings(FUZZ, max_examples=15)
@given(run=st.one_of(st.just("run"), NAME), inputs=st.lists(NAME, min_size=1, max_size=3),
       split=TEXT, method=TEXT, target=TEXT, out=NAME)
@example(run="run", inputs=["b" * 300], split="", method="", target="", out="o")
def test_commands_on_a_run_with_fuzzed_names_fail_cleanly(place, run, inputs, split, method,
                                                          target, out):
    inputs = [i for i in inputs if not os.path.lexists(i)] or ["missing[1].png"]
    code, stdout, err = medtl("predict", "-q", "--", run, *inputs)
    _clean(code, stdout, err)
    assert code == 2
    names = [run] if run != "run" else inputs
    assert any(printable(n) in err for n in names), (names, err)  # as typed
    _clean(*medtl("evaluate", "-q", "--split", split, "--", run, "data"))
    _clean(*medtl("explain", "-q", "--method", method, "--target", target, "--out", out, "--",
                  run, "img.png"))
    _clean(*medtl("report", "--split", split, "--out", out + ".html", "--", run, run))


@settings(FUZZ, max_examples=5)
@given(stem=TEXT.filter(lambda s: "/" not in s and len(os.fsencode(s)) < 200))
def test_a_file_with_any_name_is_predicted_and_named_as_typed(place, stem):
    """A real image under a fuzzed name: predicted, printed (stdout is strict UTF-8) and written
    to the CSV in the one representation of medtl.files.escape_undecodable."""
    import csv

    name = f"i{stem}.png"  # (".png" alone is a hidden file without a suffix)

    folder = place / "named"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        shutil.copy(place / "img.png", folder / name)
    except OSError as exc:
        pytest.skip(f"the file system refuses the name {name!r} ({exc})")
    code, out, err = medtl("predict", "-q", "--paths", "absolute", "--", "run",
                           str(folder / name))
    _clean(code, out, err)
    assert code == 0, err
    code, out, err = medtl("predict", "-q", "--paths", "absolute", "--output", "p.csv", "--",
                           "run", str(folder / name))
    _clean(code, out, err)
    with open("p.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [escape_undecodable(str(folder / name))]
