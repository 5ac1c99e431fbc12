"""The page at `/`, driven in headless Chromium (Debian's chromium + chromium-driver).

.ci/run installs both where they are missing. The test types a prompt, asks for
a seeded sample, waits for the streamed text and checks it against /predict;
the screenshot is saved in the test's temp folder.
"""

from __future__ import annotations

import json
import shutil

import pytest
from serve_helpers import free_port, make_job_dir, request, start_server, stop, wait_ready

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver "
                    "are not installed (.ci/run installs them: apt-get install -y chromium "
                    "chromium-driver)")
def test_page_streams_a_sample_in_chromium(tmp_path):
    job_dir = str(tmp_path / "job")
    make_job_dir(job_dir, str(tmp_path / "staging"))
    port = free_port()
    proc = start_server([f"--model_dir={job_dir}", f"--port={port}", "--host=127.0.0.1",
                         "--max_batch=2", "--block=16"])
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    browser = None
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/health")
        browser = webdriver.Chrome(options=options,
                                   service=webdriver.ChromeService(executable_path=DRIVER))
        browser.set_page_load_timeout(60)
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 90)
        wait.until(lambda b: "val_loss 1.8765" in b.find_element(By.ID, "model").text)
        assert "2 x LSTM(16)" in browser.find_element(By.ID, "model").text
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("the quick brown fox")
        for field, value in (("length", "150"), ("seed", "7"), ("temperature", "0.9")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith(("done", "error")))
        status = browser.find_element(By.ID, "status").text
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert status.startswith("done: 150 chars"), status
        shown = browser.execute_script("return document.getElementById('text').textContent")
        code, body = request(f"http://127.0.0.1:{port}/predict", {"instances": [
            {"prompt": "the quick brown fox", "length": 150, "seed": 7, "temperature": 0.9}]})
        assert code == 200
        assert shown == json.loads(body)["predictions"][0]["text"]
        assert (tmp_path / "page.png").stat().st_size > 10_000

        # A prompt with a character the model lacks shows the server's one-line error.
        prompt.clear()
        prompt.send_keys("the # sign")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("error"))
        assert "'#'" in browser.find_element(By.ID, "status").text
    finally:
        if browser is not None:
            browser.quit()
        stop(proc)
