"""The package's shape: layers checked by import-linter, no import cycle, and a light
``import medtl`` / ``medtl --help`` (torch, scikit-learn, matplotlib and SciPy load on first use).

Imports are checked in fresh interpreters: in this process other tests have long since loaded
torch, so ``sys.modules`` here says nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "matplotlib", "scipy")


def _heavy_modules_after(code: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run ``code`` in a fresh interpreter, then list the heavy libraries it loaded."""
    probe = (f"import sys, json\ntry:\n    {code}\nexcept SystemExit:\n    pass\n"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1]), proc


def test_import_medtl_loads_no_heavy_library():
    loaded, _ = _heavy_modules_after("import medtl; medtl.__version__; medtl.MedtlError")
    assert loaded == []


def test_medtl_help_loads_no_heavy_library():
    loaded, proc = _heavy_modules_after("from medtl.cli import main; main(['--help'])")
    assert loaded == []
    assert "Usage" in proc.stdout and "train" in proc.stdout


def test_public_names_load_on_first_use():
    import medtl
    from medtl import TransferClassifier, load_dataset, train

    for name in medtl.__all__:
        assert getattr(medtl, name) is not None, name
    assert set(medtl.__all__) <= set(dir(medtl))
    assert train.__module__ == "medtl.workflow"
    assert TransferClassifier.__name__ == "TransferClassifier" and callable(load_dataset)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        medtl.nope  # noqa: B018


def _lint_imports() -> str | None:
    exe = Path(sys.executable).with_name("lint-imports")
    return str(exe) if exe.exists() else shutil.which("lint-imports")


def test_import_layers_and_acyclic_contracts_are_kept():
    exe = _lint_imports()
    if exe is None:
        pytest.skip("lint-imports not installed (pip install -e '.[dev]' installs import-linter)")
    proc = subprocess.run([exe, "--no-cache"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "medtl layers (top to bottom) KEPT" in proc.stdout
    assert "no import cycle between sibling modules or packages KEPT" in proc.stdout


def _cycles(graph) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(
                        child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def test_no_import_cycle_between_medtl_modules():
    """Every import counts, including those inside functions: a cycle is a cycle in the design
    even when a late import keeps it from failing at run time."""
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (dev extras)")
    graph = grimp.build_graph("medtl", cache_dir=None)
    cycles = sorted(sorted(c) for c in _cycles(graph))
    assert cycles == [], f"import cycles: {cycles}"
