"""The chat page's routes without a browser: headers (CSP), `--no-web`, `/web/config` behind the API key, the
files shipped as package data, and a source guard against HTML sinks and inline code in the page's files."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tomllib
from fastapi.testclient import TestClient
from server_support import ScriptedBackend

from qwenkit import QWenTokenizer
from qwenkit.cli.commands import build_parser
from qwenkit.generation.sampling import OFFICIAL_GENERATION_CONFIG
from qwenkit.server.app import Loaded, ServerOptions, create_app
from qwenkit.server.run import options_from_args
from qwenkit.server.web import STATIC_FILES, page_file

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "qwenkit" / "server" / "web"


@contextmanager
def client(tokenizer: QWenTokenizer, config: dict, **options) -> Iterator[TestClient]:
    opts = ServerOptions(model_name="m", **options)
    app = create_app(opts, lambda: Loaded(ScriptedBackend(tokenizer, 1, 300), tokenizer, config))
    with TestClient(app) as c:
        for _ in range(200):  # the loader runs in a thread
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        yield c


def test_page_and_files_have_a_strict_csp(tokenizer: QWenTokenizer) -> None:
    with client(tokenizer, OFFICIAL_GENERATION_CONFIG) as c:
        for path, media in [
            ("/", "text/html"),
            *((f"/web/{n}", t.split(";")[0]) for n, t in STATIC_FILES.items()),
        ]:
            r = c.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(media), path
            csp = r.headers["content-security-policy"]
            assert (
                "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
            )
            assert "unsafe" not in csp and "require-trusted-types-for 'script'" in csp
            assert r.headers["x-content-type-options"] == "nosniff"
        assert c.get("/web/../app.py").status_code == 404
        assert c.get("/web/nope.js").status_code == 404


def test_config_gives_the_model_defaults(tokenizer: QWenTokenizer) -> None:
    with client(tokenizer, OFFICIAL_GENERATION_CONFIG) as c:
        body = c.get("/web/config").json()
    assert body == {"model": "m", "max_model_len": 300,
                    "defaults": {"temperature": 1.0, "top_p": 0.8, "max_tokens": 512}}  # fmt: skip
    greedy = {**OFFICIAL_GENERATION_CONFIG, "do_sample": False, "max_new_tokens": 64}
    with client(tokenizer, greedy) as c:
        assert c.get("/web/config").json()["defaults"] == {"temperature": 0.0, "top_p": 0.8, "max_tokens": 64}


def test_config_needs_the_api_key_and_the_page_holds_no_secret(tokenizer: QWenTokenizer) -> None:
    with client(tokenizer, OFFICIAL_GENERATION_CONFIG, api_key="sekrit") as c:
        assert c.get("/web/config").status_code == 401
        assert c.get("/web/config", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/web/config", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        page = c.get("/")  # static, public, and it carries nothing about the key
        assert page.status_code == 200 and "sekrit" not in page.text


def test_no_web_turns_the_page_off(tokenizer: QWenTokenizer) -> None:
    args = build_parser().parse_args(["serve", "-m", "some/dir", "--no-web"])
    assert options_from_args(args).web is False
    assert options_from_args(build_parser().parse_args(["serve", "-m", "some/dir"])).web is True
    with client(tokenizer, OFFICIAL_GENERATION_CONFIG, web=False) as c:
        for path in ("/", "/web/app.js", "/web/config"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path
        assert c.get("/v1/models").status_code == 200  # the API is unchanged


def test_every_page_file_is_package_data() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["qwenkit.server.web"]
    for name in ["index.html", *STATIC_FILES]:
        assert page_file(name)
        assert any(Path(name).match(p) for p in shipped), name
    on_disk = {p.name for p in WEB.iterdir() if p.suffix in (".html", ".js", ".css", ".svg")}
    assert on_disk == {"index.html", *STATIC_FILES}  # nothing unserved, nothing missing
    # Every module the page imports is served.
    for js in WEB.glob("*.js"):
        for target in re.findall(r'from "\./([\w.-]+)"', js.read_text()):
            assert target in STATIC_FILES, (js.name, target)


SINKS = re.compile(
    r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|setTimeout\(\s*[\"'`]"
)


@pytest.mark.parametrize("name", [n for n in STATIC_FILES if n.endswith(".js")])
def test_scripts_use_no_html_sinks(name: str) -> None:
    """The CSP's Trusted Types enforce this in the browser; this catches it before a browser runs."""
    source = (WEB / name).read_text()
    assert not SINKS.search(source), SINKS.search(source)


def test_page_has_no_inline_code() -> None:
    html = page_file("index.html").decode()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="/web/app.js">']
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son\w+\s*=", html)  # no inline event handlers
    assert "http://" not in html and "https://" not in html  # nothing from another origin
