"""The web page of a multi-label model (issue 21), in headless Chromium as tests/serving/
test_page.py drives it: the card lists the labels and their thresholds, a result shows one
row per label (probability, threshold, present) as /v1/predict answers it and no predicted
class, and the heat map is for the label chosen in the page."""

from __future__ import annotations

import httpx
import pytest

from medtl.export.writer import export_run
from medtl.run import load_run
from tests.export.multilabel import LABELS, disc_bar_run, with_both
from tests.reporting.chromium import _BROWSER_OWN, _RecordingProxy
from tests.serving.server import running_server
from tests.serving.test_page import WAIT_S, _browser, _screenshot


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data, run = disc_bar_run(tmp_path_factory)
    bundle = export_run(load_run(run), tmp_path_factory.mktemp("ml-page") / "bundle")
    with running_server(bundle) as server:
        yield server.url, data


def test_page_shows_each_label_and_explains_the_chosen_one(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, data = served
    image = with_both(data)
    with httpx.Client(base_url=url, timeout=60) as client:
        want = client.post("/v1/predict", files={"files": (image.name, image.read_bytes())}
                           ).json()["results"][0]
        model = client.get("/v1/model").json()
    proxy = _RecordingProxy()
    driver = _browser(proxy, tmp_path / "chromium-profile")
    try:
        wait = WebDriverWait(driver, WAIT_S)
        driver.get(f"{url}/")
        wait.until(lambda d: d.find_element(By.ID, "model-card").is_displayed())
        summary = driver.find_element(By.ID, "card-summary").text
        assert "Labels" in summary and "multi-label" in summary
        for label in LABELS:
            assert f"{label} {model['thresholds'][label]:.3f}" in summary
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(image))
        done = f'.result[data-file="{image.name}"][data-state="done"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, done))
        card = driver.find_element(By.CSS_SELECTOR, done)
        assert not card.find_element(By.CSS_SELECTOR, ".predicted").is_displayed()
        assert not card.find_element(By.CSS_SELECTOR, ".decisions").is_displayed()
        rows = card.find_elements(By.CSS_SELECTOR, ".labels tbody tr")
        assert [r.get_attribute("data-label") for r in rows] == LABELS
        for row in rows:
            d = want["labels"][row.get_attribute("data-label")]
            assert float(row.get_attribute("data-probability")) == d["probability"]
            cells = [row.find_element(By.CSS_SELECTOR, c).text
                     for c in (".probability", ".threshold", ".decision")]
            assert cells == [f"{d['probability']:.3f}", f"{d['threshold']:.3f}",
                             "present" if d["present"] else "absent"]
        present = card.find_element(By.CSS_SELECTOR, ".present-labels").text
        assert present == (", ".join(want["present"]) or "none")
        # The heat map for the label chosen in the page (not the most probable one)
        other = LABELS[1 - LABELS.index(max(want["probabilities"],
                                           key=want["probabilities"].get))]
        Select(card.find_element(By.CSS_SELECTOR, ".heatmap-target")).select_by_value(other)
        image_el = card.find_element(By.CSS_SELECTOR, ".preview-image")
        wait.until(lambda _: image_el.get_attribute("data-view") == "preview")
        card.find_element(By.CSS_SELECTOR, ".heatmap-toggle").click()
        wait.until(lambda _: image_el.get_attribute("data-view") == "heatmap")
        caption = card.find_element(By.CSS_SELECTOR, ".preview-caption").text
        assert caption.endswith(f"for label {other}"), caption
        _screenshot(driver, tmp_path / "page-multilabel.png")
    finally:
        driver.quit()
        proxy.close()
    assert [r for r in proxy.requests if not r.startswith(_BROWSER_OWN)] == []
