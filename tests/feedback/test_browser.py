"""The rating page in a real headless browser (Debian's chromium + chromedriver, driven by selenium) against a real
server (uvicorn on a local port): it loads, its images render, a click and a keyboard shortcut each record a vote
that lands in the SQLite file, the progress count moves, and a favourite from the gallery is recorded."""

import os
import shutil
import tempfile

import pytest

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
  message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)"
  if os.environ.get("SD_JAX_REQUIRE_BROWSER") == "1":  # CI: a missing browser fails rather than skips
    raise RuntimeError(message)
  pytest.skip(message, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from sd_jax.feedback import server  # noqa: E402
from sd_jax.feedback import store as store_lib  # noqa: E402
from tests import helpers  # noqa: E402
from tests.feedback import test_gallery  # noqa: E402


@pytest.fixture
def served(tmp_path):
  store = store_lib.FeedbackStore(tmp_path / "feedback.sqlite")
  test_gallery.fill(store)
  with helpers.serving(server.create_app(store, token="tok")) as url:
    yield store, f"{url}/?token=tok&rater=ann"


@pytest.fixture
def browser():
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  profile = tempfile.mkdtemp(prefix="sd_jax_chromium_")
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
  yield driver
  driver.quit()
  shutil.rmtree(profile, ignore_errors=True)


def _votes(store):
  return store_lib.FeedbackStore(store.path).votes()


def test_the_page_records_clicks_keys_and_favourites(served, browser):
  store, url = served
  wait = WebDriverWait(browser, 20)
  browser.get(url)
  wait.until(lambda d: d.find_element(By.ID, "prompt").text in test_gallery.PROMPTS)
  # The images render (decoded by the browser, not just requested).
  wait.until(lambda d: d.execute_script(
      "return ['img-a', 'img-b'].every(id => document.getElementById(id).naturalWidth === 8)"))
  # The progress line is filled by its own request after the pair is shown: waited for, not read at once.
  wait.until(lambda d: d.find_element(By.ID, "progress").text.startswith("0 rated by you"))
  first = (int(browser.find_element(By.ID, "img-a").get_attribute("data-id")),
           int(browser.find_element(By.ID, "img-b").get_attribute("data-id")))
  browser.find_element(By.ID, "fig-a").click()
  wait.until(lambda d: len(_votes(store)) == 1)
  vote = _votes(store)[0]
  assert (vote.image_a, vote.image_b, vote.choice, vote.rater) == (*first, "a", "ann")
  wait.until(lambda d: d.find_element(By.ID, "progress").text.startswith("1 rated by you"))
  # A keyboard shortcut on the next pair: "2" prefers the second image.
  wait.until(lambda d: int(d.find_element(By.ID, "img-a").get_attribute("data-id") or -1) != first[0] or
             int(d.find_element(By.ID, "img-b").get_attribute("data-id") or -1) != first[1])
  second = (int(browser.find_element(By.ID, "img-a").get_attribute("data-id")),
            int(browser.find_element(By.ID, "img-b").get_attribute("data-id")))
  browser.find_element(By.TAG_NAME, "body").send_keys("2")
  wait.until(lambda d: len(_votes(store)) == 2)
  assert (_votes(store)[1].image_a, _votes(store)[1].image_b, _votes(store)[1].choice) == (*second, "b")
  wait.until(lambda d: d.find_element(By.ID, "progress").text.startswith("2 rated by you"))
  # The gallery: a click favourites an image.
  browser.find_element(By.ID, "show-gallery").click()
  wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid figure")) == 9)
  figure = browser.find_elements(By.CSS_SELECTOR, "#grid figure")[4]
  figure.click()
  wait.until(lambda d: store_lib.FeedbackStore(store.path).favourites("ann") == [int(figure.get_attribute("data-id"))])
  # The page marks the figure when the server's answer arrives, which can be after the store has the favourite.
  wait.until(lambda d: "fav" in figure.get_attribute("class"))
