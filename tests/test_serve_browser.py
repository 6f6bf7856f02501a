"""The web page in headless Chromium: a chat message streams the model's reply; the classify box works.

Skips cleanly without playwright (pip) or a Chromium binary (Debian: apt-get install chromium). We never run
`playwright install`: the system Chromium is driven through `executable_path`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from conftest import make_hf_model  # noqa: E402
from test_serve import gate_forwards, start_server, tiny_tokenizer  # noqa: E402

from lmforge.generator import Generator  # noqa: E402
from lmforge.tasks.classify import LoadedClassifier, predict  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def _chromium() -> str | None:
    for cand in (os.environ.get("LMFORGE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: intra-op threads only slow it down on a busy machine
    d = tmp_path_factory.mktemp("browser-llama")
    tok = tiny_tokenizer()
    make_hf_model("llama", vocab=tok.vocab_size).save_pretrained(d)
    tok.save(d)
    gen = Generator.load(d)
    from lmforge.model.heads import SequenceClassifier

    torch.manual_seed(3)
    head = SequenceClassifier(Generator.load(d).model, 2).eval()
    with torch.no_grad():
        head.score.weight.normal_(0, 1.0)
    lc = LoadedClassifier(head, gen.tokenizer, ["neg", "pos"], "transformer", 32)
    srv = start_server(gen, classifier=lc)
    yield srv, gen, lc
    srv.stop()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium binary (Debian: apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        try:
            ctx = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                       executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        except Exception as e:  # noqa: BLE001 -- a browser that cannot start here is a skip, not a failure
            pytest.skip(f"Chromium at {exe} did not start: {str(e).splitlines()[0]}")
        yield ctx
        ctx.close()


def test_page_streams_a_chat_reply_and_classifies(page_server, browser_context):
    srv, gen, lc = page_server
    page = browser_context.new_page()
    page.goto(srv.url + "/")
    page.wait_for_selector("#classify-box:not(.hidden)")  # /health said a classifier is loaded
    page.fill("#max-tokens", "16")
    # record every text the reply shows: streamed tokens appear as a growing series of prefixes
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const m = document.querySelector('.msg.assistant');
            if (m && m.textContent && window.seen[window.seen.length - 1] !== m.textContent) {
                window.seen.push(m.textContent);
            }
        }).observe(document.getElementById('messages'), {subtree: true, characterData: true, childList: true});
    }""")
    expected = gen.chat([{"role": "user", "content": "the cat sat on the mat"}], max_new_tokens=16)
    gate, hook = gate_forwards(gen.model, delay=0.03)  # ~30 ms a token, so pieces arrive in separate reads
    gate.set()
    try:
        page.fill("#prompt", "the cat sat on the mat")
        page.click("#send")
        page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=30_000)
    finally:
        hook.remove()
    assert page.locator(".msg.assistant").first.text_content() == expected
    seen = page.evaluate("window.seen")
    assert len(seen) >= 3 and seen[-1] == expected and all(expected.startswith(x) for x in seen), seen
    assert page.locator(".msg.error").count() == 0
    usage = page.text_content("#usage")  # the speed figures from the usage chunk's `timings`
    assert "prompt tokens" in usage and " generated" in usage and "first token" in usage and " ms" in usage, usage

    page.fill("#classify-text", "a good cat")
    page.click("#classify-btn")
    page.wait_for_selector("#classify-result .label")
    want = predict(lc, ["a good cat"])[0]
    assert page.text_content("#classify-result .label").startswith(want["label"] + " (")
    page.close()
