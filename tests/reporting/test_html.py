"""RUN/report.html and `medtl report`: self-contained pages whose images decode, checked as text
and as rendered by headless Chromium with every network request routed to a recording proxy."""

from __future__ import annotations

import base64
import io
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medtl
from medtl.cli import main
from medtl.evaluation.stats import delong_test

from ..conftest import write_blob_images

_SRC = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", re.I)
_URL = re.compile(r"""(?:https?:)?//[^\s"')]+|url\(""", re.I)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = write_blob_images(root / "blobs", n_per_class=16)
    common = dict(patient_regex=r"(p\d+)", image_size=64, quiet=True)
    a = medtl.train(data, strategy="hybrid", head="logreg", out=root / "logreg", **common)
    b = medtl.train(data, strategy="feature-extractor", calibrate=True, out=root / "fe",
                    **common)
    return a, b


def _images(page: str) -> list[Image.Image]:
    out = []
    for uri in re.findall(r'<img src="([^"]+)"', page):
        assert uri.startswith("data:image/png;base64,"), uri[:60]
        img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        img.load()  # decodes every pixel; a truncated PNG raises here
        out.append(img)
    return out


def _assert_self_contained(page: str) -> None:
    for ref in _SRC.findall(page):
        assert ref.startswith(("data:", "#")), f"external reference {ref[:80]}"
    text_outside_data = re.sub(r"data:[^\"']+", "", page)
    assert not _URL.search(text_outside_data), _URL.search(text_outside_data).group(0)


def test_run_report_is_self_contained_with_plots_and_confident_errors(two_runs):
    a, b = two_runs
    page = (a.path / "report.html").read_text()
    _assert_self_contained(page)
    for section in ("Data", "Configuration", "Metrics", "Operating points", "Calibration",
                    "Plots", "Most confident errors", "Cost"):
        assert f">{section}" in page, section
    images = _images(page)
    # ROC, PR, confusion, reliability; thumbnails for each listed error.
    n_errors = page.count("<td class=thumb>")
    assert len(images) >= 4 + n_errors
    assert all(min(img.size) > 32 for img in images)
    test = a.metrics["test"]
    assert f"{test['auc']:.3f}" in page
    assert f"{test['auc_ci95'][0]:.3f}" in page

    calibrated = (b.path / "report.html").read_text()
    assert "temperature" in calibrated and "ECE before scaling" in calibrated
    _images(calibrated)


def test_medtl_report_ranks_runs_and_reports_delong_against_the_best(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "compare.html"
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(a.path), str(b.path), "--out", str(out)])
    assert exit_.value.code in (0, None)
    page = out.read_text()
    _assert_self_contained(page)
    assert len(_images(page)) == 2  # ROC overlay and AUC against training time
    runs = sorted([a, b], key=lambda r: -r.metrics["test"]["auc"])
    assert page.index(f"<code>{runs[0].path.name}</code>") < page.index(
        f"<code>{runs[1].path.name}</code>")

    def scores(run):
        rows = sorted((r for r in run.predictions() if r["split"] == "test"),
                      key=lambda r: r["path"])
        pos = run.config["positive_class"]
        return (np.array([r["label"] == pos for r in rows], dtype=int),
                np.array([float(r[f"prob_{pos}"]) for r in rows]))

    y, best = scores(runs[0])
    _, other = scores(runs[1])
    d = delong_test(y, best, other)
    assert f"{-d['difference']:+.3f}" in page
    p = d["p_value"]
    assert (f"p = {p:.3f}" if p >= 0.001 else "p = &lt; 0.001") in page


def test_report_of_a_directory_that_is_not_a_run_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert exit_.value.code == 2
    assert "not a medtl run directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- Chromium
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("headless Chromium not installed (`make test` installs Debian's chromium)")


# Chromium's own background traffic (network time, sign-in, safe browsing, field trials, ...),
# turned off so that any request the proxy sees comes from the page. Puppeteer's defaults.
_QUIET_BROWSER = (
    "--disable-client-side-phishing-detection", "--safebrowsing-disable-auto-update",
    "--metrics-recording-only", "--no-pings", "--disable-breakpad",
    "--disable-field-trial-config", "--no-default-browser-check",
    "--disable-search-engine-choice-screen", "--disable-features=NetworkTimeServiceQuerying,"
    "OptimizationHints,OptimizationGuideModelDownloading,OptimizationHintsFetching,"
    "OptimizationTargetPrediction,Translate,MediaRouter,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater,SafeBrowsing,DialMediaRouteProvider,"
    "AccountConsistency,SigninInterceptBubble,PreconnectToSearch,NetworkPrediction",
    "--dns-prefetch-disable", "--allow-browser-signin=false",
)


# What Chromium 150 still opens at start-up with those flags, with about:blank as the page
# (signin and search-engine preconnects); anything else the proxy sees, the page asked for.
_BROWSER_OWN = ("CONNECT accounts.google.com:443 ", "CONNECT www.google.com:443 ")


class _RecordingProxy:
    """An HTTP proxy that answers nothing and records every request line it is sent."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    line = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
                except OSError:
                    line = "<no request line>"
                self.requests.append(line)

    def close(self) -> None:
        self.sock.close()


def _screenshot(page: Path, png: Path) -> list[str]:
    """Render ``page`` with headless Chromium into ``png``; return the requests it made."""
    proxy = _RecordingProxy()
    try:
        subprocess.run(
            [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
             "--hide-scrollbars", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-default-apps",
             "--disable-extensions", "--disable-domain-reliability",
             *_QUIET_BROWSER,
             f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>",
             f"--user-data-dir={png.parent / 'chromium-profile'}",
             "--window-size=1200,3000", "--virtual-time-budget=5000",
             f"--screenshot={png}", page.resolve().as_uri()],
            check=True, capture_output=True, timeout=120)
    finally:
        proxy.close()
    return [r for r in proxy.requests if not r.startswith(_BROWSER_OWN)]


def test_chromium_renders_the_comparison_and_requests_nothing_external(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "compare.html"
    medtl.workflow.report([a.path, b.path], out)
    for page in (out, a.path / "report.html"):
        png = tmp_path / f"{page.parent.name}-{page.stem}.png"
        requests = _screenshot(page, png)
        assert requests == [], requests
        shot = np.asarray(Image.open(png).convert("L"))
        assert shot.shape == (3000, 1200)
        # Something was drawn: text and plots, not a blank page.
        assert (shot < 128).mean() > 0.005


def test_the_proxy_catches_an_external_image(tmp_path):
    """The check above can fail: a page that names an external image is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://example.org/x.png">'
                    "</body></html>")
    requests = _screenshot(page, tmp_path / "leaky.png")
    assert any("example.org" in r for r in requests), requests
