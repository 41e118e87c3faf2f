"""The service's web page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
Selenium against the application of tests/test_serve.py on 127.0.0.1. The tests are collected there (one
application start for both): this module is not a test module of its own.

An uploaded (picked or dropped) image or a stored sample gives the original, the backbone's view and one
reconstruction per seed, with numeric metrics; the mapped tab applies a mapping run; bad input gives a
readable message, never a blank page. The page after a reconstruction is saved as a screenshot under
$FEATMAP_TEST_ARTIFACTS (default .pytest_artifacts/ at the repository root). The API docs (/docs) render
offline from the app's own files; the page and the docs answer with a strict Content-Security-Policy,
and no test sees it refuse anything (featmap_ray/serve/page.py).
"""

import base64
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import lance
import pytest
import requests
from PIL import Image

from featmap_ray.io import tables
from tests.conftest import write_image
from tests.ray_cluster import REPO

CHROMIUM = Path("/usr/lib/chromium/chromium")  # the real binary: /usr/bin/chromium is a wrapper script
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = ("install Debian's chromium and chromium-driver: `apt-get install --no-install-recommends chromium "
           "chromium-driver` as root (`make test` does it when it runs as root)")
ARTIFACTS = Path(os.environ.get("FEATMAP_TEST_ARTIFACTS", REPO / ".pytest_artifacts"))
WAIT_S = 60  # a few 2-step samplings of the tiny model, on a busy 2-core machine
SEEDS = [100, 101]
UPLOAD_SIZE = (96, 80)


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"headless Chromium is missing ({', '.join(missing)}): {INSTALL}")
    from selenium import webdriver  # a dev dependency (make setup)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1280,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # selenium-manager must not try to download a driver or a browser
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, service):
    """The page, loaded, its model list filled from /models (Run is enabled then); afterwards, no
    JavaScript error and nothing refused by the page's Content-Security-Policy in the console (source
    "security"; failed requests the tests provoke are logged as network errors)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("browser")  # drop the entries of earlier tests
    browser.get(service["url"] + "/")
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "run").is_enabled())
    yield browser
    errors = [e for e in browser.get_log("browser") if e["source"] in ("javascript", "security")]
    assert errors == []


# Collects the CSP violations of a page in window.cspViolations from its first script on; injected
# through the DevTools protocol, which the page's policy does not govern.
VIOLATION_RECORDER = """
    window.cspViolations = [];
    document.addEventListener("securitypolicyviolation", (e) => window.cspViolations.push(
        `${e.violatedDirective} refused ${e.blockedURI} (${e.sourceFile}:${e.lineNumber})`));"""


@contextlib.contextmanager
def _recording_csp_violations(driver):
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": VIOLATION_RECORDER})
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})


# What each page may load: the app itself ('self'), data: and blob: images, nothing else ('none').
CSP_DIRECTIVES = {
    "default-src": {"'self'"}, "script-src": {"'self'"}, "style-src": {"'self'"},
    "img-src": {"'self'", "data:", "blob:"}, "connect-src": {"'self'"}, "object-src": {"'none'"},
    "base-uri": {"'none'"}, "frame-ancestors": {"'none'"}, "form-action": {"'self'"},
}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _set(driver, element_id: str, value: str) -> None:
    field = _by_id(driver, element_id)
    field.clear()
    field.send_keys(value)


def _run_and_wait(driver) -> None:
    """Click Run and wait for the result or an error; the spinner must have been shown meanwhile (a
    MutationObserver records it, since a fast answer may hide it before the next poll)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("""
        window.sawProgress = false;
        const progress = document.getElementById('progress');
        new MutationObserver(() => { if (!progress.hidden) window.sawProgress = true; })
            .observe(progress, {attributes: true});""")
    _by_id(driver, "run").click()
    WebDriverWait(driver, WAIT_S).until(
        lambda d: _by_id(d, "results").is_displayed() or _by_id(d, "error").is_displayed())
    assert driver.execute_script("return window.sawProgress")
    assert not _by_id(driver, "progress").is_displayed() and _by_id(driver, "run").is_enabled()


def _image(driver, img) -> Image.Image:
    """The <img>'s data URL decoded, after checking that the browser itself decoded it at that size."""
    src = img.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert image.format == "PNG"
    width, height = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
    assert (width, height) == image.size
    return image


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _metrics(table) -> dict[str, object]:
    from selenium.webdriver.common.by import By

    return {td.get_attribute("data-metric"): json.loads(td.get_attribute("data-value"))
            for td in table.find_elements(By.CSS_SELECTOR, "td[data-metric]")}


def _reconstructions(driver, size: int) -> list[dict[str, object]]:
    """Per seed shown: its image (a size x size PNG, FeatInv's output) and its metrics."""
    from selenium.webdriver.common.by import By

    shown = []
    for figure in driver.find_elements(By.CSS_SELECTOR, "#result-reconstructions figure.reconstruction"):
        assert _image(driver, figure.find_element(By.TAG_NAME, "img")).size == (size, size)
        metrics = _metrics(figure.find_element(By.TAG_NAME, "table"))
        assert _is_number(metrics["cos_median_lower"]) and -1 <= metrics["cos_median_lower"] <= 1
        assert isinstance(metrics["top1_match"], bool) and isinstance(metrics["top5_match"], bool)
        shown.append({"seed": int(figure.get_attribute("data-seed")), **metrics})
    return shown


def _upload(tmp_path: Path) -> Path:
    path = tmp_path / "upload.png"
    write_image(path, size=UPLOAD_SIZE, seed=11)
    return path


def test_an_upload_shows_the_original_the_backbones_view_and_the_reconstructions(page, service, tmp_path):
    _by_id(page, "file-input").send_keys(str(_upload(tmp_path)))  # what a pick or a drop puts in the input
    _set(page, "seeds", ", ".join(map(str, SEEDS)))
    _run_and_wait(page)
    assert not _by_id(page, "error").is_displayed(), _by_id(page, "error").text

    assert _image(page, _by_id(page, "result-original")).size == UPLOAD_SIZE
    assert _image(page, _by_id(page, "result-backbone-view")).size == (288, 288)  # convnext_base's input
    shown = _reconstructions(page, service["default_model"].image_size)
    assert [r["seed"] for r in shown] == SEEDS
    aggregate = _metrics(_by_id(page, "result-metrics"))
    assert aggregate["count"] == len(SEEDS) and _is_number(aggregate["seconds"])
    assert aggregate["cos_median_lower"] == pytest.approx(sum(r["cos_median_lower"] for r in shown) / len(SEEDS))
    assert 'FeatInv model “default”' in _by_id(page, "result-model").text

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = tmp_path / "serve_page.png"
    assert page.save_screenshot(str(shot))
    assert Image.open(shot).format == "PNG"
    shutil.copy(shot, ARTIFACTS / shot.name)


def test_the_mapped_tab_reconstructs_an_upload_after_a_mapping_run(page, service, tmp_path):
    from selenium.webdriver.support.ui import Select

    _by_id(page, "tab-mapped").click()
    assert _by_id(page, "panel-mapped").is_displayed() and not _by_id(page, "panel-reconstruct").is_displayed()
    key = service["spec"].key
    Select(_by_id(page, "mapping-run")).select_by_value(key)
    assert service["mapping_run"] in _by_id(page, "mapping-run-info").text  # its MLflow run id
    Select(_by_id(page, "model")).select_by_value("other")
    _by_id(page, "file-input").send_keys(str(_upload(tmp_path)))
    _run_and_wait(page)
    assert not _by_id(page, "error").is_displayed(), _by_id(page, "error").text
    assert _by_id(page, "result-title").text == "Mapped reconstruction"
    assert key in _by_id(page, "result-model").text and service["other_run"] in _by_id(page, "result-model").text
    assert [r["seed"] for r in _reconstructions(page, service["other_model"].image_size)] == service["cfg"].serve.seeds
    assert _is_number(_metrics(_by_id(page, "result-metrics"))["mapped_vs_input_cos_median_lower"])


def test_a_stored_sample_by_its_source_id(page, service):
    cfg = service["cfg"]
    st = tables.Store(cfg.storage)
    originals = lance.dataset(st.layout.images).to_table(columns=["source_id"], filter="variant = 'original'")
    source_id = originals["source_id"][0].as_py()
    _set(page, "sample-source-id", source_id)
    _run_and_wait(page)
    assert not _by_id(page, "error").is_displayed(), _by_id(page, "error").text
    assert f"stored sample {source_id} / original" in _by_id(page, "result-model").text
    stored = st.rows(st.layout.images, [(source_id, "original")], ["image"])["image"][0].as_py()
    assert _image(page, _by_id(page, "result-original")).tobytes() == Image.open(io.BytesIO(stored)).tobytes()
    assert [r["seed"] for r in _reconstructions(page, service["default_model"].image_size)] == cfg.serve.seeds


def test_a_dropped_file_is_what_run_sends(page):
    """A drop (synthetic: WebDriver cannot drag files from the desktop) puts the file in the file input."""
    name = page.execute_script("""
        const zone = document.getElementById('drop-zone');
        const dropped = new DataTransfer();
        dropped.items.add(new File(['not an image'], 'dropped.png', {type: 'image/png'}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dropped, bubbles: true, cancelable: true}));
        return document.getElementById('file-input').files[0].name;""")
    assert name == "dropped.png" and _by_id(page, "drop-label").text == "dropped.png"
    _run_and_wait(page)
    assert "not a recognised image" in _by_id(page, "error").text


def test_bad_input_shows_a_readable_message(page, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not an image")
    _by_id(page, "file-input").send_keys(str(not_an_image))
    _run_and_wait(page)
    message = _by_id(page, "error").text
    assert message.startswith("The service answered 400") and "not a recognised image" in message
    assert "<" not in message and not _by_id(page, "results").is_displayed()
    assert _by_id(page, "form").is_displayed()  # the page is still there, ready for the next try

    # Checked on the page before any request: too many seeds, steps beyond the limit, no image.
    for field, value, phrase in (("seeds", "1 2 3 4 5 6 7 8 9", "at most 8"), ("seeds", "1, x", '"x"'),
                                 ("steps", "51", "steps: give an integer from 1 to 50")):
        _set(page, field, value)
        _by_id(page, "run").click()
        assert phrase in _by_id(page, "error").text
        _set(page, field, "2")
    page.refresh()
    WebDriverWait(page, WAIT_S).until(lambda d: _by_id(d, "run").is_enabled())
    _by_id(page, "run").click()
    assert "Drop or pick an image" in _by_id(page, "error").text


def _csp(header: str) -> dict[str, set[str]]:
    """A Content-Security-Policy header as directive -> sources (a directive named twice: the first counts)."""
    policy = {}
    for directive in filter(None, (part.strip() for part in header.split(";"))):
        name, *sources = directive.split()
        policy.setdefault(name.lower(), set(sources))
    return policy


def test_the_page_and_the_api_docs_answer_with_a_strict_content_security_policy(page, service):
    """Nothing from another origin, no inline script or style, no eval, not framed: and the page (loaded
    by the `page` fixture, which fails on any refusal in the console) still works under it."""
    for path in ("/", "/docs"):
        answer = requests.get(service["url"] + path, timeout=30)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
        # As browsers read them: a list (the page and a middleware may both set them), all the same value.
        for header, value in (("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer")):
            assert {v.strip().lower() for v in answer.headers[header].split(",")} == {value}, (path, header)
        policy = _csp(answer.headers["content-security-policy"])
        assert policy == CSP_DIRECTIVES, path
        sources = set().union(*policy.values())
        assert sources <= {"'self'", "'none'", "data:", "blob:"}, path  # no host, no scheme like https:
        assert not {"'unsafe-inline'", "'unsafe-eval'", "'unsafe-hashes'", "'strict-dynamic'"} & sources
    assert _by_id(page, "run").is_enabled()


def test_the_api_docs_render_offline(browser, service):
    """/docs is Swagger UI from the app's own files: every operation of /openapi.json is an operation
    block, no request leaves the service, and the console has no error, failed load or CSP violation."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = service["url"]
    schema = requests.get(url + "/openapi.json", timeout=30).json()
    operations = sorted((path, method) for path, item in schema["paths"].items() for method in item
                        if method in HTTP_METHODS)
    assert ("/reconstruct", "post") in operations

    browser.get_log("browser")  # drop the entries of earlier tests
    with _recording_csp_violations(browser):
        browser.get(url + "/docs")
        WebDriverWait(browser, WAIT_S).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= len(operations))
        blocks = browser.find_elements(By.CSS_SELECTOR, ".opblock")
        shown = sorted((block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"),
                        block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text.lower())
                       for block in blocks)
        assert shown == operations
        assert schema["info"]["title"] in browser.find_element(By.CSS_SELECTOR, ".info .title").text
        # One operation opened: its parameters and request body rendered under the policy too.
        reconstruct = next(b for b in blocks if b.find_element(By.CSS_SELECTOR, ".opblock-summary-path")
                           .get_attribute("data-path") == "/reconstruct")
        reconstruct.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        WebDriverWait(browser, WAIT_S).until(lambda d: reconstruct.find_elements(By.CSS_SELECTOR, ".parameters"))

        loaded = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
        assert any(name.endswith("/swagger-ui-bundle.js") for name in loaded)
        assert [name for name in loaded if not name.startswith(url + "/")] == []
        assert browser.execute_script("return window.cspViolations") == []
    console = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert console == []
