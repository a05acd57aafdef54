"""The review page in a real browser: headless Chromium rates images with clicks and keys, and the ratings
land in feedback.sqlite. Needs Debian's `chromium` and `chromium-driver` and pip `selenium` (the dev extra)."""

import sqlite3
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f"the browser test needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[dev]' (selenium) for the browser test")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture()
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    # Offline machine: without these Chromium waits on background connections (updates, sync, QUIC probes).
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))  # the system driver: no download
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def rows(run, sql):
    with sqlite3.connect(run / "feedback.sqlite") as con:
        return con.execute(sql).fetchall()


@pytest.mark.timeout(90)  # a browser that hangs fails here, not at the suite's 600 s limit
def test_rate_with_clicks_and_keys(browser, server, fake_run, http):
    wait = WebDriverWait(browser, 10)
    progress = lambda: browser.find_element(By.ID, "progress").text  # noqa: E731
    browser.get(server.url)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == 6)
    assert progress() == "0 of 6 rated · 0 favourites · 0 rejected · 0 of 7 pairs compared"
    first = browser.find_element(By.CSS_SELECTOR, '.card[data-path="samples/step-000100/0-1.png"]')
    assert "a photo of ohwx person" in first.text and "seed 1 · LoRA 1 · step-000100 · 4 steps" in first.text

    # Grid: a click, then keys (move right, reject, favourite, neutral; each rating moves to the next card).
    first.find_element(By.CSS_SELECTOR, ".fav").click()
    wait.until(lambda d: progress().startswith("1 of 6 rated"))
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT, "x", "f", "n").perform()
    wait.until(lambda d: progress().startswith("4 of 6 rated · 2 favourites · 1 rejected"))
    # The grid groups images by prompt: all of the first prompt's images, then the second's.
    assert rows(fake_run, "SELECT image, verdict FROM ratings ORDER BY id") == [
        ("samples/step-000100/0-1.png", "favourite"), ("samples/step-000100/0-2.png", "reject"),
        ("samples/step-000200/0-1.png", "favourite"), ("gallery/20250101-120000/p01/scale-0_8-seed1.png", "neutral")]
    assert "favourite" in first.get_attribute("class")
    assert "focus" in browser.find_element(By.CSS_SELECTOR, '.card[data-path="samples/step-000100/1-1.png"]'
                                           ).get_attribute("class")

    # Pairs: a key for the left image, a click for the right one, then a tie.
    ActionChains(browser).send_keys("p").perform()
    chosen = []
    for n, how in enumerate([lambda: ActionChains(browser).send_keys(Keys.ARROW_LEFT).perform(),
                             lambda: browser.find_element(By.ID, "choose-b").click(),
                             lambda: ActionChains(browser).send_keys("=").perform()], start=1):
        wait.until(lambda d: d.find_element(By.ID, "side-a").get_attribute("data-path")
                   and f"{n - 1} of 7 pairs compared" in progress())
        pair = [browser.find_element(By.ID, side).get_attribute("data-path") for side in ("side-a", "side-b")]
        prompt = browser.find_element(By.ID, "pair-prompt").text
        assert prompt in ("a photo of ohwx person", "a portrait of ohwx person as an astronaut, oil painting")
        chosen.append(pair)
        how()
    wait.until(lambda d: "3 of 7 pairs compared" in progress())
    assert rows(fake_run, "SELECT a_image, b_image, winner FROM comparisons ORDER BY id") == [
        (*chosen[0], "a"), (*chosen[1], "b"), (*chosen[2], "tie")]
    assert browser.find_element(By.ID, "status").get_attribute("class") != "error"

    # Traversal from the browser's side: an encoded `..` reaches the server and is refused.
    browser.get(server.url + "img/..%2f..%2f..%2f..%2fetc%2fpasswd")
    assert "root:" not in browser.page_source and "only the run's samples/ and gallery/" in browser.page_source
    for path in ("/../../etc/passwd", "/img/../../../../etc/passwd"):
        assert http(server.url, "GET", path)[0] in (403, 404)
