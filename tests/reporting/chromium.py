"""Headless Chromium for report tests: render a page to PNG with every network request sent
to a local recording proxy, so a test can assert that a page asks for nothing external."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest


def chromium() -> str:
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
    "--dns-prefetch-disable", "--allow-browser-signin=false", "--disable-background-networking",
)


# What Chromium 150 still opens at start-up with those flags, with about:blank as the page
# (signin and search-engine preconnects); anything else the proxy sees, the page asked for.
# Requests Chromium makes for itself whatever the page, even with the flags above: sign-in and
# search at start-up (150), the component updater (156 ignores --disable-component-update), and
# the device check-in of Chromium's push messaging (150, android.clients.google.com: seen once in
# five full runs of the suite, 2026-12-02), and Debian's Chromium 156 preconnecting to its
# default search engine (start.duckduckgo.com, seen with about:blank as the only page). No
# report can name these hosts: the page's own references are data: URIs (checked by test_html).
_BROWSER_OWN = ("CONNECT accounts.google.com:443 ", "CONNECT www.google.com:443 ",
                "CONNECT update.googleapis.com:443 ", "POST http://update.googleapis.com/",
                "CONNECT android.clients.google.com:443 ", "CONNECT start.duckduckgo.com:443 ")


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
                # A connection closed without a byte is one of Chromium's speculative
                # preconnects (seen once in a clean-clone suite run, 2026-12-02): it names no
                # host or resource, and a page's own request always sends its request line.
                if line:
                    self.requests.append(line)

    def close(self) -> None:
        self.sock.close()


def screenshot(page: Path, png: Path) -> list[str]:
    """Render ``page`` with headless Chromium into ``png``; return the requests it made."""
    proxy = _RecordingProxy()
    try:
        subprocess.run(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
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
