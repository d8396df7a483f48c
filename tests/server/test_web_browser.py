"""The chat page in a real headless Chromium (Debian's package, driven by Playwright) against real servers.

A `qwenkit serve` subprocess on a tiny random checkpoint covers the whole chat loop (stream, stop, regenerate,
edit, clear, reload), markup in user text, the API key and phone width; the real app on a scripted backend (it
forces exact output tokens, see server_support) covers what random weights cannot produce: model output with
markdown and HTML in it, a full server (429) and a context overflow.

No `playwright install`: the system browser is used (`apt-get install chromium`, which .ci/run does), found on
PATH or at $QWENKIT_CHROMIUM. Without Playwright or a browser the tests skip and say which is missing. Waits are
generous: the machine running CI may be loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from server_support import Running, ScriptedBackend, free_port, script, wait_healthy

from qwenkit import QWenTokenizer
from qwenkit.checkpoints.synthetic import make_checkpoint
from qwenkit.generation.sampling import OFFICIAL_GENERATION_CONFIG

# Chromium as root in a container: no sandbox; and nothing that reaches out to the network on its own.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
KEY = "web-test-key-42"
WAIT_MS = 90_000  # one reply on a loaded 2-core machine
XSS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> **not bold**'


def find_chromium() -> str | None:
    """The browser executable: $QWENKIT_CHROMIUM, else the first Chromium on PATH."""
    given = os.environ.get("QWENKIT_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _why_no_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    if find_chromium() is None:
        return "no Chromium found (apt-get install -y chromium, or set QWENKIT_CHROMIUM)"
    return None


pytestmark = pytest.mark.skipif(_why_no_browser() is not None, reason=f"no browser: {_why_no_browser()}")


@contextmanager
def serve(checkpoint: Path, log: Path, extra: Sequence[str] = ()) -> Iterator[Running]:
    """A real `qwenkit serve` subprocess on `checkpoint` (float32, CPU, 1 thread), stopped on exit."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "qwenkit", "serve", "-m", str(checkpoint), "--port", str(port),
        "--dtype", "float32", "--device", "cpu", "--threads", "1", *extra,
    ]  # fmt: skip
    with open(log, "wb") as out:
        # The page tests are about the page: the PyTorch kernels keep a first-use C++ build (the kernel tests' job)
        # out of their waits.
        env = {**os.environ, "QWENKIT_DISABLE_EXT": "1"}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield Running(url, log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("web") / "tiny", preset="tiny", dtype="float32", seed=0)


@pytest.fixture(scope="module")
def open_server(checkpoint: Path) -> Iterator[Running]:
    """No API key; room for a long reply to stop."""
    with serve(checkpoint, checkpoint.parent / "open.log", ["--max-model-len", "4096"]) as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(checkpoint: Path) -> Iterator[Running]:
    with serve(
        checkpoint, checkpoint.parent / "keyed.log", ["--api-key", KEY, "--max-model-len", "4096"]
    ) as s:
        yield s


@pytest.fixture(scope="module")
def scripted_server(tokenizer: QWenTokenizer) -> Iterator[Running]:
    """The real app on a scripted backend: one slot, no queue (a second request is a 429), 2048-token context,
    50 ms per decode step (a long script holds the slot for seconds)."""
    import uvicorn

    from qwenkit.server.app import Loaded, ServerOptions, create_app

    backend = ScriptedBackend(tokenizer, 1, 2048, delay=0.05)
    config = {**OFFICIAL_GENERATION_CONFIG, "do_sample": False}
    options = ServerOptions(model_name="scripted", max_concurrency=1, max_queue=0)
    app = create_app(options, lambda: Loaded(backend, tokenizer, config))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        wait_healthy(url)
        yield Running(url)
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (empty storage) at desktop size; fails the test on any page error or CSP
    violation it logs."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("console", lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None)
    yield pg
    context.close()
    assert not problems, problems


# ---- page helpers ------------------------------------------------------------------------------------------


def open_page(page, url: str, model: str) -> None:
    page.goto(url + "/")
    page.wait_for_function("m => document.getElementById('model-name').textContent === m", arg=model)


def set_max_tokens(page, n: int) -> None:
    if page.locator("#settings").is_hidden():
        page.click("#toggle-settings")
    page.fill("#max-tokens", str(n))


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page) -> None:
    """Until no reply is streaming (the Send button is back)."""
    page.wait_for_selector("#send:not([hidden])", state="attached")
    page.wait_for_function("() => document.getElementById('stop').hidden")


def assistant_texts(page) -> list[str]:
    return page.locator(".msg.assistant .body").all_inner_texts()


def not_pwned(page) -> None:
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator("#messages img, #messages script, #messages a[href^='javascript']").count() == 0


# ---- the real server ---------------------------------------------------------------------------------------


def test_chat_streams_stops_regenerates_edits_clears_and_survives_reload(page, open_server: Running) -> None:
    open_page(page, open_server.url, "tiny")
    set_max_tokens(page, 3000)  # random weights rarely end a reply: this one runs until stopped
    send(page, "Tell me a long story.")
    # It streams: text is on the page while the reply is still running, and keeps growing.
    page.wait_for_function(
        "() => !document.getElementById('stop').hidden && "
        "(document.querySelector('.msg.assistant .body')?.textContent.length ?? 0) > 0"
    )
    seen = len(assistant_texts(page)[0])
    page.wait_for_function(
        "n => document.querySelector('.msg.assistant .body').textContent.length > n", arg=seen
    )
    page.click("#stop")
    wait_idle(page)
    meta = page.locator(".msg.assistant .meta").inner_text()
    assert "stopped" in meta and "tokens" in meta, meta
    stopped_text = assistant_texts(page)[0]
    assert stopped_text

    set_max_tokens(page, 12)
    page.click("#regenerate")
    wait_idle(page)
    assert page.locator(".msg").count() == 2  # the stopped reply was replaced, not kept
    meta = page.locator(".msg.assistant .meta").inner_text()
    # usage from stream_options.include_usage: exact counts, a speed, the prompt size
    assert "stopped" not in meta and "prompt" in meta and "tok/s" in meta and "≈" not in meta, meta
    assert "12 tokens" in meta or page.locator(".msg.assistant .body").inner_text().strip() != "", meta
    regenerated = assistant_texts(page)[0]
    assert regenerated != stopped_text

    page.click(".msg.user .edit")
    page.fill(".msg.user .edit-box", "A short poem, please.")
    page.click(".msg.user .save-edit")
    wait_idle(page)
    assert page.locator(".msg").count() == 2
    assert page.locator(".msg.user .body").inner_text() == "A short poem, please."
    edited_reply = assistant_texts(page)[0]

    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg.user .body").inner_text() == "A short poem, please."
    assert assistant_texts(page) == [edited_reply]
    assert page.locator("#chat-list li").count() == 1

    page.click("#clear")
    assert page.locator(".msg").count() == 0
    page.reload()
    page.wait_for_selector(".empty")
    assert page.locator(".msg").count() == 0


def test_markup_in_a_user_message_is_text_and_runs_nothing(page, open_server: Running) -> None:
    open_page(page, open_server.url, "tiny")
    set_max_tokens(page, 4)
    send(page, XSS)
    wait_idle(page)
    assert page.locator(".msg.user .body").inner_text() == XSS
    not_pwned(page)
    page.reload()  # and again when rendered from localStorage
    page.wait_for_selector(".msg.user")
    assert page.locator(".msg.user .body").inner_text() == XSS
    not_pwned(page)


def test_stored_reply_renders_as_safe_markdown_with_copy(page, open_server: Running) -> None:
    reply = (
        "# Title\n\nSome **bold** and `code`.\n\n```python\nprint('<b>hi</b>')\n```\n\n"
        + XSS
        + "\n\n[click](javascript:window.__pwned=3) [docs](https://example.org/x)\n\n- one\n- two"
    )
    chat = {"id": "c1", "title": "seeded", "system": "", "updated": 1,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]}  # fmt: skip
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=open_server.url)
    open_page(page, open_server.url, "tiny")
    page.evaluate("c => localStorage.setItem('qwenkit.chats.v1', JSON.stringify([c]))", chat)
    page.reload()
    body = page.locator(".msg.assistant .body")
    body.locator("h1").wait_for()
    assert body.locator("h1").inner_text() == "Title"
    assert body.locator("strong").first.inner_text() == "bold"
    assert body.locator("figure.code pre").inner_text() == "print('<b>hi</b>')"
    assert body.locator("li").all_inner_texts() == ["one", "two"]
    assert (
        body.locator("a").count() == 1 and body.locator("a").get_attribute("href") == "https://example.org/x"
    )
    assert "<img src=x" in body.inner_text() and "[click](javascript:" in body.inner_text()
    not_pwned(page)
    body.locator("figure.code .copy").click()
    page.wait_for_function("() => document.querySelector('figure.code .copy').textContent === 'Copied'")
    assert page.evaluate("() => navigator.clipboard.readText()") == "print('<b>hi</b>')"


def test_api_key_is_asked_for_and_needed(page, keyed_server: Running) -> None:
    page.goto(keyed_server.url + "/")
    page.wait_for_selector("#key-dialog[open]")
    assert page.locator("#model-name").inner_text() == ""
    page.fill("#key-input", "wrong-key")
    page.press("#key-input", "Enter")
    page.wait_for_function(
        "() => document.getElementById('key-message').textContent.includes('did not accept')"
    )
    assert page.locator("#key-dialog[open]").count() == 1
    # The page has no side door: without the key its own config route answers 401 too.
    status = page.evaluate("() => fetch('/web/config').then(r => r.status)")
    assert status == 401
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny'")
    assert page.evaluate("() => sessionStorage.getItem('qwenkit.apiKey')") == KEY
    assert KEY not in json.dumps(page.evaluate("() => Object.assign({}, localStorage)"))
    set_max_tokens(page, 4)
    send(page, "Hello")
    wait_idle(page)
    assert "tokens" in page.locator(".msg.assistant .meta").inner_text()
    assert page.locator(".msg.assistant .error").count() == 0


def test_phone_width(browser, open_server: Running) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    try:
        open_page(page, open_server.url, "tiny")
        set_max_tokens(page, 4)
        send(
            page,
            "A message long enough to wrap on a phone screen, with a_very_long_unbroken_identifier_inside_it",
        )
        wait_idle(page)
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways: {width}px"
        assert page.locator("#sidebar").bounding_box()["x"] < 0  # tucked away
        page.click("#toggle-sidebar")
        page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x >= 0")
        for selector in ("#input", "#send", "#regenerate", "#clear"):
            box = page.locator(selector).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
    finally:
        context.close()


# ---- the scripted backend ----------------------------------------------------------------------------------


def test_streamed_model_output_is_rendered_as_markdown_not_html(
    page, scripted_server: Running, tokenizer: QWenTokenizer
) -> None:
    output = "Here:\n```js\nalert('<b>x</b>')\n```\n" + XSS + " **done**"
    open_page(page, scripted_server.url, "scripted")
    send(page, script(tokenizer.encode(output)))
    wait_idle(page)
    body = page.locator(".msg.assistant .body")
    assert body.locator("figure.code pre").inner_text() == "alert('<b>x</b>')"
    assert body.locator("figure.code .lang").inner_text() == "js"
    assert body.locator("strong").all_inner_texts() == ["not bold", "done"]
    assert '<img src=x onerror="window.__pwned=1">' in body.inner_text()
    not_pwned(page)
    meta = page.locator(".msg.assistant .meta").inner_text()
    assert f"{len(tokenizer.encode(output))} tokens" in meta, meta


def test_server_errors_are_shown(page, scripted_server: Running, tokenizer: QWenTokenizer) -> None:
    open_page(page, scripted_server.url, "scripted")
    send(page, "word " * 2100)  # 2100+ tokens: over the 2048-token context
    wait_idle(page)
    error = page.locator(".msg.assistant .error").inner_text()
    assert "too long for the model's context" in error and "2048" in error, error
    page.click("#clear")

    # Hold the only slot with a slow scripted stream; with no queue, the page's request is a 429.
    long = script([tokenizer.encode("a")[0]] * 200)
    body = {
        "model": "scripted",
        "stream": True,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": long}],
    }
    with httpx.stream("POST", scripted_server.url + "/v1/chat/completions", json=body, timeout=60) as held:
        assert held.status_code == 200
        next(held.iter_lines())  # the slot is taken
        send(page, "Hello")
        wait_idle(page)
    error = page.locator(".msg.assistant .error").inner_text()
    assert "busy (429)" in error and "Retry in 1 s" in error, error


MARKDOWN_ALPHABET = "ab *_`~#>-|[]()!\\\n1.:/<>\"'="
ALLOWED_TAGS = {
    "A", "BLOCKQUOTE", "BR", "BUTTON", "CODE", "DEL", "DIV", "EM", "FIGURE", "H1", "H2", "H3", "H4", "H5", "H6",
    "HR", "LI", "OL", "P", "PRE", "SPAN", "STRONG", "TABLE", "TBODY", "TD", "TH", "THEAD", "TR", "UL",
}  # fmt: skip


def test_markdown_renderer_terminates_and_builds_only_known_nodes(page, open_server: Running) -> None:
    """Random markdown-ish text through the page's own renderer: every input renders quickly, to known tags and
    attributes only, and keeps every letter of the input."""
    import random

    rng = random.Random(0)
    samples = ["https://a.b/c_d *x*", "```\nunclosed", "- a\n  - b\n\n  c\n1. d", "|a|b|\n|-|:-:|\n|1|2|"]
    samples += [
        "".join(rng.choice(MARKDOWN_ALPHABET) for _ in range(rng.randint(1, 120))) for _ in range(300)
    ]
    open_page(page, open_server.url, "tiny")
    result = page.evaluate(
        """async (samples) => {
            const { renderMarkdown } = await import('/web/markdown.js');
            const out = [];
            for (const text of samples) {
                const t0 = performance.now();
                const box = document.createElement('div');
                box.append(renderMarkdown(text));
                const nodes = [...box.querySelectorAll('*')];
                out.push({
                    ms: performance.now() - t0,
                    tags: [...new Set(nodes.map(n => n.tagName))],
                    attrs: [...new Set(nodes.flatMap(n => [...n.attributes].map(a => a.name)))],
                    letters: (box.textContent.match(/[ab]/g) || []).length,
                    hrefs: [...box.querySelectorAll('a')].map(a => a.protocol),
                });
            }
            return out;
        }""",
        samples,
    )
    for text, r in zip(samples, result, strict=True):
        assert r["ms"] < 200, (text, r)
        assert set(r["tags"]) <= ALLOWED_TAGS, (text, r)
        assert set(r["attrs"]) <= {"class", "href", "rel", "target", "type", "data-lang", "start", "style"}, r
        assert set(r["hrefs"]) <= {"http:", "https:", "mailto:"}, (text, r)
        # Copy buttons add their label's letters ("Copy" has none of a, b): the input's letters all survive.
        assert r["letters"] >= sum(text.count(c) for c in "ab") - text.count("https://a.b") * 2, (text, r)
    not_pwned(page)
