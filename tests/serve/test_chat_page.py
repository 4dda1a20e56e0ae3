"""The chat page at / in a real headless Chromium (Debian's chromium, driven by Playwright;
never `playwright install`): a typed message streams tokens into the reply, stop aborts a
running reply and frees the server's slot, the model's name comes from /v1/models, and the
API key box appears when the server needs a key. Skipped without chromium or playwright,
unless LLAMAWORKS_REQUIRE_BROWSER=1 (CI), which fails instead."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from .conftest import MODEL, running_server

CHROMIUM = os.environ.get("LLAMAWORKS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def _browser_or_skip():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing, sync_playwright = "the playwright package is not installed (pip install playwright)", None
    if missing is None and not os.path.exists(CHROMIUM):
        missing = "Debian's chromium is not installed (apt-get install -y chromium)"
    if missing:
        if os.environ.get("LLAMAWORKS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LLAMAWORKS_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        # A persistent context is how a user-data-dir is given: a fresh one per run.
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture()
def page(browser):
    page = browser.new_page()
    page.set_default_timeout(30_000)
    yield page
    page.close()


def test_conversation_streams_and_stop_works(tiny_model_dir, page):
    # 40 ms a forward: a reply of 200 tokens streams for seconds, long enough to watch and stop.
    with running_server(tiny_model_dir, max_batch=2, delay=0.04) as s:
        page.goto(s.url + "/")
        page.wait_for_function("(m) => document.getElementById('model').textContent === m", arg=MODEL)
        assert not page.is_visible("#api-key-row")  # this server needs no key
        page.fill("#system", "You are terse.")
        page.fill("#max-tokens", "200")
        page.fill("#input", "Hello there")
        page.click("#send")
        page.wait_for_selector("#messages li.user")
        assert page.inner_text("#messages li.user") == "Hello there"
        reply = page.locator("#messages li.assistant").first
        # Streamed: text appears while the reply is still running (the stop button is live).
        page.wait_for_function("document.querySelector('#messages li.assistant').textContent.length > 0")
        first = reply.inner_text()
        assert page.is_enabled("#stop") and "streaming" in reply.get_attribute("class")
        page.wait_for_function("(n) => document.querySelector('#messages li.assistant').textContent.length > n",
                               arg=len(first))
        assert s.engine.active == 1
        page.click("#stop")
        page.wait_for_selector("#messages li.assistant[data-done='true']")
        assert "(stopped)" in reply.inner_text()
        assert page.is_enabled("#send") and not page.is_enabled("#stop")
        deadline = time.monotonic() + 10
        while s.engine.active:  # the aborted fetch closed the connection: the slot is freed
            assert time.monotonic() < deadline, "the stopped request kept its slot"
            time.sleep(0.02)
        assert s.engine.metrics.finished["cancelled"] == 1
        # The conversation goes on, and the stopped reply is part of it.
        page.fill("#max-tokens", "3")
        page.fill("#input", "And again")
        page.click("#send")
        page.wait_for_selector("#messages li.assistant:nth-of-type(4)[data-done='true']")
        assert page.locator("#messages li.error").count() == 0


def test_api_key_box(tiny_model_dir, page):
    with running_server(tiny_model_dir, max_batch=1, api_key="sk-page") as s:
        page.goto(s.url + "/")
        page.wait_for_selector("#api-key-row:not([hidden])")
        assert page.is_visible("#api-key")
        page.wait_for_function("document.getElementById('model').textContent === 'API key needed'")
        page.fill("#api-key", "sk-page")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("(m) => document.getElementById('model').textContent === m", arg=MODEL)
        page.fill("#max-tokens", "3")
        page.fill("#input", "hi")
        page.click("#send")
        page.wait_for_selector("#messages li.assistant[data-done='true']")
        assert page.locator("#messages li.error").count() == 0
