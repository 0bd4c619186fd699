"""Load on `medtl serve`: throughput, latency and errors at 1, 8 and 32 concurrent clients, and the
server's start-up time and resident memory (issue 16, acceptance 4 and 5).

What it does, all on loopback and stopping by itself:

1. the model: ``--run`` (a run directory or an exported bundle); by default ``medtl demo`` trains
   the demo run (frozen ImageNet MobileNetV2 + logistic regression, 224 px) into a temporary
   folder, and ``medtl export`` makes its bundle;
2. the images: ``--images`` (a folder), by default the Kermany test X-rays in ../shared/data, or
   the demo's own test images when that is missing;
3. offline baseline: the bundle's ``ExportedModel.predict_proba`` over the images in this
   process (load excluded), the images/s that `medtl predict BUNDLE` reaches once loaded;
4. ``python -m medtl.cli serve BUNDLE --port P`` in a child process: seconds from spawn to
   ``/ready`` 200, resident memory (VmRSS) once ready and its peak (VmHWM) after the load;
   and, when ``--run`` is a run directory, the same start-up figures for ``medtl serve RUN``
   (which exports to a temporary folder first and keeps the torch model for Grad-CAM);
5. for each client count: ``--requests`` POST /v1/predict requests, one image each, shared
   among that many threads, each on its own keep-alive connection; images/s, p50/p95/p99
   latency, errors (any non-200).

The load generator runs on the same cores as the server (this machine has 2): the figures are a
floor for a server given the machine to itself.

    python benchmarks/serve_load.py [--run RUN_OR_BUNDLE] [--images DIR] [--clients 1 8 32]
                                    [--requests 2000] [--batch-size 32] [--batch-wait-ms 5]
                                    [--name serve_load]

Writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from _common import ROOT, SHARED_DATA, machine, save

GOAL_RATIO = 0.70  # served images/s at 8 clients over offline predict's
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm"}


def medtl(*args: str) -> None:
    cmd = [sys.executable, "-m", "medtl.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def default_images() -> Path:
    kermany = SHARED_DATA / "chest_xray_kermany_224" / "test"
    if kermany.is_dir():
        return kermany
    from medtl.data.samples import demo_data_path

    return Path(demo_data_path()) / "test"


def list_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        sys.exit(f"{folder}: no images")
    return files


def offline_rate(bundle: Path, images: list[Path]) -> dict:
    """Images/s of the loaded bundle over ``images`` (what `medtl predict BUNDLE` does once the
    model is loaded), best of two passes."""
    from medtl.export.bundle import load_bundle

    model = load_bundle(bundle)
    ds = model.dataset(images)
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        model.predict_dataset(ds)
        best = max(best, len(ds) / (time.perf_counter() - t0))
    print(f"offline predict: {best:.1f} images/s over {len(ds)} images", flush=True)
    return {"images": len(ds), "images_per_s": round(best, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def start_server(bundle: Path, port: int, extra: list[str],
                 log: Path) -> tuple[subprocess.Popen, float]:
    """The server in a child process, its log (one line per request) to a file: a pipe nobody
    reads would fill and block the server."""
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "medtl.cli", "serve", str(bundle),
                                 "--port", str(port), *extra],
                                stdout=subprocess.DEVNULL, stderr=f)
    while get(port, "/ready") != 200:
        if proc.poll() is not None:
            sys.exit(f"the server ended: {log.read_text(errors='replace')[-2000:]}")
        if time.perf_counter() - t0 > 300:
            proc.kill()
            sys.exit("the server was not ready within 300 s")
        time.sleep(0.02)
    return proc, time.perf_counter() - t0


def multipart(path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"{path.name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def load(port: int, bodies: list[tuple[bytes, str]], clients: int, requests: int) -> dict:
    """``requests`` predictions shared among ``clients`` threads; latencies and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body, ctype = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200 and len(json.loads(data)["results"]) == 1
                why = f"HTTP {resp.status}"
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                ok, why = False, type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                (latencies.append(dt * 1000) if ok else errors.append(why))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([np.nan])
    out = {"clients": clients, "requests": requests, "wall_s": round(wall, 2),
           "images_per_s": round(len(latencies) / wall, 2), "errors": len(errors),
           "error_kinds": sorted(set(errors)),
           **{f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)}}
    print(f"  {clients:>2} clients: {out['images_per_s']:.1f} images/s, p50 {out['p50_ms']} ms, "
          f"p95 {out['p95_ms']} ms, p99 {out['p99_ms']} ms, errors {out['errors']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="run directory or bundle (default: the demo run)")
    ap.add_argument("--images", type=Path, help="folder of images (default: Kermany test)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2000, help="requests per client count")
    ap.add_argument("--batch-size", type=int, default=None, help="passed to medtl serve")
    ap.add_argument("--batch-wait-ms", type=float, default=None, help="passed to medtl serve")
    ap.add_argument("--name", default="serve_load", help="results file name")
    a = ap.parse_args()
    extra = [*(["--batch-size", str(a.batch_size)] if a.batch_size else []),
             *(["--batch-wait-ms", str(a.batch_wait_ms)] if a.batch_wait_ms else [])]
    images = list_images(a.images or default_images())
    from medtl.export.bundle import is_bundle

    with tempfile.TemporaryDirectory(prefix="medtl-serve-load-") as tmp:
        tmp = Path(tmp)
        run = a.run
        if run is None:
            run = tmp / "demo"
            t0 = time.perf_counter()
            medtl("demo", "--out", str(run), "--quiet")
            print(f"demo run trained in {time.perf_counter() - t0:.0f} s", flush=True)
        bundle = run
        if not is_bundle(run):
            bundle = tmp / "bundle"
            medtl("export", str(run), "--out", str(bundle))
        offline = offline_rate(bundle, images)
        port = free_port()
        proc, startup = start_server(bundle, port, extra, tmp / "server.log")
        rss_ready = memory_kb(proc.pid, "VmRSS") / 1024
        print(f"server ready in {startup:.2f} s, RSS {rss_ready:.0f} MB", flush=True)
        try:
            bodies = [multipart(p) for p in images]
            load(port, bodies, 2, min(64, a.requests))  # warm-up, not recorded
            levels = [load(port, bodies, c, a.requests) for c in a.clients]
            peak = memory_kb(proc.pid, "VmHWM") / 1024
        finally:
            proc.terminate()
            proc.wait(30)
        run_start = None
        if not is_bundle(run):  # `medtl serve RUN`: exports to a temporary folder, loads torch
            proc, seconds = start_server(run, free_port(), extra, tmp / "server-run.log")
            run_start = {"startup_s": round(seconds, 2),
                         "rss_ready_mb": round(memory_kb(proc.pid, "VmRSS") / 1024, 1)}
            proc.terminate()
            proc.wait(30)
            print(f"serving the run itself: ready in {seconds:.2f} s, RSS "
                  f"{run_start['rss_ready_mb']:.0f} MB", flush=True)
    at8 = next((lv for lv in levels if lv["clients"] == 8), None)
    ratio = at8["images_per_s"] / offline["images_per_s"] if at8 else None
    payload = {"machine": machine(), "command": " ".join(sys.argv),
               "model": "demo run (MobileNetV2 frozen + logreg, 224 px)" if a.run is None
               else str(a.run), "images": str(a.images or default_images()),
               "offline": offline, "startup_s": round(startup, 2),
               "rss_ready_mb": round(rss_ready, 1), "rss_peak_mb": round(peak, 1),
               "serve_run_dir": run_start,
               "levels": levels, "ratio_at_8_clients": None if ratio is None else round(ratio, 3),
               "goal_ratio": GOAL_RATIO, "serve_options": extra}
    print(f"at 8 clients: {ratio:.0%} of offline predict (goal {GOAL_RATIO:.0%}); peak RSS "
          f"{peak:.0f} MB" if ratio is not None else f"peak RSS {peak:.0f} MB")
    print(f"wrote {save(a.name, payload)}")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
