"""The playground in a real headless browser: Debian's chromium driven by Playwright (no downloaded browser).

`bash scripts/install_browser.sh` installs chromium; without /usr/bin/chromium these tests skip.
"""

from __future__ import annotations

import colorsys
import math
import os
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer

from minilm.serve import create_app, serve_in_thread
from minilm.serve.completions import TokenText

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not found; run "
                                "`bash scripts/install_browser.sh` (Debian's chromium)")

# Every change to the completion span, recorded in the page, to show text arrived in several steps. One entry per
# mutation record, not per callback: a fast server's events can land in one network read, and the browser then
# hands all of that task's mutations to a single callback.
WATCH = """() => {
  window.__updates = [];
  new MutationObserver(records => records.forEach(
      () => window.__updates.push(document.getElementById('completion').textContent)))
    .observe(document.getElementById('completion'), {childList: true, characterData: true, subtree: true});
}"""

# Each token span of the output: its text, the token string and logprob it carries, its computed background.
SPANS = """els => els.map(e => ({text: e.textContent, token: e.dataset.token, logprob: e.dataset.logprob,
  unscored: e.classList.contains('unscored'), background: getComputedStyle(e).backgroundColor}))"""

# The popup as shown: whether it is visible, its first line, its entries (token, p, marked chosen) and its note.
POPUP = """() => {
  const pop = document.getElementById('popup');
  return {visible: !pop.hidden && pop.offsetParent !== null, head: pop.querySelector('p')?.textContent,
    text: pop.textContent, entries: [...pop.querySelectorAll('li')].map(li => ({token: li.dataset.token,
    p: Number(li.dataset.p), chosen: li.classList.contains('chosen')}))};
}"""


@contextmanager
def playground(run: Path):
    """(page, base url, requests that left the server): a fresh server and browser; outside requests are blocked."""
    from playwright.sync_api import sync_playwright

    app = create_app(run, max_concurrency=1, max_new_tokens_cap=128)
    with serve_in_thread(app) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            outside = []
            page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                       else route.abort())
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model-info').textContent.includes('params')")
            yield page, base, outside
        finally:
            browser.close()


def shown(token: str) -> str:
    """A token as the page writes it: spaces, newlines and tabs made visible."""
    return token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "(nothing)"


def hue(css_rgb: str) -> float:
    r, g, b = (int(x) / 255 for x in css_rgb[css_rgb.index("(") + 1:css_rgb.index(")")].split(",")[:3])
    return 360 * colorsys.rgb_to_hls(r, g, b)[0]


def check_colours(spans: list[dict]) -> None:
    """Each scored span's background is green (sure) to red (less sure) on the legend's log scale."""
    scored = sorted((float(s["logprob"]), hue(s["background"])) for s in spans if s["logprob"] is not None)
    for lp, h in scored:  # the legend: 0.1% or less at red (0), 1% a third of the way, 100% at green (120)
        assert h == pytest.approx(120 * min(1, max(0, 1 + lp / math.log(10) / 3)), abs=3), (lp, h)
    assert all(a[1] <= b[1] + 1.5 for a, b in zip(scored, scored[1:]))  # less probable is never greener
    assert scored[0][1] < scored[-1][1] - 10  # the least likely token sits visibly nearer the "less sure" end


def check_popup(popup: dict, token: str, logprob: float, top: dict) -> None:
    """The popup of one token against the API's top_logprobs for it: its five likeliest, the chosen one marked."""
    assert popup["visible"]
    assert popup["head"].startswith(shown(token) + ":")
    ranked = sorted(top.items(), key=lambda kv: -kv[1])[:5]
    assert [e["token"] for e in popup["entries"]] == [t for t, _ in ranked]
    assert [e["p"] for e in popup["entries"]] == pytest.approx([math.exp(v) for _, v in ranked], rel=1e-6)
    assert len(popup["entries"]) == 5 and sum(e["p"] for e in popup["entries"]) <= 1 + 1e-9
    in_top = token in dict(ranked)
    assert [e["token"] for e in popup["entries"] if e["chosen"]] == ([token] if in_top else [])
    assert ("not in the top 5" in popup["text"]) == (not in_top)
    assert top[token] == pytest.approx(logprob)


def test_playground_streams_tokens_in_a_real_browser(tiny_run):
    pytest.importorskip("playwright.sync_api")
    prompt, seed, n = "def main():\n    ", 5, 64
    with playground(tiny_run) as (page, base, outside):
        expected = httpx.post(f"{base}/v1/generate", timeout=60, json={
            "prompt": prompt, "max_new_tokens": n, "temperature": 0.8, "top_k": 50, "seed": seed}).json()["text"]
        page.fill("#prompt", prompt)
        page.fill("#max_new_tokens", str(n))
        page.fill("#temperature", "0.8")
        page.fill("#top_k", "50")
        page.fill("#seed", str(seed))
        page.evaluate(WATCH)
        page.click("#generate")
        page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s')", timeout=60_000)
        text = page.text_content("#completion")
        updates = page.evaluate("window.__updates")
        error = page.text_content("#error")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve_playground.png"), full_page=True)
    assert error == ""
    assert text == expected and text  # the same text the API gives for these settings
    assert len(updates) > 1 and updates[-1] == text  # it arrived in pieces, not all at once
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:]))  # each piece extends the text
    assert outside == []  # no CDN or other outside request: the page works offline
    assert (ARTIFACTS / "serve_playground.png").stat().st_size > 0


def test_token_view_colours_tokens_and_shows_alternatives(tiny_run):
    pytest.importorskip("playwright.sync_api")
    prompt, seed, n = "def main(args):\n    ", 3, 40
    with playground(tiny_run) as (page, base, outside):
        api = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": n, "temperature": 0.7, "seed": seed, "logprobs": 5}).json()
        lp = api["choices"][0]["logprobs"]
        page.check("#token-view")
        page.fill("#prompt", prompt)
        page.fill("#max_new_tokens", str(n))
        page.fill("#temperature", "0.7")
        page.fill("#seed", str(seed))
        page.evaluate(WATCH)
        page.click("#generate")
        page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s')", timeout=60_000)
        assert page.text_content("#error") == ""
        spans = page.eval_on_selector_all("#completion .tok", SPANS)
        updates = page.evaluate("window.__updates")
        legend = page.is_visible("#legend")

        hovered = []
        for i in range(len(spans)):  # hover (what a tap or a mouse does) over every token
            page.hover(f"#completion .tok:nth-child({i + 1})")
            hovered.append(page.evaluate(POPUP))
        page.mouse.move(1, 1)
        after_mouse = page.evaluate(POPUP)["visible"]

        page.focus("#score")  # the control before the output: Tab walks into the tokens
        keyboard = []
        for _ in range(2):
            page.keyboard.press("Tab")
            keyboard.append((page.evaluate("document.activeElement.dataset.token"), page.evaluate(POPUP)))
        page.keyboard.press("Escape")
        after_escape = page.evaluate(POPUP)["visible"]
        still_focused = page.evaluate("document.activeElement.classList.contains('tok')")
        page.keyboard.press("Shift+Tab")
        back = page.evaluate(POPUP)

    assert [s["token"] for s in spans] == lp["tokens"]  # one span per token the API returns
    assert "".join(s["text"] for s in spans) == api["choices"][0]["text"]
    assert [float(s["logprob"]) for s in spans] == pytest.approx(lp["token_logprobs"], rel=1e-6)
    assert len(updates) > 1  # still streamed: the spans arrived in pieces
    check_colours(spans)
    assert legend
    for i, popup in enumerate(hovered):
        check_popup(popup, lp["tokens"][i], lp["token_logprobs"][i], lp["top_logprobs"][i])
    assert any(e["chosen"] for p in hovered for e in p["entries"])  # some sampled token is among its top 5
    assert not after_mouse  # leaving the tokens closes the popup
    for i, (focused, popup) in enumerate(keyboard):
        assert focused == lp["tokens"][i]
        check_popup(popup, lp["tokens"][i], lp["token_logprobs"][i], lp["top_logprobs"][i])
    assert not after_escape and still_focused  # Escape closes the popup, focus stays on the token
    check_popup(back, lp["tokens"][0], lp["token_logprobs"][0], lp["top_logprobs"][0])
    assert outside == []


def test_score_mode_shows_each_prompt_token_and_its_surprise(tiny_run):
    pytest.importorskip("playwright.sync_api")
    text = "import os\nimport sys\n\n\ndef main():\n    # caf\u00e9 \u2713\n    return os.getcwd()\n"
    with playground(tiny_run) as (page, base, outside):
        api = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 5}).json()
        lp = api["choices"][0]["logprobs"]
        page.fill("#prompt", text)
        page.click("#score")
        page.wait_for_function("document.getElementById('stats').textContent.includes('perplexity')",
                               timeout=60_000)
        assert page.text_content("#error") == ""
        spans = page.eval_on_selector_all("#completion .tok", SPANS)
        shown_prompt = page.text_content("#shown-prompt")
        page.hover("#completion .tok:nth-child(1)")
        first = page.evaluate(POPUP)
        page.hover("#completion .tok:nth-child(2)")
        second = page.evaluate(POPUP)
        stats = page.text_content("#stats")

    tokenizer = Tokenizer.from_file(str(tiny_run / "tokenizer.json"))
    strings = TokenText(tokenizer).strings
    assert [s["token"] for s in spans] == [strings[i] for i in tokenizer.encode(text).ids]  # the prompt's tokens
    assert any(s.startswith("bytes:") for s in lp["tokens"])  # the test covers a token holding part of a character
    assert "".join(s["text"] for s in spans) == text and shown_prompt == ""
    assert spans[0]["unscored"] and spans[0]["logprob"] is None  # the first token has no logprob...
    assert first["visible"] and "no probability" in first["text"] and first["entries"] == []  # ...and says so
    assert not any(s["unscored"] for s in spans[1:])
    assert [float(s["logprob"]) for s in spans[1:]] == pytest.approx(lp["token_logprobs"][1:], rel=1e-6)
    check_colours(spans)
    check_popup(second, lp["tokens"][1], lp["token_logprobs"][1], lp["top_logprobs"][1])
    mean = -sum(lp["token_logprobs"][1:]) / (len(spans) - 1)
    assert f"perplexity {math.exp(mean):.2f}" in stats
    assert outside == []
