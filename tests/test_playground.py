"""The playground page (`GET /`, `server/static`) in a real browser: Debian's chromium driven by Playwright (no
browser download), against a real uvicorn server on 127.0.0.1. Screenshots go to pytest's tmp_path; with
PLAYGROUND_SCREENSHOT=docs/playground.png the README's screenshot (compare mode on shapes-flux) is written too."""

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import LiveServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "playground-key"
TINY = [{"id": "tiny-flux", "source": "tiny-flux"}, {"id": "tiny-wan", "source": "tiny-wan"}]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = "chromium is missing: install Debian's chromium (scripts/setup.sh does, as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    with LiveServer(models=TINY, warmup=False) as live:
        yield live


def open_page(browser, url: str):
    """A page on `url`/, recording every request URL it makes."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    assert page.goto(url + "/").status == 200
    return page


def only_own_origin(page, url: str) -> None:
    """Every request went to the server (data: and blob: URLs are the page's own decoded results)."""
    foreign = [u for u in page.requests if not (u.startswith(url + "/") or u.startswith(("data:", "blob:")))]
    assert not foreign, foreign
    assert not page.errors, page.errors


def set_image_fields(page, model: str, size: int, steps: int) -> None:
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.select_option("#model", model)
    page.fill("#width", str(size))
    page.fill("#height", str(size))
    page.fill("#num_inference_steps", str(steps))
    page.fill("#seed", "7")


def image_size(page, selector: str) -> tuple[int, int]:
    """The natural size of a decoded image (decode() rejects an image that is not one)."""
    return tuple(page.eval_on_selector(
        selector, "async img => { await img.decode(); return [img.naturalWidth, img.naturalHeight]; }"))


def test_generate_compare_and_field_errors(browser, server, tmp_path):
    page = open_page(browser, server.url)
    set_image_fields(page, "tiny-flux", 64, 4)
    page.fill("#prompt", "a red circle on the left")
    page.click("#generate")
    page.wait_for_selector("#pane-accel img")
    assert image_size(page, "#pane-accel img") == (64, 64)
    page.screenshot(path=tmp_path / "generate.png")

    # a knob: first-block cache with a high threshold, then compare with the baseline
    page.check("#use-fbcache")
    page.fill("#knob-fbcache-threshold", "0.5")
    page.click("#compare")
    page.wait_for_function("document.getElementById('status').textContent === 'done'")
    assert image_size(page, "#pane-baseline img") == (64, 64)
    assert image_size(page, "#pane-accel img") == (64, 64)
    assert page.inner_text("#stat-speedup").endswith("×")
    assert page.inner_text("#stat-psnr") and page.inner_text("#stat-ssim")
    assert page.inner_text("#stat-fraction").endswith("%")
    assert page.is_visible("#diff")
    page.screenshot(path=tmp_path / "compare.png")

    # a bad size: the server's message appears next to the size fields
    page.fill("#width", "63")
    page.click("#generate")
    page.wait_for_function("document.querySelector('.error[data-for=size]').textContent.includes('multiple')")
    assert "invalid" in page.get_attribute("#width", "class")
    page.screenshot(path=tmp_path / "bad_size.png")
    only_own_origin(page, server.url)


def test_busy_shows_retry_after(browser, server, tmp_path):
    """A 429 (faked at the browser: a real one needs a full queue at the right moment) reads as busy."""
    page = open_page(browser, server.url)
    set_image_fields(page, "tiny-flux", 64, 2)
    page.route("**/v1/images/generations", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "7", "Content-Type": "application/json"},
        body='{"error": {"message": "the queue is full; retry later", "type": "rate_limit_error"}}'))
    page.click("#generate")
    page.wait_for_function("document.querySelector('.error[data-for=general]').textContent.includes('retry in 7 s')")
    only_own_origin(page, server.url)


def test_video_progress_and_cancel(browser, server, tmp_path):
    page = open_page(browser, server.url)
    set_image_fields(page, "tiny-wan", 64, 100)
    page.click("#compare")
    page.wait_for_function("document.getElementById('progress').value > 0")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent === 'cancelled'")
    page.wait_for_function("!document.getElementById('generate').disabled")
    jobs = httpx.get(server.url + "/v1/videos", timeout=10).json()["data"]
    assert all(job["status"] != "in_progress" for job in jobs), jobs  # the cancelled job is deleted

    page.fill("#num_inference_steps", "2")
    page.click("#compare")
    page.wait_for_function("document.getElementById('status').textContent === 'done'")
    assert page.locator("#results video").count() == 2
    assert page.inner_text("#stat-speedup").endswith("×")
    page.screenshot(path=tmp_path / "video.png")
    only_own_origin(page, server.url)


def test_api_key_asked_for_and_used(browser, tmp_path):
    with LiveServer(models=TINY[:1], warmup=False, api_keys=[KEY]) as live:
        page = open_page(browser, live.url)  # the page itself is public
        page.wait_for_function("document.querySelector('.error[data-for=\"api-key\"]').textContent.includes('API key')")
        page.screenshot(path=tmp_path / "auth.png")
        page.fill("#api-key", KEY)
        page.click("#key-apply")
        set_image_fields(page, "tiny-flux", 64, 2)
        page.click("#generate")
        page.wait_for_selector("#pane-accel img")
        assert image_size(page, "#pane-accel img") == (64, 64)
        assert httpx.get(live.url + "/v1/models", timeout=10).status_code == 401
        only_own_origin(page, live.url)


@pytest.mark.skipif(not os.environ.get("PLAYGROUND_SCREENSHOT"), reason="set PLAYGROUND_SCREENSHOT=docs/playground.png")
def test_readme_screenshot(browser):
    """Compare mode on shapes-flux (28 steps) with the `balanced` preset, for the README (warmed up first, so the
    baseline's time is not the first call's)."""
    with LiveServer(models=[{"id": "shapes-flux", "source": "shapes-flux"}]) as live:
        page = open_page(browser, live.url)
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.select_option("#preset", "balanced")
        page.fill("#seed", "3")
        page.click("#compare")
        page.wait_for_function("document.getElementById('status').textContent === 'done'")
        page.screenshot(path=os.environ["PLAYGROUND_SCREENSHOT"], full_page=True)
        only_own_origin(page, live.url)
