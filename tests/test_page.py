"""The page, in headless Chromium: a chosen or dropped image file is shown under the pad,
pixel for pixel as the file holds it, beside the 28×28 digit the model saw; a drawing
hides it again. The server runs an untrained Net (the answers do not matter here)."""

from __future__ import annotations

import base64
import io
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from helpers import needs_chromium
from scripts.page_screenshot import browser_page, draw, serving, wait_ready
from stages.common import save_torch
from stages.model import Net, checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    torch.manual_seed(0)
    save_torch(folder / "model.pt", checkpoint(Net(dropout=0.0), {"dropout": 0.0},
                                               normalisation={"mean": 0.13, "std": 0.31}))
    with serving("--model", str(folder / "model.pt"), "--ood", "none",
                 log=folder / "server.log") as url, browser_page(url) as page:
        page.origin = urlsplit(url).netloc
        page.requested = []
        page.on("request", lambda r: page.requested.append(r.url))
        yield page


def a_seven(width: int, height: int) -> Image.Image:
    """Dark ink on a pale, slightly coloured sheet, WIDTH×HEIGHT, no two rows alike."""
    image = Image.new("RGB", (width, height), (250, 244, 230))
    ImageDraw.Draw(image).line([(width // 4, height // 4), (3 * width // 4, height // 4),
                                (width // 2, 3 * height // 4)], fill=(20, 30, 60), width=9)
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def choose(page, name: str, data: bytes, mime: str = "image/png") -> None:
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])
    wait_ready(page)


def drop(page, name: str, data: bytes, mime: str = "image/png") -> None:
    page.evaluate("""([b64, name, mime]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], name, {type: mime}));
        document.getElementById("pad").dispatchEvent(
            new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(data).decode(), name, mime])
    wait_ready(page)


def shown(page) -> dict:
    """The image shown under the pad, once the browser has decoded it (or failed to):
    whether it is visible, its source, natural size, caption and RGB pixels."""
    page.wait_for_function("() => { const i = document.getElementById('sent-image');"
                           " return document.getElementById('sent').hidden"
                           " || (i.complete && /pixels|cannot/.test("
                           "document.getElementById('sent-caption').textContent)); }")
    return page.evaluate("""() => {
        const image = document.getElementById("sent-image");
        const visible = image.checkVisibility();
        let pixels = null;
        if (visible && image.naturalWidth) {
            const canvas = document.createElement("canvas");
            canvas.width = image.naturalWidth;
            canvas.height = image.naturalHeight;
            const context = canvas.getContext("2d");
            context.drawImage(image, 0, 0);
            const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
            pixels = Array.from(rgba.filter((_, i) => i % 4 !== 3));
        }
        return {visible, src: image.getAttribute("src"), size: [image.naturalWidth,
                image.naturalHeight], caption: document.getElementById("sent-caption").textContent,
                pixels};
    }""")


def seen_shown(page) -> bool:
    """Whether the 28×28 digit the model saw is on show."""
    return page.eval_on_selector("#seen", "c => c.checkVisibility()")


@needs_chromium
@pytest.mark.parametrize("how", [choose, drop])
def test_a_chosen_or_dropped_file_is_shown_beside_the_28x28(page, how):
    page.click("#clear")
    assert not shown(page)["visible"]
    image = a_seven(173, 91)
    how(page, "seven.png", png(image))
    sent = shown(page)
    assert sent["visible"] and sent["src"].startswith("data:image/png;base64,")
    assert sent["size"] == [173, 91] and "173×91 pixels" in sent["caption"]
    assert np.array_equal(np.array(sent["pixels"], np.uint8).reshape(91, 173, 3),
                          np.asarray(image))
    assert seen_shown(page)


@needs_chromium
def test_a_drawing_or_clear_hides_the_file_shown(page):
    page.click("#clear")
    choose(page, "seven.png", png(a_seven(120, 150)))
    assert shown(page)["visible"]
    draw(page, [[(5, 5), (20, 20)]], 10)  # a stroke on the pad: the pad is what is sent
    assert not shown(page)["visible"] and seen_shown(page)
    choose(page, "seven.png", png(a_seven(120, 150)))
    assert shown(page)["visible"]
    page.click("#clear")
    assert not shown(page)["visible"]


@needs_chromium
def test_a_refused_file_is_still_shown_with_the_reason(page):
    page.click("#clear")
    choose(page, "blank.png", png(Image.new("RGB", (64, 48), "white")))
    sent = shown(page)
    assert sent["visible"] and sent["size"] == [64, 48]
    assert "no ink" in page.text_content("#message") and not seen_shown(page)


@needs_chromium
def test_a_file_the_browser_cannot_show_says_so_and_is_still_read(page):
    page.click("#clear")
    buffer = io.BytesIO()
    a_seven(160, 160).convert("L").save(buffer, format="TIFF")
    choose(page, "seven.tiff", buffer.getvalue(), "image/tiff")
    sent = shown(page)
    assert sent["visible"] and "cannot show its format" in sent["caption"]
    assert seen_shown(page)  # the server read it


@needs_chromium
def test_showing_a_file_fetches_nothing(page):
    """The file is shown from a data: URL read in the page: the only requests are to the
    server (blob: URLs count as requests of their own)."""
    page.requested.clear()
    choose(page, "seven.png", png(a_seven(90, 90)))
    assert shown(page)["visible"]
    assert page.requested and all(urlsplit(u).netloc == page.origin for u in page.requested)
