"""The status page on the admin port, in a real headless Chromium (Debian's
chromium and chromium-driver, driven by Selenium): it loads with no
console errors and no policy violations, shows the modules and a non-zero
rate under load, prints markup it is given as text, and shows no secret.
A screenshot is saved as a test artifact (target/test-artifacts/)."""
import os
import shutil
import time

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from conftest import Berth, Load, http, wasm

SECRET = "s3cr3t-value-never-shown"
# Module names may only hold letters, digits, `-` and `_` (the config
# refuses anything else), so the markup comes in through what an operator
# or a broken deployment can put in: a route, and a file name that shows
# up in a load error.
ROUTE_MARKUP = "/x<b>bold</b>"
FILE_MARKUP = '<img src=x onerror="document.title=1">.wasm'


@pytest.fixture
def browser():
    options = Options()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_status_page_shows_modules_and_live_rates_as_text(browser, artifacts, tmp_path):
    broken = tmp_path / FILE_MARKUP
    broken.write_bytes(b"not wasm")
    berth = Berth(f"""
[runtime]
cache_dir = ""
watch = false
[modules.shop]
file = "{wasm('swap_v1')}"
route = "{ROUTE_MARKUP}"
secrets = {{ api_key = "{SECRET}" }}
[modules.shop.canary]
file = "{wasm('swap_v2')}"
steps = [30]
interval = "1h"
[modules.hello]
file = "{wasm('swap_v1')}"
route = "/hello"
""").wait_ready()
    try:
        # A reload that fails on a file whose name is markup.
        with open(berth.config, "a") as f:
            f.write(f"[modules.broken]\nfile = '{broken}'\nroute = \"/broken\"\n")
        assert berth.reload()[0] == 422
        load = Load([[f"{berth.url}/hello"]] * 2, limit=60)
        try:
            # Two samples of the counts, two seconds apart, under load.
            time.sleep(5)
            browser.get(berth.admin + "/")
            rows = browser.find_elements(By.CSS_SELECTOR, "tbody tr")
            text = browser.find_element(By.TAG_NAME, "body").text
            hello = next(r for r in rows if r.text.startswith("hello"))
            rate = float(hello.find_elements(By.TAG_NAME, "td")[8].text)
            browser.save_screenshot(os.path.join(artifacts, "status-page.png"))
        finally:
            load.stop()
        assert browser.title == "Berth status"
        assert rate > 0, hello.text
        for want in ("shop", "hello", "broken", "ready", "canary (30 %)", "wasi:http@0.2", "not serving"):
            assert want in text, f"{want!r} missing from the page:\n{text}"
        # Markup is text: shown literally, and no element was made of it.
        assert ROUTE_MARKUP in text
        assert FILE_MARKUP in text
        assert not browser.find_elements(By.CSS_SELECTOR, "tbody b, tbody img")
        assert SECRET not in browser.page_source
        # No console errors, and no Content-Security-Policy violations
        # (the style sheet loads under `default-src 'none'`).
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        background = browser.find_element(By.TAG_NAME, "th").value_of_css_property("background-color")
        assert background == "rgba(238, 242, 246, 1)", "the style sheet did not apply"
        # The page refreshes itself, without scripts.
        refresh = browser.find_element(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]')
        assert refresh.get_attribute("content") == "5"
        assert not browser.find_elements(By.TAG_NAME, "script")
        status, _ = http(berth.admin + "/")
        assert status == 200
    finally:
        berth.stop()


def test_the_page_is_served_under_a_strict_policy():
    berth = Berth(f'[runtime]\ncache_dir = ""\n[modules.hello]\nfile = "{wasm("swap_v1")}"\nroute = "/"\n').wait_ready()
    try:
        import urllib.request

        with urllib.request.urlopen(berth.admin + "/", timeout=10) as r:
            csp = r.headers["Content-Security-Policy"]
            assert r.headers["Content-Type"] == "text/html; charset=utf-8"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert "default-src 'none'" in csp and "script-src" not in csp, csp
        assert "frame-ancestors 'none'" in csp
        status, css = http(berth.admin + "/status.css")
        assert status == 200 and "table{" in css
        # Only GET and HEAD.
        assert http(berth.admin + "/", data=b"")[0] == 405
    finally:
        berth.stop()
