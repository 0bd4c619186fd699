"""The web page at ``/`` in a real browser: Debian's headless Chromium, driven by Selenium and
chromium-driver, opens the page of a real ``medtl serve`` process, uploads a Kermany X-ray and
shows what the API answers for the same file; the page asks for nothing but the server. Then,
in the same browser, a server that needs a token (the hand-built tiny bundle of
tests/serving/bundles.py): the page asks for the token, and a CT DICOM gets the
out-of-distribution warning with the API's reasons.

Chromium's proxy is a recording one that answers nothing (tests/reporting/chromium.py): loopback
bypasses it, so the server is reached directly and any other request lands in the proxy.
One browser session for every check: each Chromium start costs seconds.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from medtl.data.samples import demo_data_path
from tests.conftest import write_dicom
from tests.reporting.chromium import _BROWSER_OWN, _QUIET_BROWSER, _RecordingProxy
from tests.serving.conftest import png_bytes
from tests.serving.server import running_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's chromium-driver, the same version as chromium
BANNER = "Research use only, not for clinical diagnosis"
WAIT_S = 60


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle exported from a small run on the demo's real Kermany X-rays (64 px)."""
    import medtl
    from medtl.export.writer import export_run
    from medtl.run import load_run

    root = tmp_path_factory.mktemp("page")
    run = medtl.train(demo_data_path(), out=root / "run", strategy="hybrid", head="logreg",
                      backbone="mobilenet_v2", weights="imagenet", image_size=64, quiet=True)
    return export_run(load_run(run.path), root / "bundle")


@pytest.fixture(scope="module")
def server(bundle):
    """``medtl serve BUNDLE`` on a free loopback port, ready; its base URL."""
    with running_server(bundle) as running:
        yield running.url


def _browser(proxy: _RecordingProxy, profile: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} not found: install Debian's {package} (`make chromium`)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--disable-extensions",
                "--disable-domain-reliability", *_QUIET_BROWSER,
                f"--proxy-server=http://127.0.0.1:{proxy.port}", f"--user-data-dir={profile}",
                "--window-size=1200,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options,
                            service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def _api(url: str, xray: Path) -> tuple[dict, dict]:
    """What the API answers for ``xray``, and the model it describes."""
    with httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/v1/predict",
                             files={"files": (xray.name, xray.read_bytes(), "image/jpeg")})
        answer.raise_for_status()
        return answer.json()["results"][0], client.get("/v1/model").json()


def _check_result(card, want: dict) -> None:
    """The result card shows the class, probabilities and decisions of the API's answer."""
    from selenium.webdriver.common.by import By

    def one(selector: str):
        return card.find_element(By.CSS_SELECTOR, selector)

    assert card.get_attribute("data-state") == "done", card.text
    assert one(".predicted-class").text == want["predicted_class"]
    shown = one(".predicted-probability")
    assert float(shown.get_attribute("data-probability")) == want["probability"]
    assert shown.text == f"{want['probability']:.3f}"
    bars = card.find_elements(By.CSS_SELECTOR, ".bar")
    assert {b.get_attribute("data-class"): float(b.get_attribute("data-probability"))
            for b in bars} == want["probabilities"]
    assert [b.find_element(By.CSS_SELECTOR, ".bar-value").text for b in bars] == [
        f"{want['probabilities'][b.get_attribute('data-class')]:.3f}" for b in bars]
    rows = {r.get_attribute("data-point"): (r.find_element(By.CSS_SELECTOR, ".threshold").text,
                                            r.find_element(By.CSS_SELECTOR, ".decision").text)
            for r in card.find_elements(By.CSS_SELECTOR, ".decisions tbody tr")}
    assert rows == {p: (f"{d['threshold']:.3f}", d["label"])
                    for p, d in want["decisions"].items()} and rows
    assert one(".ood-warning").is_displayed() == bool(want["ood"] and want["ood"]["flag"])


def _toggle_heatmap(driver, card, method: str) -> None:
    """The heat-map toggle swaps the preview for the overlay, an image that loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = card.find_element(By.CSS_SELECTOR, ".preview-image")
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda _: image.get_attribute("data-view") == "preview")
    preview = image.get_attribute("src")
    button = card.find_element(By.CSS_SELECTOR, ".heatmap-toggle")
    assert button.get_attribute("aria-pressed") == "false"
    button.click()
    wait.until(lambda _: image.get_attribute("data-view") == "heatmap")
    wait.until(lambda _: driver.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    assert image.get_attribute("src") not in ("", preview)
    assert image.get_attribute("data-method") == method
    assert button.get_attribute("aria-pressed") == "true"
    assert method in card.find_element(By.CSS_SELECTOR, ".preview-caption").text


def _screenshot(driver, shot: Path) -> None:
    """The whole page as PNG at ``shot``, copied to /tmp for a person to look at."""
    height = driver.execute_script("window.scrollTo(0, 0);"
                                   "return document.documentElement.scrollHeight")
    driver.set_window_size(1200, height + 120)
    assert driver.save_screenshot(str(shot))
    shutil.copyfile(shot, Path("/tmp") / shot.name)
    print(f"screenshot of the page: {shot} (copied to /tmp/{shot.name})")


def _token_then_ood_warning(driver, url: str, token: str, dicom: Path) -> None:
    """On a server that needs a token: the page asks for it, keeps it in sessionStorage only
    and sends it; a CT DICOM sent to a model of X-rays (CR/DX) gets the out-of-distribution
    warning with the API's reasons, and its preview (DICOM windowed by the server) loads."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with httpx.Client(base_url=url, timeout=60,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        answer = client.post("/v1/predict", files={"files": (dicom.name, dicom.read_bytes())})
        want = answer.json()["results"][0]
    assert want["ood"]["flag"] and want["ood"]["reasons"], want
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(f"{url}/")
    wait.until(lambda d: d.find_element(By.ID, "auth").is_displayed())
    driver.find_element(By.ID, "token").send_keys(token + Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "model-card").is_displayed())
    assert driver.execute_script("return [sessionStorage.getItem('medtl-token'),"
                                 " localStorage.length, document.cookie]") == [token, 0, ""]
    driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(dicom))
    done = f'.result[data-file="{dicom.name}"][data-state]'
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, done))
    card = driver.find_element(By.CSS_SELECTOR, done)
    _check_result(card, want)
    warning = card.find_element(By.CSS_SELECTOR, ".ood-warning")
    assert "Out of distribution" in warning.text
    assert [li.text for li in warning.find_elements(By.CSS_SELECTOR, "li")] == \
        want["ood"]["reasons"]
    image = card.find_element(By.CSS_SELECTOR, ".preview-image")
    wait.until(lambda _: driver.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", image))


def _drop(driver, name: str, data: bytes) -> None:
    """Drop a file on the drop zone (a DragEvent carrying it, as a desktop drag would) and wait
    for its result card to show a prediction."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script(
        "const [name, b64] = arguments;"
        "const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));"
        "const dt = new DataTransfer();"
        "dt.items.add(new File([bytes], name, {type: 'image/png'}));"
        "document.getElementById('drop-zone').dispatchEvent("
        "  new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));",
        name, base64.b64encode(data).decode())
    done = f'.result[data-file="{name}"][data-state="done"]'
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, done))
    assert len(driver.find_elements(By.CSS_SELECTOR, f"{done} .bar")) == 2


def test_page_shows_the_apis_answer_and_asks_nothing_outside(server, tiny_bundle, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    xray = sorted((demo_data_path() / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image, whatever its name says")
    want, model = _api(server, xray)
    proxy = _RecordingProxy()
    driver = _browser(proxy, tmp_path / "chromium-profile")
    try:
        wait = WebDriverWait(driver, WAIT_S)
        driver.get(f"{server}/")
        banner = driver.find_element(By.ID, "research-banner")
        assert BANNER in banner.text and banner.is_displayed()
        wait.until(lambda d: d.find_element(By.ID, "model-card").is_displayed())
        summary = driver.find_element(By.ID, "card-summary").text
        assert model["id"] in summary and model["sha256"] in summary
        told = (model.get("card") or {}).get("summary")
        if told:  # the model card's summary (medtl.export.card): the model and its AUC
            assert told["model"] in summary and f"{told['auc']:.3f}" in summary
        upload = driver.find_element(By.CSS_SELECTOR, "input[type=file]")
        upload.send_keys(str(xray))
        done = f'.result[data-file="{xray.name}"][data-state]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, done))
        card = driver.find_element(By.CSS_SELECTOR, done)
        _check_result(card, want)
        _toggle_heatmap(driver, card, model["explain"])
        upload.send_keys(str(not_image))  # an error is said in words, on its own card
        failed = '.result[data-file="notes.png"][data-state="failed"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, failed))
        failed = driver.find_element(By.CSS_SELECTOR, failed)
        assert "not a PNG, JPEG, TIFF or DICOM" in failed.text
        # The policy the page runs under stops even its own script from reaching elsewhere
        # (were it to try, the proxy below would see it).
        assert driver.execute_async_script(
            "fetch('http://example.com/x').then(() => arguments[0]('sent'),"
            " () => arguments[0]('refused'))") == "refused"
        _screenshot(driver, tmp_path / "page.png")
        assert banner.is_displayed()
        token = "a-token-typed-into-the-page-0123"
        dicom = write_dicom(tmp_path / "ct.dcm", np.arange(64 * 64).reshape(64, 64) % 4096,
                            Modality="CT", BodyPartExamined="HEAD")
        with running_server(tiny_bundle, "--token", token) as tiny:
            _token_then_ood_warning(driver, tiny.url, token, dicom)
            _drop(driver, "dropped.png", png_bytes(np.full((32, 32, 3), 128, np.uint8)))
            _screenshot(driver, tmp_path / "page-ood.png")
    finally:
        driver.quit()
        proxy.close()
    assert [r for r in proxy.requests if not r.startswith(_BROWSER_OWN)] == []
