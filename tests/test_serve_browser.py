"""The playground in a real headless browser: Debian's chromium driven by Playwright (no downloaded browser).

`bash scripts/install_browser.sh` installs chromium; without /usr/bin/chromium this test skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from minilm.serve import create_app, serve_in_thread

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions"]

# Every change to the completion span, recorded in the page, to show text arrived in several steps.
WATCH = """() => {
  window.__updates = [];
  new MutationObserver(() => window.__updates.push(document.getElementById('completion').textContent))
    .observe(document.getElementById('completion'), {childList: true, characterData: true, subtree: true});
}"""


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} not found; run `bash scripts/install_browser.sh` (Debian's chromium)")
def test_playground_streams_tokens_in_a_real_browser(tiny_run):
    sync_api = pytest.importorskip("playwright.sync_api")
    prompt, seed, n = "def main():\n    ", 5, 64
    app = create_app(tiny_run, max_concurrency=1, max_new_tokens_cap=128)
    with serve_in_thread(app) as base, sync_api.sync_playwright() as p:
        expected = httpx.post(f"{base}/v1/generate", timeout=60, json={
            "prompt": prompt, "max_new_tokens": n, "temperature": 0.8, "top_k": 50, "seed": seed}).json()["text"]
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            outside = []
            page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model-info').textContent.includes('params')")
            page.fill("#prompt", prompt)
            page.fill("#max_new_tokens", str(n))
            page.fill("#temperature", "0.8")
            page.fill("#top_k", "50")
            page.fill("#seed", str(seed))
            page.evaluate(WATCH)
            page.click("#generate")
            page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s')",
                                   timeout=60_000)
            shown = page.text_content("#completion")
            updates = page.evaluate("window.__updates")
            error = page.text_content("#error")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve_playground.png"), full_page=True)
        finally:
            browser.close()
    assert error == ""
    assert shown == expected and shown  # the same text the API gives for these settings
    assert len(updates) > 1 and updates[-1] == shown  # it arrived in pieces, not all at once
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:]))  # each piece extends the text
    assert outside == []  # no CDN or other outside request: the page works offline
    assert (ARTIFACTS / "serve_playground.png").stat().st_size > 0
