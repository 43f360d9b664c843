"""The playground page driven in headless Chromium: what its browser test and the screenshot
command (benchmarks/playground_screenshots.py) both do to it, as a person would (pick, type, click).

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (the [test] extra);
`find_browser` says which is missing. Selenium is imported here only, when a page is opened.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ANSWER_FIELDS = ("version", "alias", "answered-steps", "parameterization", "nelbo", "latency")


def find_browser() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or why the page cannot be driven here."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed: pip install -e .[test]"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        return "no Chromium here: apt-get install chromium chromium-driver (make test does it where apt works)"
    return chromium, driver


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class Playground:
    """One headless Chromium window on the page at `url`/. Panels are "a" and "b" (side by side)."""

    def __init__(self, url: str, width: int = 1400, height: int = 1100):
        found = find_browser()
        if isinstance(found, str):
            raise RuntimeError(found)
        from selenium import webdriver  # lazy: optional (the [test] extra), needed only to drive a page
        from selenium.webdriver.chrome.service import Service  # lazy: optional, as above

        os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
        options = webdriver.ChromeOptions()
        options.binary_location = found[0]
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}"):
            options.add_argument(flag)
        self.url = url.rstrip("/")
        self.driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)

    def close(self) -> None:
        self.driver.quit()

    def __enter__(self) -> Playground:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        """Load the page and wait until it has read /v1/models."""
        self.driver.get(self.url + "/")
        wait_until(lambda: self.driver.execute_script("return document.body.dataset.ready === 'true'"), 30,
                   "the page to start")

    def panel(self, key: str):
        return self.driver.find_element("css selector", f'[data-panel="{key}"]')

    def field(self, key: str, name: str):
        return self.panel(key).find_element("css selector", f'[data-role="{name}"]')

    def choose(self, key: str, model: str, steps: int | None = None) -> None:
        from selenium.webdriver.support.ui import Select  # lazy: optional, as above

        Select(self.field(key, "model")).select_by_value(model)
        if steps is not None:
            Select(self.field(key, "steps")).select_by_value(str(steps))

    def set_samples(self, num_samples: int, seed: int) -> None:
        self.driver.execute_script("document.getElementById('num-samples').value = arguments[0];"
                                   "document.getElementById('seed').value = arguments[1];", num_samples, seed)

    def compare(self, on: bool = True) -> None:
        box = self.driver.find_element("id", "compare")
        if box.is_selected() != on:
            box.click()

    def generate(self, *keys: str, timeout: float = 60) -> dict[str, str]:
        """Click Generate and wait for every panel in `keys`; their states ("done" or "error")."""
        keys = keys or ("a",)
        for key in keys:  # a state left by an earlier click must not count
            self.driver.execute_script("arguments[0].dataset.state = ''", self.panel(key))
        self.driver.find_element("id", "generate").click()
        states = lambda: {k: self.panel(k).get_attribute("data-state") for k in keys}  # noqa: E731
        wait_until(lambda: all(s in ("done", "error") for s in states().values())
                   and self.driver.find_element("id", "generate").is_enabled(), timeout,
                   f"panels {keys} to show an answer")
        return states()

    def shown(self, key: str) -> dict[str, str]:
        """What the panel shows of the answer: version, alias, T, forward, NELBO, latency."""
        return {name: self.field(key, name).text for name in ANSWER_FIELDS}

    def error(self, key: str) -> str:
        return self.field(key, "error").text

    def screenshot(self, path: Path) -> Path:
        """The whole page (the window grown to the page's height first)."""
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        width = self.driver.get_window_size()["width"]
        self.driver.set_window_size(width, max(600, int(height) + 40))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return Path(path)
