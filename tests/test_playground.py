"""The playground at / in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium):
it shows the model, streams text in as it is generated, and Stop stops it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from helpers import headless_chromium
from serving import ServerProcess, start_server


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    driver = headless_chromium(tmp_path)
    yield driver
    driver.quit()


@pytest.fixture
def server(trained_model_dir: Path) -> Iterator[ServerProcess]:
    srv = start_server(trained_model_dir)
    yield srv
    srv.kill()


def _completion(browser: webdriver.Chrome) -> str:
    return browser.find_element(By.CSS_SELECTOR, "#output .completion").get_attribute("textContent") or ""


@pytest.mark.end_to_end
def test_playground_streams_and_stops(browser: webdriver.Chrome, server: ServerProcess, tmp_path: Path):
    wait = WebDriverWait(browser, 60, poll_frequency=0.02)
    browser.get(server.url + "/")
    wait.until(lambda b: "parameters" in b.find_element(By.ID, "model-info").text)
    info = browser.find_element(By.ID, "model-info").text
    assert "tiny" in info and "val loss" in info
    assert browser.find_element(By.ID, "model-info").get_attribute("data-params") not in ("", "0")

    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("ROMEO:\n")
    max_tokens = browser.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("4096")  # the server's cap: far more than the test waits for
    button = browser.find_element(By.ID, "generate")
    button.click()

    wait.until(lambda b: len(_completion(b)) > 0)
    seen = len(_completion(browser))
    wait.until(lambda b: len(_completion(b)) > seen + 20)  # it grows as the characters stream in
    assert button.text == "Stop"
    button.click()
    wait.until(lambda b: b.find_element(By.ID, "generate").text == "Generate")
    stopped = _completion(browser)
    assert 0 < len(stopped) < 4096
    time.sleep(0.3)
    assert _completion(browser) == stopped  # nothing more arrives after Stop
    assert "stopped" in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "error").text == ""
    assert browser.find_element(By.CSS_SELECTOR, "#output .prompt").text.startswith("ROMEO:")

    shot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@pytest.mark.end_to_end
def test_a_hostile_model_folder_runs_no_script_in_the_page(
    browser: webdriver.Chrome, trained_model_dir: Path, tmp_path: Path
):
    """A model folder is untrusted input: markup in its config.json (the step of its saved model) or in its name
    shows in the playground as text and never runs."""
    import json
    import shutil

    folder = tmp_path / "<img src=x onerror=\"document.title='name'\">"
    shutil.copytree(trained_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["info"]["step"] = "<img src=x onerror=\"document.title='step'\">"
    (folder / "config.json").write_text(json.dumps(config))
    srv = start_server(folder)
    try:
        browser.get(srv.url + "/")
        WebDriverWait(browser, 60).until(lambda b: "parameters" in b.find_element(By.ID, "model-info").text)
        info = browser.find_element(By.ID, "model-info")
        time.sleep(0.3)  # an image that fails to load would have fired its onerror by now
        assert browser.title not in ("name", "step")
        assert info.find_elements(By.TAG_NAME, "img") == []
        assert "onerror=\"document.title='step'\"" in info.text and "<img src=x" in info.text
    finally:
        srv.kill()
