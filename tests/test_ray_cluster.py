"""`medtl bench --ray ADDRESS` on a real two-node Ray cluster on loopback (issue 18, point 3).

A head node and a second node are started with `ray start` as separate processes, as on a
cluster; the bench connects to the head's address. While the cells run, one worker executing a
cell is SIGKILLed: Ray must retry that cell and the leaderboard must still list every cell.
"""

from __future__ import annotations

import contextlib
import csv
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_blob_images

ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'medtl[ray]'")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds Ray's workers through /proc")

CELL_TITLE = "ray::_run_cell"  # the process title Ray gives a worker while it runs a cell


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict[str, str]) -> None:
    exe = Path(sys.executable).with_name("ray")
    done = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"ray {' '.join(args)}:\n{done.stderr[-3000:]}"


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process this user can read."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found[int(proc.name)] = (ppid, cmdline)
    return found


def _cluster_processes(temp: Path) -> dict[int, str]:
    """This test's Ray processes: those started with its temp dir, and their descendants
    (workers and agents retitle themselves): never another Ray on the machine."""
    procs = _processes()
    ours = {pid for pid, (_, cmd) in procs.items() if str(temp) in cmd}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours
        ours |= more
        grew = bool(more)
    return {pid: procs[pid][1] for pid in ours}


def _stop(temp: Path) -> None:
    for pid in _cluster_processes(temp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path):
    """Head plus one worker node, one CPU each, on 127.0.0.1; stopped after the test. Yields
    the head's address and the environment every Ray process of the cluster shares.

    Token authentication as a real cluster has it (Ray's default in recent releases): one token
    file of the test's own for the nodes and the driver, never ~/.ray."""
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "MEDTL_CACHE_DIR": str(tmp_path / "cache"), "MEDTL_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # A short temp dir of its own: Ray's socket paths must stay under the OS's 107 bytes.
    temp = Path(f"/tmp/medtl-ray-{os.getpid()}")
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        _ray("start", "--head", "--port", str(port), "--temp-dir", str(temp),
             "--include-dashboard", "false", "--dashboard-port", str(_free_port()), *common,
             env=env)
        _ray("start", "--address", address, *common, env=env)
        yield address, env, temp
    finally:
        _stop(temp)  # only this cluster: `ray stop` would stop every Ray on the machine
        shutil.rmtree(temp, ignore_errors=True)


def test_bench_on_a_two_node_cluster_retries_a_cell_whose_worker_is_killed(tmp_path, cluster):
    """`medtl bench --ray ADDRESS` as a user runs it, in its own process; this test kills the
    first worker it sees running a cell."""
    address, env, temp = cluster
    data = write_blob_images(tmp_path / "blobs", n_per_class=12)
    out = tmp_path / "bench"
    bench = subprocess.Popen(
        [sys.executable, "-c", "import sys; from medtl.cli import main; main(sys.argv[1:])",
         "bench", str(data), "--out", str(out), "--backbones", "mobilenet_v2",
         "--strategies", "hybrid:logreg,hybrid:knn,hybrid:svm", "--image-size", "64",
         "--patient-regex", r"(p\d+)", "--ray", address, "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: list[int] = []
    while bench.poll() is None and not killed:
        for pid, cmd in _cluster_processes(temp).items():
            if cmd.startswith(CELL_TITLE):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
        time.sleep(0.02)
    _, err = bench.communicate(timeout=300)
    assert bench.returncode == 0, err[-3000:]
    assert killed, "no worker was seen running a cell: the fault was not injected"
    cells = sorted(p.parent.name for p in (out / "cells").glob("[!.]*/config.json"))
    assert cells == [f"mobilenet_v2-hybrid-{h}-seed0" for h in ("knn", "logreg", "svm")]
    with open(out / "leaderboard.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_a_cell_lost_after_its_retries_fails_alone_with_its_name(monkeypatch):
    """Ray gives up on one cell (its worker died every time): the others' results are kept and
    that cell becomes one failure line naming it, not a traceback ending the bench."""
    from medtl import bench as bench_module
    from medtl.bench import Cell

    asked: dict = {}

    def remote(**options):
        asked.update(options)
        return lambda fn: type("Task", (), {"remote": staticmethod(
            lambda data, cell, out, opts: cell)})

    def get(cell):
        if cell.name.endswith("knn-seed0"):
            raise ray.exceptions.WorkerCrashedError()
        return []

    monkeypatch.setattr(ray, "remote", remote)
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no cluster started here
    cells = [Cell("mobilenet_v2", s, 0) for s in ("hybrid:logreg", "hybrid:knn", "hybrid:svm")]
    failures = bench_module._run_on_ray("127.0.0.1:1", "data", cells, "out", {})
    assert asked == {"num_cpus": 1, "max_retries": bench_module.RAY_RETRIES}
    assert len(failures) == 1 and failures[0].startswith("mobilenet_v2-hybrid-knn-seed0: lost")


def test_an_address_nothing_answers_is_one_error_line_at_once(tmp_path, capsys):
    """Ray alone retries a dead address for minutes, logging as it goes; medtl refuses it
    before any cell, exit 2, one line naming the address."""
    from tests.test_cli import one_line_error, run_cli

    data = write_blob_images(tmp_path / "blobs", n_per_class=2, size=32, splits=("train",))
    address = f"127.0.0.1:{_free_port()}"  # bound and released: nothing listens there
    code, _, err = run_cli(["bench", data, "--backbones", "mobilenet_v2", "--strategies",
                            "hybrid:logreg", "--image-size", "32", "--ray", address,
                            "--out", tmp_path / "bench"], capsys)
    line = one_line_error(err)
    assert code == 2 and address in line and "nothing answers" in line, line
    assert not any((tmp_path / "bench" / "cells").glob("*"))  # no cell was started
