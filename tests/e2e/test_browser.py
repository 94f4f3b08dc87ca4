"""The demo page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium) against a
real server: upload an image, see the classes and the overlay, switch the class, see an API error."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.live_server import LABELS, MODEL, LiveServer, colourful_png

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 30


def _installed() -> tuple[str, str] | None:
    browser = next((path for path in CHROMIUM_CANDIDATES if os.path.exists(path)), None)
    driver = CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages when they are missing."""
    found = _installed()
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium/chromedriver are not installed and there is no apt-get to install them")
    if os.geteuid() != 0:
        pytest.skip("chromium/chromedriver are not installed and installing them needs root (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command, timeout in (
        (["apt-get", "update"], 300),
        (["apt-get", "install", "-y", "chromium", "chromium-driver"], 900),
    ):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(command)} took longer than {timeout} s")
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = _installed()
    if not found:
        pytest.fail("apt-get installed chromium and chromium-driver, but they are not where expected")
    return found


@pytest.fixture(scope="module")
def browser(chromium: tuple[str, str]) -> Iterator[object]:
    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-default-browser-check",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: object, condition, message: str) -> object:  # type: ignore[no-untyped-def]
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition, message)


def canvas_url(driver: object) -> str:
    return driver.execute_script("return document.getElementById('canvas').toDataURL('image/png');")


def canvas_pixels(data_url: str) -> np.ndarray:
    encoded = data_url.split(",", 1)[1]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"), dtype=np.int16)


def open_page(driver: object, server: LiveServer) -> None:
    driver.get(f"{server.url}/")
    wait(
        driver,
        lambda d: d.execute_script(
            "const s = document.getElementById('model');"
            "return s.options.length > 0 && s.value === arguments[0];",
            MODEL,
        ),
        "the model list did not load",
    )


def upload(driver: object, path: Path) -> None:
    driver.find_element(By.ID, "file").send_keys(str(path))


def upload_and_wait_for_three_classes(driver: object, path: Path, message: str) -> None:
    upload(driver, path)
    wait(
        driver,
        lambda d: (
            d.find_element(By.ID, "result").is_displayed()
            and len(d.find_elements(By.CSS_SELECTOR, "#predictions li")) == 3
        ),
        message,
    )


def test_upload_explain_switch_class_and_errors(
    browser: object, live_server: LiveServer, tmp_path: Path, artifacts_dir: Path
) -> None:
    driver = browser
    driver.set_window_size(1280, 900)
    open_page(driver, live_server)
    assert driver.find_element(By.ID, "model-info").text.startswith("7 classes")
    assert not driver.find_element(By.ID, "result").is_displayed()
    assert not driver.find_element(By.ID, "error").is_displayed()

    picture = tmp_path / "balloons.png"
    picture.write_bytes(colourful_png(640, 420, seed=11))
    upload_and_wait_for_three_classes(driver, picture, "no result with three classes appeared")
    assert not driver.find_element(By.ID, "error").is_displayed()
    items = driver.find_elements(By.CSS_SELECTOR, "#predictions li")
    labels = [item.find_element(By.CSS_SELECTOR, ".label").text for item in items]
    assert all(label in LABELS for label in labels) and len(set(labels)) == 3
    # each probability bar is as wide as its percentage (set through the CSSOM: the page's CSP
    # refuses inline style attributes)
    for item in items:
        percent = item.find_element(By.CSS_SELECTOR, ".prob").text
        bar = item.find_element(By.CSS_SELECTOR, ".bar > span")
        width = driver.execute_script("return arguments[0].style.width;", bar)
        assert width.endswith("%") and float(width[:-1]) == pytest.approx(float(percent[:-1])), width
    first_class = items[0].get_attribute("data-class-id")
    canvas = driver.find_element(By.ID, "canvas")
    assert canvas.get_attribute("data-class-id") == first_class
    assert "active" in (items[0].get_attribute("class") or "")
    assert driver.execute_script(
        "const c = document.getElementById('canvas'); return [c.width, c.height];"
    ) == [
        640,
        420,
    ]
    assert driver.find_element(By.ID, "legend").is_displayed()
    assert labels[0] in driver.find_element(By.ID, "explained").text

    # The overlay differs from the plain picture (opacity 0 shows the picture alone).
    overlay = canvas_url(driver)
    set_opacity = (
        "const r = document.getElementById('opacity'); r.value = arguments[0];"
        "r.dispatchEvent(new Event('input', {bubbles: true}));"
    )
    driver.execute_script(set_opacity, 0)
    plain = canvas_pixels(canvas_url(driver))
    original = np.asarray(Image.open(picture).convert("RGB"), dtype=np.int16)
    assert np.abs(plain - original).max() <= 2
    assert np.abs(canvas_pixels(overlay) - original).mean() > 5
    assert driver.find_element(By.ID, "opacity-value").text == "0%"
    driver.execute_script(set_opacity, 60)
    overlay = canvas_url(driver)
    save_page(driver, artifacts_dir / "demo.png")

    # Clicking another class shows its map.
    second_class = items[1].get_attribute("data-class-id")
    items[1].click()
    wait(
        driver,
        lambda d: d.find_element(By.ID, "canvas").get_attribute("data-class-id") == second_class,
        "the overlay did not switch to the clicked class",
    )
    assert second_class != first_class
    assert canvas_url(driver) != overlay
    active = driver.find_elements(By.CSS_SELECTOR, "#predictions li.active")
    assert [item.get_attribute("data-class-id") for item in active] == [second_class]

    # A file the server refuses: its error message is shown, not swallowed.
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these are some notes, not a picture\n" * 20)
    upload(driver, not_an_image)
    error = wait(
        driver,
        lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error"),
        "no error was shown for a file that is not an image",
    )
    text = error.text
    assert "not an image" in text and "400" in text, text
    assert not driver.find_element(By.ID, "busy").is_displayed()
    logs = [entry for entry in _browser_errors(driver) if "Failed to load resource" not in entry]
    assert not logs, logs


def test_phone_width_layout(
    browser: object, live_server: LiveServer, tmp_path: Path, artifacts_dir: Path
) -> None:
    driver = browser
    driver.set_window_size(390, 844)
    open_page(driver, live_server)
    picture = tmp_path / "phone.png"
    picture.write_bytes(colourful_png(480, 640, seed=12))
    upload_and_wait_for_three_classes(driver, picture, "no result at phone width")
    layout = driver.execute_script(
        "const c = document.getElementById('canvas').getBoundingClientRect();"
        "const p = document.querySelector('.predictions').getBoundingClientRect();"
        "return {scroll: document.documentElement.scrollWidth, inner: window.innerWidth,"
        " canvasRight: c.right, canvasBottom: c.bottom, listTop: p.top, listRight: p.right};"
    )
    assert layout["scroll"] <= layout["inner"], layout  # nothing sticks out sideways
    assert layout["canvasRight"] <= layout["inner"] and layout["listRight"] <= layout["inner"], layout
    assert layout["listTop"] >= layout["canvasBottom"] - 1, layout  # one column: the list under the image
    save_page(driver, artifacts_dir / "demo-phone.png")


def save_page(driver: object, path: Path) -> None:
    """A screenshot of the whole page (beyond the window), or of the window if that is refused."""
    try:
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        path.write_bytes(base64.b64decode(shot["data"]))
    except Exception:
        driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000


def _browser_errors(driver: object) -> list[str]:
    try:
        entries = driver.get_log("browser")
    except Exception:
        return []
    return [entry["message"] for entry in entries if entry.get("level") == "SEVERE"]
