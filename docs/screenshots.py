"""Take the README's screenshots of the chat page (desktop and phone width) with headless Chromium.

Starts `qwenkit serve` on a synthetic tiny checkpoint in a temporary directory, stores a sample conversation in
the page's localStorage (the synthetic model answers gibberish, so the shown reply is sample text, not model
output), and writes docs/web-desktop.png and docs/web-phone.png. Needs the test extra (Playwright) and Debian's
chromium (or $QWENKIT_CHROMIUM):

    python docs/screenshots.py
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from qwenkit.checkpoints.synthetic import make_checkpoint

DOCS = Path(__file__).resolve().parent
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SAMPLE_REPLY = """Here is a function that reverses the words of a sentence:

```python
def reverse_words(text: str) -> str:
    return " ".join(reversed(text.split()))
```

- **split()** breaks the text at whitespace
- `reversed` walks the words from the end

| input | output |
|---|---|
| `"hello big world"` | `"world big hello"` |
"""
CHAT = {
    "id": "sample", "title": "Reverse the words", "system": "", "updated": 1,
    "messages": [
        {"role": "user", "content": "Write a Python function that reverses the words in a sentence."},
        {"role": "assistant", "content": SAMPLE_REPLY,
         "stats": {"tokens": 78, "approx": False, "prompt": 31, "ttft": 0.18, "rate": 19.4, "finish": "stop"}},
    ],
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, deadline: float = 120.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    chromium = (
        os.environ.get("QWENKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if not chromium:
        raise SystemExit("no Chromium: apt-get install -y chromium (or set QWENKIT_CHROMIUM)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "demo", preset="tiny", dtype="float32", seed=0)
        port = _free_port()
        cmd = [sys.executable, "-m", "qwenkit", "serve", "-m", str(ckpt), "--port", str(port), "--dtype", "float32",
               "--device", "cpu", "--threads", "1"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait(url)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=ARGS)
                for name, size, mobile in [("desktop", (1280, 760), False), ("phone", (390, 780), True)]:
                    context = browser.new_context(
                        viewport={"width": size[0], "height": size[1]}, is_mobile=mobile, color_scheme="light"
                    )
                    page = context.new_page()
                    page.goto(url + "/")
                    page.evaluate("c => localStorage.setItem('qwenkit.chats.v1', JSON.stringify([c]))", CHAT)
                    page.reload()
                    page.wait_for_selector(".msg.assistant figure.code")
                    page.wait_for_function("() => document.getElementById('model-name').textContent !== ''")
                    if not mobile:
                        page.click("#toggle-settings")
                    page.screenshot(path=str(DOCS / f"web-{name}.png"))
                    context.close()
                browser.close()
        finally:
            proc.terminate()
            proc.wait(15)
    print(f"wrote {DOCS / 'web-desktop.png'} and {DOCS / 'web-phone.png'}")


if __name__ == "__main__":
    main()
