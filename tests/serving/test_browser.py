"""The web page in a real browser (Debian chromium via Playwright) against the real server.

A user uploads a digit and sees the model's class on top of the bars, switches the
Grad-CAM heatmap on, is told plainly when a file is not an image or too large, can
retry a failed image, uses the page on a phone-sized touch screen, and the page
never talks to any host but the server it came from.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

TIMEOUT_MS = 30_000  # per wait in the page; a CPU-only machine under load is slow to run Grad-CAM

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
serving = pytest.importorskip("imgcls.serving.app", reason="imgcls.serving.app cannot be imported")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from live_server import LOOPBACK, ServerThread  # after the skips

# ---------------------------------------------------------------- server


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    import imgcls

    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "imgcls-data"))
        run = imgcls.train(out=str(out), name="digits", epochs=2, quiet=True, report=False,
                           model_option={"widths": [8, 16, 16]})
    return run.path


@pytest.fixture(scope="module")
def server(digits_run):
    with ServerThread(serving.create_app(digits_run)) as srv:
        yield srv


@pytest.fixture(scope="module")
def digit_pngs(digits_run, tmp_path_factory):
    """Two test-split digits the model gets right, as 64x64 RGB PNGs: [(path, class name)]."""
    from PIL import Image

    import imgcls

    clf = imgcls.load(digits_run, device="cpu")
    test = clf.dataset().splits["test"]
    proba = clf.proba_of_arrays(test.images)
    right = np.flatnonzero(proba.argmax(1) == test.labels)
    # The most confident correct images of two different classes.
    order = right[np.argsort(-proba[right].max(1))]
    chosen, seen = [], set()
    for index in order:
        if test.labels[index] not in seen:
            chosen.append(int(index))
            seen.add(test.labels[index])
        if len(chosen) == 2:
            break
    folder = tmp_path_factory.mktemp("digits")
    files = []
    for index in chosen:
        name = clf.classes[test.labels[index]]
        path = folder / f"digit-{name}.png"
        Image.fromarray(test.images[index][..., 0]).resize((64, 64), Image.NEAREST).convert("RGB").save(path)
        files.append((path, name))
    # The server decodes and resizes as the library does, so both must agree on these files.
    assert list(clf.predict([str(p) for p, _ in files])) == [name for _, name in files]
    return files


# ---------------------------------------------------------------- browser


class PageLog:
    """Every request the page made and every script error it raised."""

    def __init__(self, page):
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.requests.append((r.method, r.url)))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" and "status of 4" not in m.text
                else None)

    def foreign_hosts(self) -> list[str]:
        """URLs that left 127.0.0.1 (blob: and data: URLs stay in the page)."""
        return [url for _, url in self.requests
                if urlsplit(url).scheme not in ("blob", "data") and urlsplit(url).hostname != LOOPBACK]

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, url in self.requests if m == method and urlsplit(url).path == path)


def new_page(browser, **context_options):
    """A page in a fresh context (its own storage), with its PageLog as ``page.log``."""
    context = browser.new_context(**context_options)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.log = PageLog(page)
    return page


def close_page(page) -> None:
    page.context.close()
    assert page.log.foreign_hosts() == [], "the page must talk to its own server only"
    assert page.log.errors == [], "the page raised script errors"


@pytest.fixture
def page(browser):
    page = new_page(browser, viewport={"width": 1280, "height": 860})
    yield page
    close_page(page)


def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.evaluate("window.scrollTo(0, 0)")  # the model card is sticky: capture it where a user first sees it
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("IMGCLS_SCREENSHOT_DIR"):
        folder = Path(os.environ["IMGCLS_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def open_page(page, server):
    page.goto(server.url + "/")
    page.wait_for_selector("#model-card .model-facts", state="visible")


# ---------------------------------------------------------------- tests


def test_model_card_shows_the_run(page, server):
    open_page(page, server)
    card = page.locator("#model-card")
    text = card.inner_text()
    for fact in ("Test accuracy", "Macro F1", "Trained", "Runtime", "8 × 8 px"):
        assert fact in text
    assert card.locator(".chip").all_inner_texts() == [str(d) for d in range(10)]
    assert "torch" in card.locator("dd").all_inner_texts()


def test_upload_shows_the_top_class_and_the_heatmap(page, server, digit_pngs, tmp_path):
    open_page(page, server)
    path, expected = digit_pngs[0]
    page.set_input_files("#file-input", str(path))
    card = page.locator(".card").first
    card.locator(".prob-bar").first.wait_for()

    assert card.locator(".filename").inner_text() == path.name
    bars = card.locator(".prob-bar")
    assert bars.count() == 5
    assert bars.first.get_attribute("data-class") == expected
    assert card.locator(".prob-row.best .prob-label").inner_text() == expected
    probabilities = [float(bars.nth(i).get_attribute("data-probability")) for i in range(5)]
    assert probabilities == sorted(probabilities, reverse=True) and probabilities[0] > 0.1
    # The bar's length is its probability.
    width = card.locator(".prob-fill").first.evaluate("e => e.getBoundingClientRect().width / e.parentElement.getBoundingClientRect().width")
    assert width == pytest.approx(probabilities[0], abs=0.02)
    assert page.log.count("POST", "/v1/predict") == 1

    card.locator(".heatmap-toggle").check()
    card.locator(".card-media.showing-heatmap").wait_for()
    heatmap = card.locator("img.heatmap")
    assert heatmap.evaluate("img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0")
    assert heatmap.is_visible()
    assert page.log.count("POST", "/v1/explain") == 1
    screenshot(page, tmp_path, "serve_page.png")

    # Off and on again: the overlay is cached, not asked for twice.
    card.locator(".heatmap-toggle").uncheck()
    assert card.locator(".card-media.showing-heatmap").count() == 0
    card.locator(".heatmap-toggle").check()
    card.locator(".card-media.showing-heatmap").wait_for()
    assert page.log.count("POST", "/v1/explain") == 1


def test_many_images_go_in_one_request(page, server, digit_pngs):
    open_page(page, server)
    page.set_input_files("#file-input", [str(p) for p, _ in digit_pngs])
    sync_api.expect(page.locator(".card.done")).to_have_count(2)
    assert page.log.count("POST", "/v1/predict") == 1
    shown = {}
    for card in page.locator(".card").all():
        shown[card.locator(".filename").inner_text()] = card.locator(".prob-bar").first.get_attribute("data-class")
    assert shown == {p.name: name for p, name in digit_pngs}


DATA_TRANSFER = """([name, b64]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type: "image/png" }));
    return transfer;
}"""


def test_drop_and_paste_classify_like_the_picker(page, server, digit_pngs):
    import base64

    open_page(page, server)
    (first, first_class), (second, second_class) = digit_pngs
    dropped = page.evaluate_handle(DATA_TRANSFER, [first.name, base64.b64encode(first.read_bytes()).decode()])
    assert page.locator(".paste-hint").is_visible()  # a desktop with a mouse and a keyboard
    page.dispatch_event("#drop", "dragenter", {"dataTransfer": dropped})
    assert "dragging" in page.locator("#drop").get_attribute("class")
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    page.locator(".card.done").first.wait_for()
    assert "dragging" not in page.locator("#drop").get_attribute("class")

    pasted = page.evaluate_handle(DATA_TRANSFER, ["image.png", base64.b64encode(second.read_bytes()).decode()])
    page.evaluate("t => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: t}))", pasted)
    sync_api.expect(page.locator(".card.done")).to_have_count(2)
    shown = {c.locator(".filename").inner_text(): c.locator(".prob-bar").first.get_attribute("data-class")
             for c in page.locator(".card").all()}
    assert shown == {first.name: first_class, "pasted-1.png": second_class}


def test_a_text_file_named_png_shows_the_servers_message(page, server):
    payload = b"these are notes, not pixels\n" * 20
    expected = httpx.post(f"{server.url}/v1/predict", files={"files": ("notes.png", payload, "image/png")})
    assert expected.status_code == 400
    message = expected.json()["error"]["message"]

    open_page(page, server)
    page.set_input_files("#file-input", {"name": "notes.png", "mimeType": "image/png", "buffer": payload})
    error = page.locator(".card .error")
    error.wait_for()
    assert message in error.inner_text()
    assert page.locator(".card .prob-bar").count() == 0
    assert page.locator(".card .switch").is_hidden()


def test_one_bad_file_does_not_sink_the_good_ones(page, server, digit_pngs):
    open_page(page, server)
    path, expected = digit_pngs[0]
    bad = {"name": "broken.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n truncated"}
    good_file = {"name": path.name, "mimeType": "image/png", "buffer": path.read_bytes()}
    page.set_input_files("#file-input", [good_file, bad])
    page.locator('.card[aria-busy="true"]').first.wait_for(state="detached")  # every card answered
    good = page.locator(".card", has_text=path.name)
    assert good.locator(".prob-bar").first.get_attribute("data-class") == expected
    assert page.locator(".card", has_text="broken.png").locator(".error").is_visible()
    # The shared request failed, so the page asked again one file at a time.
    assert page.log.count("POST", "/v1/predict") == 3


def test_wrong_type_and_too_large_are_refused_before_sending(page, server):
    open_page(page, server)
    page.set_input_files("#file-input", [
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"},
        {"name": "huge.png", "mimeType": "image/png", "buffer": b"\0" * 10_000_001},
    ])
    errors = page.locator(".card .error")
    errors.nth(1).wait_for()
    text = " ".join(errors.all_inner_texts())
    assert "“notes.txt” is not an image" in text
    assert "“huge.png” is too large" in text and "10 MB" in text
    # 10,000,001 bytes would read "10 MB" like the limit: both are then given exactly.
    assert "10,000,001 bytes" in text and "10,000,000 bytes" in text
    assert page.log.count("POST", "/v1/predict") == 0
    assert "10 MB" in page.locator("#drop").inner_text()


def test_keyboard_reaches_the_picker_and_the_toggle(page, server, digit_pngs):
    open_page(page, server)
    page.keyboard.press("Tab")  # the skip link
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.id")
    if focused != "file-input":  # the API key summary comes first in the header
        page.keyboard.press("Tab")
        focused = page.evaluate("document.activeElement.id")
    assert focused == "file-input"
    assert page.evaluate("document.querySelector('label[for=file-input]').textContent").strip()

    page.set_input_files("#file-input", str(digit_pngs[0][0]))
    toggle = page.locator(".card .heatmap-toggle")
    toggle.wait_for(state="visible")
    toggle.focus()
    page.keyboard.press("Space")
    page.locator(".card-media.showing-heatmap").wait_for()
    assert page.locator(".card .switch").inner_text().startswith("Show Grad-CAM")


KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed_server(digits_run):
    with ServerThread(serving.create_app(digits_run, api_key=KEY)) as srv:
        yield srv


def assert_sentences(text: str) -> None:
    """Text for a person: it ends a sentence, and no sentence runs into the next one ("header Enter")."""
    text = text.strip()
    assert text and text[-1] in ".!?", text
    assert re.search(r"[^.!?\s]\s+(Enter|Then|Check)\b", text) is None, text


def test_api_key_is_asked_for_stored_and_sent(browser, keyed_server, digit_pngs):
    page = new_page(browser)
    page.goto(keyed_server.url + "/")
    error = page.locator("#model-card .error")
    error.wait_for()
    assert "API key" in error.inner_text()
    assert_sentences(error.inner_text())
    assert page.locator("#api-key-panel").evaluate("d => d.open")

    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#model-card .model-facts", state="visible")
    assert page.evaluate("localStorage.getItem('imgcls.apiKey')") == KEY

    page.reload()  # the key survives a reload
    page.wait_for_selector("#model-card .model-facts", state="visible")
    page.set_input_files("#file-input", str(digit_pngs[0][0]))
    page.locator(".card .prob-bar").first.wait_for()
    close_page(page)


def test_a_card_refused_for_its_key_is_retried_once_the_key_is_right(browser, keyed_server, digit_pngs):
    page = new_page(browser)
    page.goto(keyed_server.url + "/")
    page.fill("#api-key", "wrong-key")
    page.press("#api-key", "Enter")
    sync_api.expect(page.locator("#model-card .error")).to_contain_text("did not accept")
    assert_sentences(page.locator("#model-card .error").inner_text())

    path, expected = digit_pngs[0]
    page.set_input_files("#file-input", str(path))
    card = page.locator(".card")
    card.locator(".error").wait_for()
    assert_sentences(page.locator("#global-error").inner_text())
    retry = card.locator("button.retry")
    assert retry.is_visible()

    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#model-card .model-facts", state="visible")
    retry.click()
    card.locator(".prob-bar").first.wait_for()
    assert card.locator(".prob-bar").first.get_attribute("data-class") == expected
    assert card.locator(".error").is_hidden() and retry.is_hidden()
    assert "has-error" not in card.get_attribute("class")
    assert page.locator(".card").count() == 1  # the same card, not a new one
    assert page.log.count("POST", "/v1/predict") == 2
    close_page(page)


def cut_jpeg() -> bytes:
    """The first 600 bytes of a 64x64 JPEG: a header Pillow opens, then a stream that stops."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:600]


def red_png() -> bytes:
    """A 64x64 PNG of one colour, for answers the test makes up (the class does not matter)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_a_cut_short_jpeg_is_named_in_a_plain_sentence(page, server):
    open_page(page, server)
    page.set_input_files("#file-input", {"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": cut_jpeg()})
    error = page.locator(".card .error")
    error.wait_for()
    text = error.inner_text()
    assert text.lstrip("⚠ ").startswith("photo.jpg could not be read as an image")
    assert "damaged or cut short" in text and "JPEG" in text and "PNG" in text
    for python_words in ("OSError", "Error:", "SyntaxError", "bytes not processed", "Truncated", "("):
        assert python_words not in text
    assert re.search(r"\d{4}", text) is None  # no bare byte counts or offsets
    assert_sentences(text)


def test_a_network_failure_is_retried_on_the_same_card(page, server, digit_pngs):
    open_page(page, server)
    path, expected = digit_pngs[1]
    page.route("**/v1/predict*", lambda route: route.abort())
    page.set_input_files("#file-input", str(path))
    card = page.locator(".card")
    card.locator(".error").wait_for()
    assert "could not be reached" in card.locator(".error").inner_text()
    assert "1 with a problem" in page.locator("#status").inner_text()

    page.unroute("**/v1/predict*")
    card.locator("button.retry").click()
    card.locator(".prob-bar").first.wait_for()
    assert card.locator(".prob-bar").first.get_attribute("data-class") == expected
    assert card.locator(".error").is_hidden() and card.locator("button.retry").is_hidden()
    assert "1 classified" in page.locator("#status").inner_text()
    assert "problem" not in page.locator("#status").inner_text()
    # The aborted fetch is logged by the browser; it is this test's doing, not the page's.
    page.log.errors = [e for e in page.log.errors if "net::ERR_FAILED" not in e]


def test_clear_all_switches_show_all_heatmaps_off(page, server, digit_pngs):
    open_page(page, server)
    path, _ = digit_pngs[0]
    page.set_input_files("#file-input", str(path))
    page.locator(".card.done").wait_for()
    page.click("#heatmaps-all")
    page.locator(".card-media.showing-heatmap").wait_for()
    assert page.locator("#heatmaps-all").get_attribute("aria-pressed") == "true"

    page.click("#clear-all")
    assert page.locator(".card").count() == 0
    assert page.locator("#heatmaps-all").get_attribute("aria-pressed") == "false"
    assert page.locator("#heatmaps-all").inner_text() == "Show all heatmaps"

    page.set_input_files("#file-input", str(path))
    page.locator(".card.done").wait_for()
    assert not page.locator(".card .heatmap-toggle").is_checked()
    assert page.locator(".card-media.showing-heatmap").count() == 0
    assert page.log.count("POST", "/v1/explain") == 1  # the new card asked for no heatmap


LONG_CLASS = "staffordshire_bull_terrier_with_an_unusually_long_class_name"

FITS = """card => {
    const box = card.getBoundingClientRect();
    return Array.from(card.querySelectorAll("*"))
        .filter((e) => e.getClientRects().length && e.getBoundingClientRect().right > box.right + 0.5)
        .map((e) => e.className || e.tagName);
}"""


def test_a_phone_sized_touch_screen_shows_every_card_whole(browser, server):
    page = new_page(browser, viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    open_page(page, server)
    assert page.locator(".paste-hint").is_hidden()  # no Ctrl+V on a touch screen
    assert page.locator("label[for=file-input]").is_visible()

    page.set_input_files("#file-input", {"name": "photo-cut.jpg", "mimeType": "image/jpeg", "buffer": cut_jpeg()})
    page.locator(".card .error").wait_for()
    # The server's answer for a class name too long for the width.
    answer = {"model": "digits", "predictions": [{"filename": "photo.png", "top": [
        {"class": LONG_CLASS, "probability": 0.91}, {"class": "golden_retriever", "probability": 0.05},
        {"class": "x", "probability": 0.04}]}]}
    page.route("**/v1/predict*", lambda route: route.fulfill(status=200, content_type="application/json",
                                                            body=json.dumps(answer)))
    page.set_input_files("#file-input", {"name": "photo.png", "mimeType": "image/png", "buffer": red_png()})
    page.locator(".card.done").wait_for()

    label = page.locator(".card.done .prob-row.best .prob-label")
    assert label.inner_text() == LONG_CLASS and label.get_attribute("title") == LONG_CLASS
    assert label.evaluate("e => e.scrollWidth <= e.clientWidth")
    for card in page.locator(".card").all():
        assert card.evaluate(FITS) == [], "an element of the card reaches past its right edge"
    assert page.locator(".card.has-error button.retry").is_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    close_page(page)



def test_a_multilabel_model_shows_its_labels_and_map(browser, tmp_path_factory, multilabel_squares):
    """A model with several labels per image: the card shows its test mAP, a prediction the set of labels over
    their thresholds, as the library answers them."""
    from PIL import Image

    import imgcls

    root = tmp_path_factory.mktemp("squares") / "squares"
    multilabel_squares.write_folder(root, 120)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "imgcls-data"))
        run = imgcls.train(data=str(root), out=str(root.parent / "runs"), name="squares", epochs=3, batch_size=16,
                           model="fastnet_small", quiet=True, report=False, model_option={"widths": [8, 16, 16]})
    images, labels = multilabel_squares.images(20, seed=11)
    path = root.parent / "upload.png"
    Image.fromarray(images[next(i for i, have in enumerate(labels) if len(have) == 2)]).resize(
        (64, 64), Image.NEAREST).save(path)
    expected = list(imgcls.load(run.path).predict([str(path)])[0])
    assert expected  # two squares: the model sees at least one
    with ServerThread(serving.create_app(run.path)) as srv:
        page = new_page(browser, viewport={"width": 390, "height": 844})
        try:
            open_page(page, srv)
            assert "Test mAP" in page.locator("#model-card").inner_text()
            page.set_input_files("#file-input", str(path))
            answer = page.locator(".card .answer")
            answer.wait_for(state="visible")
            shown = answer.locator("strong").all_inner_texts()
            assert shown == expected
            assert answer.inner_text().startswith("Labels:")
        finally:
            close_page(page)
