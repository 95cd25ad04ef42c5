"""The rating page driven in a real headless Chromium (Debian's chromium + chromium-driver,
which `.ci/run` installs): two raters calibrate and score a small set by clicking (and one by a
key), one stops and resumes, one changes a score; the stored ratings, the MOS and its interval
are then exactly what those clicks imply, and no page the browser loaded names a method.

Set SRGAN_RATING_SCREENSHOT=path.png to keep a screenshot of the rating page.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.rating_project import METHOD_WORDS, make_project, rating_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser() -> Iterator[object]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install -y chromium "
                    "chromium-driver (the README's test command and .ci/run do it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="srgan-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,900",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Rater:
    """One person at the browser: what they clicked, per display id, and every page seen."""

    def __init__(self, driver: object, link: str) -> None:
        self.driver, self.link = driver, link
        self.clicks: dict[str, int] = {}
        self.pages: list[str] = []

    def open(self, url: str) -> None:
        self.driver.get(url)  # type: ignore[attr-defined]
        self._seen()

    def _seen(self) -> None:
        from selenium.webdriver.common.by import By

        self.pages.append(self.driver.page_source)  # type: ignore[attr-defined]
        for img in self.driver.find_elements(By.TAG_NAME, "img"):  # type: ignore[attr-defined]
            assert self.driver.execute_script(  # type: ignore[attr-defined]
                "return arguments[0].complete && arguments[0].naturalWidth > 0", img)
            assert re.fullmatch(r".*/img/[A-Za-z0-9_-]{24}", img.get_attribute("src"))

    def calibrate(self) -> None:
        from selenium.webdriver.common.by import By

        self.open(self.link)
        assert "what the scores mean" in self.driver.page_source  # type: ignore[attr-defined]
        self._go(lambda: self.driver.find_element(By.ID, "start").click())  # type: ignore[attr-defined]

    def display(self) -> str:
        return self.driver.page_source.split('const display = "', 1)[1].split('"', 1)[0]  # type: ignore[attr-defined]

    def position(self) -> int:
        from selenium.webdriver.common.by import By

        text = self.driver.find_element(By.ID, "progress").text  # type: ignore[attr-defined]
        return int(text.split()[1])

    def _go(self, action: object) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        # A mark on this document's window: gone once the browser has loaded the next page.
        self.driver.execute_script("window.__srganOld = true")  # type: ignore[attr-defined]
        action()  # type: ignore[operator]
        WebDriverWait(self.driver, 15).until(lambda d: d.execute_script(
            "return window.__srganOld === undefined && document.readyState === 'complete'"))
        self._seen()

    def score(self, value: int, key: bool = False) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        shown = self.display()
        if key:
            self._go(lambda: ActionChains(self.driver).send_keys(str(value)).perform())
        else:
            self._go(lambda: self.driver.find_element(By.ID, f"score-{value}").click())  # type: ignore[attr-defined]
        self.clicks[shown] = value

    def done(self) -> bool:
        return "All done" in self.driver.page_source  # type: ignore[attr-defined]


def _stored(db: Path) -> dict[tuple[str, str, str, str, int], int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT r.name, s.set_name, s.image, s.method, s.repeat, s.score "
                            "FROM ratings s JOIN raters r USING (rater_id)").fetchall()
    return {tuple(row[:5]): row[5] for row in rows}  # type: ignore[misc]


def _implied(db: Path, raters: dict[str, Rater]) -> dict[tuple[str, str, str, str, int], int]:
    """The ratings the clicks imply: each clicked display's version, the last click winning."""
    with sqlite3.connect(db) as conn:
        shown = {row[0]: row[1:] for row in conn.execute(
            "SELECT display_id, set_name, image, method, repeat, shown_at FROM displays")}
    out: dict[tuple[str, str, str, str, int], tuple[str, int]] = {}
    for name, rater in raters.items():
        for display, score in rater.clicks.items():
            set_name, image, method, repeat, at = shown[display]
            key = (name, set_name, image, method, repeat)
            if key not in out or out[key][0] < at:
                out[key] = (at, score)
    return {k: v[1] for k, v in out.items()}


def test_two_raters_score_by_clicking_and_the_mos_is_what_the_clicks_imply(
        tmp_path: Path, browser: object) -> None:
    root = make_project(tmp_path / "proj")
    db = root / "ratings" / "ratings.sqlite"
    with rating_server(root, ["alice", "bob"]) as (base, links, _):
        alice, bob = Rater(browser, links["alice"]), Rater(browser, links["bob"])
        # alice: calibrates, scores 5 images (the third by key), stops, comes back later.
        alice.calibrate()
        total = int(browser.find_element("id", "progress").text.split()[-1])  # type: ignore[attr-defined]
        assert total == 12  # 2 images x 5 versions, and ceil(0.2 x 10) of them twice
        for i in range(5):
            assert alice.position() == i + 1
            alice.score(i % 5 + 1, key=(i == 2))
        from selenium.webdriver.common.by import By

        alice._go(lambda: browser.find_element(By.ID, "stop").click())  # type: ignore[attr-defined]
        assert "come back any time" in browser.page_source  # type: ignore[attr-defined]
        assert len(_stored(db)) == 5
        # bob, meanwhile: calibrates, scores everything, changes one score on the way.
        bob.calibrate()
        while not bob.done():
            position = bob.position()
            bob.score((position * 2) % 5 + 1)
            if position == 4:
                bob._go(lambda: browser.find_element(By.ID, "change-last").click())  # type: ignore[attr-defined]
                assert "replaces the earlier one" in browser.page_source  # type: ignore[attr-defined]
                if os.environ.get("SRGAN_RATING_SCREENSHOT"):
                    browser.save_screenshot(os.environ["SRGAN_RATING_SCREENSHOT"])  # type: ignore[attr-defined]
                bob.score(5 if (position * 2) % 5 + 1 != 5 else 1)
        # alice resumes where she stopped: image 6 of 12.
        alice.open(alice.link)
        assert alice.position() == 6
        while not alice.done():
            alice.score(alice.position() % 5 + 1)

    stored = _stored(db)
    assert stored == _implied(db, {"alice": alice, "bob": bob})
    assert len(stored) == 24
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT SUM(revisions) FROM ratings").fetchone()[0] == 1
    for page in alice.pages + bob.pages:
        assert METHOD_WORDS.search(page) is None, METHOD_WORDS.search(page)

    # MOS and its interval: both raters scored every version once (balanced), so the
    # rater-clustered interval is the t-interval of the two raters' means.
    out = subprocess.run([sys.executable, "-m", "srcore.cli", "mos"], cwd=root,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for method in ("nearest", "bicubic", "srresnet", "srgan", "hr"):
        per_rater = [np.mean([s for (r, _, _, m, rep), s in stored.items()
                              if r == who and m == method and rep == 0])
                     for who in ("alice", "bob")]
        mean = float(np.mean(per_rater))
        half = stats.t.ppf(0.975, 1) * stats.sem(per_rater)  # 0 when both means agree
        row = f"| te | {method} | {mean:.2f} | {mean - half:.2f} - {mean + half:.2f} | 2 | 4 |"
        assert row in out, (row, out)
    assert "Test-retest" in out and "| all | 4 |" in out


def test_ci_runs_exactly_the_readmes_test_command_which_installs_the_browser() -> None:
    from tests.conftest import REPO

    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (REPO / "README.md").read_text().splitlines()
    assert ci in readme
    assert "apt-get install -y -qq chromium chromium-driver" in ci
    assert ci.startswith("(test -x /usr/bin/chromium -a -x /usr/bin/chromedriver ||")
    assert ci.endswith(".venv/bin/python -m pytest")
